"""Habana's real bridge (habana-tensorflow 1.14) on a machine without a Gaudi card.

These run only in the TensorFlow 2.15.0 lane (``make test-tf215``), where the bridge is
installed. Every use of the bridge is in a subprocess: importing it patches Keras, and loading
it registers an HPU device with TensorFlow, neither of which may leak into other tests.

What they show: the bridge imports; ``--device=auto`` notes that no card is there and trains
on the CPU exactly as ``--device=cpu`` does; ``--device=hpu`` is one ``error:`` line; the
bridge's own failure to load is one ``error:`` line, not a crash; and Habana's real
``HPUStrategy``, with its local device moved to the CPU by ``tests/hpu_shim.py``, trains two
worker processes to the same weights as MultiWorkerMirroredStrategy.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli, user_stderr_lines

from trainer.compat import tf
from trainer.runtime import devices

pytestmark = [
    pytest.mark.skipif(tf.__version__ != devices.HABANA_TF_VERSION,
                       reason=f"Habana's bridge needs TensorFlow {devices.HABANA_TF_VERSION}, "
                              f"this is {tf.__version__}: run these with make test-tf215"),
    pytest.mark.skipif(not devices.habana_available(),
                       reason="habana-tensorflow is not installed (make .venv-tf215/.installed)"),
]
no_card = pytest.mark.skipif(not devices.gaudi_card()[1],
                             reason="a Gaudi card is visible here: these test its absence")

SMALL = ("--dataset=synthetic", "--synthetic_examples=256", "--batch_size=32",
         "--model_args=units=16", "--epochs=1", "--validation_split=0", "--policy=float32",
         "--progress=none", "--seed=7")
# TF 2.15's C++ runtime also logs in its older format, e.g.
# "2026-01-01 05:26:25.427612: E external/local_xla/...: SetPriority unimplemented".
_TF215_NOISE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] ")
# What the bridge logs itself when load_habana_module() finds no driver file.
BRIDGE_NO_DRIVER_LOG = "Unable to read habanalabs driver file"
# Reduction order is the only difference allowed between the two strategies (REFERENCE.md).
STRATEGY_RTOL = 1e-6


def _user_lines(stderr: str) -> list:
    return [line for line in user_stderr_lines(stderr) if not _TF215_NOISE.match(line)]


def _python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def test_bridge_imports():
    result = _python("-c", "import habana_frameworks.tensorflow as htf\n"
                           "from habana_frameworks.tensorflow.distribute import HPUStrategy\n"
                           "print(HPUStrategy.__mro__[1].__name__)\n"
                           "print(htf.__version__)")
    assert result.returncode == 0, result.stderr[-3000:]
    base, version = result.stdout.splitlines()
    assert base == "CollectiveAllReduceStrategy"  # TF's MultiWorkerMirroredStrategy.
    # e.g. 'habana_device_1.14.0_e62bd2ab..._2024-01-18 18:29:08_2.15.0_dirty'
    assert "_1.14.0_" in version and "_2.15.0" in version, version  # Bridge, for TF.


@no_card
def test_auto_without_card_notes_it_and_trains_like_cpu(tmp_path):
    auto, cpu = tmp_path / "auto.json", tmp_path / "cpu.json"
    result = run_cli(*SMALL, f"--metrics_file={auto}", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = _user_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "warning: Habana's bridge is installed but no Gaudi driver/card was found (cannot read "
        f"{devices.HABANA_DRIVER_FILE}: "), lines[0]
    assert lines[0].endswith("; training on the CPU (--device=cpu skips this check)")
    assert BRIDGE_NO_DRIVER_LOG not in result.stderr  # Checked first, never loaded.
    summary = json.loads(auto.read_text())
    device_lines = [line for line in result.stdout.splitlines() if line.startswith("device: ")]
    assert device_lines == [f"device: {summary['device_description']}"]
    assert summary["device"] == "cpu" and devices._cpu_model() in device_lines[0]
    assert (summary["global_step"], summary["skipped_steps"]) == (8, 0)
    assert math.isfinite(summary["weights_checksum"]) and 0 <= summary["test_accuracy"] <= 1

    reference = run_cli(*SMALL, "--device=cpu", f"--metrics_file={cpu}", timeout=180)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert _user_lines(reference.stderr) == []  # --device=cpu: no check, no note.
    expected = json.loads(cpu.read_text())
    for key in ("global_step", "weights_checksum", "test_loss", "test_accuracy"):
        assert summary[key] == expected[key], key  # The same training on the same CPU.


@no_card
def test_device_hpu_without_card_is_one_error_line():
    result = run_cli("--device=hpu", "--dataset=synthetic", timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = _user_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --device=hpu but no Gaudi driver/card was found "
                               f"(cannot read {devices.HABANA_DRIVER_FILE}: "), lines[0]
    for advice in ("hl-smi", "BUILD.md", "--device=cpu"):
        assert advice in lines[0]
    assert BRIDGE_NO_DRIVER_LOG not in result.stderr
    assert not re.search(r"^(device|epoch|test)[: ]", result.stdout, re.M)  # Stopped first.


LOAD_FAILURE = """
import sys
sys.path.insert(0, {root!r})
from trainer.runtime import devices
from trainer.errors import UserError
# A driver file and a card node that pass our check; the bridge reads the real /sys path.
devices.HABANA_DRIVER_FILE, devices.HABANA_DEVICE_NODES = {driver!r}, {nodes!r}
try:
    devices.select_device({requested!r}, policy="float32")
