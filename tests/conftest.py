"""Shared helpers: small, fast configurations and TF log noise filtering.

Every test trains tiny models (``units=16``) on the synthetic dataset for a few steps, so the
whole suite stays fast on a 2-core machine.

The suite passes on any CPU. To run it as on another kind of CPU, force the bf16 answer of
trainer/runtime/devices.py (``cpu_bf16_flags``): ``pytest --cpu-bf16=0`` (as on a CPU without
AMX or AVX512-BF16, e.g. an AMD EPYC) or ``--cpu-bf16=1``, or ``--cpu-bf16=other``: as the
kind this machine's CPU is not (what ``make test`` runs last); each sets ``TRAINER_CPU_BF16`` for
this process and the processes the tests start, and so does setting that variable yourself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
from tensorflow.python.framework import config as tf_config  # noqa: E402

from trainer import registry  # noqa: E402
from trainer.compat import keras, mixed_precision  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.runtime import devices  # noqa: E402

# TensorFlow's C++ runtime logs a few lines (absl format, e.g. "I0000 00:00:..." or
# "E0000 ...") straight to stderr before Python can silence it; they are not ours.
_TF_NOISE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] "
    r"|WARNING: All log messages before absl::InitializeLog"
    r"|To enable the following instructions:)")
# The one line of ours whose presence depends on the CPU's instruction set: mixed_bfloat16
# (the default policy) on a CPU without AMX or AVX512-BF16 (devices.slower_than_float32).
# tests/test_devices.py checks it through the CLI with TRAINER_CPU_BF16 forced either way,
# which also keeps this pattern in step with the message.
SLOW_BF16_CPU_WARNING = re.compile(
    r"^warning: mixed_bfloat16 on a CPU without AMX or AVX512-BF16 \(.*\) emulates bf16 and "
    r"will be slower than float32; use --policy=float32 here$")


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-bf16", choices=("0", "1", "other"), default=None,
        help="run as on a CPU without (0) or with (1) bf16 instructions, or as the kind this "
             "CPU is not (other): sets "
             f"{devices.CPU_BF16_ENV} for the tests and the processes they start (default: "
             f"{devices.CPU_BF16_ENV} from the environment, else the CPU's own flags)")


def pytest_configure(config):
    forced = config.getoption("cpu_bf16", default=None)
    if forced == "other":  # The real CPU's flags (an explicit path ignores the variable).
        forced = "0" if devices.cpu_bf16_flags(devices.CPUINFO_PATH) else "1"
    if forced is not None:
        os.environ[devices.CPU_BF16_ENV] = forced


def pytest_report_header(config):
    value = os.environ.get(devices.CPU_BF16_ENV, "").strip()
    try:
        flags = devices.cpu_bf16_flags()
    except UserError as error:
        return f"cpu bf16: {error}"
    if value:
        return f"cpu bf16: {'yes' if flags else 'no'}, forced by {devices.CPU_BF16_ENV}={value}"
    return f"cpu bf16: {', '.join(flags) or 'none'} (from {devices.CPUINFO_PATH})"


def small_config(**overrides) -> TrainConfig:
    """A config that trains in well under a second: synthetic data, a 16-unit MLP, CPU."""
    settings = dict(
        dataset="synthetic", synthetic_examples=256, batch_size=32, epochs=1,
        model_args={"units": 16}, steps_per_loop=4, validation_split=0.0, device="cpu",
        seed=7, verbose=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def user_stderr_lines(stderr: str, *, keep_cpu_bf16_warning: bool = False) -> list:
    """Non-empty stderr lines, TensorFlow's C++ start-up log lines removed.

    The slow-bf16 CPU warning (:data:`SLOW_BF16_CPU_WARNING`) is removed too unless
    ``keep_cpu_bf16_warning``: whether a mixed_bfloat16 run prints it depends on the CPU the
    suite runs on, not on what a test checks. Every other ``warning:`` line stays.
    """
    return [line for line in stderr.splitlines()
            if line.strip() and not _TF_NOISE.match(line)
            and (keep_cpu_bf16_warning or not SLOW_BF16_CPU_WARNING.match(line))]


def run_cli(*args: str, timeout: float = 180, env: dict = None, script: str = "run.py"):
    """Runs ``python <script> args...`` from the repository root; returns CompletedProcess."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def make_config():
    """``make_config(**overrides)`` -> a small TrainConfig (see :func:`small_config`)."""
    return small_config


@pytest.fixture(autouse=True)
def _restore_global_policy():
    # A test that fails inside policy_scope must not leak its policy into the next test.
    policy = mixed_precision.global_policy()
    yield
    mixed_precision.set_global_policy(policy)


@pytest.fixture(autouse=True)
def _restore_determinism():
    # A Trainer with deterministic=True turns on TensorFlow's op determinism and Keras' layer
    # RNG variables for the whole process; later tests must see the defaults again. Public
    # TensorFlow has no way to turn op determinism off, so its own config module is used.
    # (Keras 3 has no such switch: its layer RNGs are always variables.)
    ops = tf_config.is_op_determinism_enabled()
    switch = getattr(keras.backend, "experimental", None)
    rng = switch.is_tf_random_generator_enabled() if switch else None
    yield
    if tf_config.is_op_determinism_enabled() != ops:
        (tf_config.enable_op_determinism if ops else tf_config.disable_op_determinism)()
    if switch and switch.is_tf_random_generator_enabled() != rng:
        (switch.enable_tf_random_generator if rng else switch.disable_tf_random_generator)()


@pytest.fixture
def register_model(monkeypatch):
    """``register_model(name)(builder)`` for one test: the name is gone again afterwards.

    The registry is process-wide; a model a test registers must not be listed (or clash
    with a name) in later tests.
    """
    registry.model_names()  # Load the zoo first, so the saved registry holds it.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry.register_model
