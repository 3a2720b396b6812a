"""Shared helpers: small, fast configurations and TF log noise filtering.

Every test trains tiny models (``units=16``) on the synthetic dataset for a few steps, so the
whole suite stays fast on a 2-core machine.
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

# TensorFlow's C++ runtime logs a few lines (absl format, e.g. "I0000 00:00:..." or
# "E0000 ...") straight to stderr before Python can silence it; they are not ours.
_TF_NOISE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] "
    r"|WARNING: All log messages before absl::InitializeLog"
    r"|To enable the following instructions:)")


def small_config(**overrides) -> TrainConfig:
    """A config that trains in well under a second: synthetic data, a 16-unit MLP, CPU."""
    settings = dict(
        dataset="synthetic", synthetic_examples=256, batch_size=32, epochs=1,
        model_args={"units": 16}, steps_per_loop=4, validation_split=0.0, device="cpu",
        seed=7, verbose=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def user_stderr_lines(stderr: str) -> list:
    """Non-empty stderr lines, TensorFlow's C++ start-up log lines removed."""
    return [line for line in stderr.splitlines() if line.strip() and not _TF_NOISE.match(line)]


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
    ops = tf_config.is_op_determinism_enabled()
    rng = keras.backend.experimental.is_tf_random_generator_enabled()
    yield
    if tf_config.is_op_determinism_enabled() != ops:
        (tf_config.enable_op_determinism if ops else tf_config.disable_op_determinism)()
    if keras.backend.experimental.is_tf_random_generator_enabled() != rng:
        (keras.backend.experimental.enable_tf_random_generator if rng
         else keras.backend.experimental.disable_tf_random_generator)()


@pytest.fixture
def register_model(monkeypatch):
    """``register_model(name)(builder)`` for one test: the name is gone again afterwards.

    The registry is process-wide; a model a test registers must not be listed (or clash
    with a name) in later tests.
    """
    registry.model_names()  # Load the zoo first, so the saved registry holds it.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry.register_model