except UserError as error:
    sys.exit(f"error: {{error}}")
print("selected a device")
"""


@no_card
@pytest.mark.parametrize("requested", ["hpu", "auto"])
def test_bridge_load_failure_is_one_error_line_not_a_crash(tmp_path, requested):
    """The real load_habana_module() fails half-way here (AttributeError); after it, any
    device query aborts the process, so 'auto' must stop with an error too."""
    (tmp_path / "device_type").write_text("GAUDI2\n")
    (tmp_path / "accel0").write_text("")
    script = LOAD_FAILURE.format(root=str(ROOT), driver=str(tmp_path / "device_type"),
                                 nodes=str(tmp_path / "accel[0-9]*"), requested=requested)
    result = _python("-c", script)
    assert result.returncode == 1, result.stderr[-3000:]  # Not 134 (SIGABRT).
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in _user_lines(result.stderr) if BRIDGE_NO_DRIVER_LOG not in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "error: Habana's bridge failed to load on this GAUDI2 (AttributeError: 'NoneType' "
        "object has no attribute 'split'); "), lines[0]
    assert "--device=cpu" in lines[0]


def _launch_two(kind: str, out_prefix) -> dict:
    """Two workers of tests/hpu_shim.py; returns {rank: what that worker recorded}."""
    result = _python("-m", "trainer.launch", "--num_workers=2", "--", "tests/hpu_shim.py",
                     kind, str(out_prefix), timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "Traceback" not in result.stdout + result.stderr
    return {rank: json.loads(out_prefix.with_name(f"{out_prefix.name}.{rank}.json").read_text())
            for rank in (0, 1)}


def test_real_hpu_strategy_on_cpu_matches_multi_worker_mirrored(tmp_path):
    hpu = _launch_two("hpu", tmp_path / "hpu")
    mwms = _launch_two("multi_worker", tmp_path / "mwms")
    for rank, record in hpu.items():
        # Habana's strategy ran, relabelled as TF's base class, with the shim's CPU device.
        assert record["strategy_class"] == "CollectiveAllReduceStrategy"
        assert record["extended_class"] == "HabanaCollectiveAllReduceExtended"
        assert record["local_devices"] == [f"/job:worker/replica:0/task:{rank}/device:CPU:0"]
        assert record["num_replicas_in_sync"] == 2 and record["num_workers"] == 2
        # What HPUStrategy changes: no partial batches, and no health-check thread.
        assert record["get_next_as_optional"] is False
        assert record["get_next_as_optional_after_run"] is False
        assert record["health_check_stops_at_creation"] == 1
        assert not record["health_thread_running"]
        assert not record["health_thread_running_after_run"]
    for record in mwms.values():  # The reference is TF's own strategy, unchanged.
        assert record["extended_class"] == "CollectiveAllReduceExtended"
        assert record["get_next_as_optional"] is True
        assert record["health_check_stops_at_creation"] == 0
    for run in (hpu, mwms):  # Replicas in sync within each job.
        assert run[0]["weights_checksum"] == run[1]["weights_checksum"]
        assert run[0]["global_step"] == run[1]["global_step"] == 8
        assert run[0]["skipped_steps"] == 0
    assert hpu[0]["weights_checksum"] == pytest.approx(mwms[0]["weights_checksum"],
                                                       rel=STRATEGY_RTOL)
    assert hpu[0]["test_loss"] == pytest.approx(mwms[0]["test_loss"], rel=STRATEGY_RTOL)
    assert hpu[0]["test_accuracy"] == mwms[0]["test_accuracy"]
