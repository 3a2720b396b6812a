"""SIGTERM/SIGINT: finish the step loop, checkpoint, exit 0, resume cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.test_checkpoint import _start, _wait_for_checkpoint
from trainer.compat import tf
from trainer.loop.preemption import PreemptionWatcher


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_exits_zero_and_resumes(tmp_path, sig):
    model_dir = str(tmp_path / "run")
    process = _start(model_dir, tmp_path / "m.json")
    _wait_for_checkpoint(model_dir, process, min_step=40)
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    match = re.search(r"stopped by (SIG\w+) at step (\d+); checkpoint saved", out)
    assert match, out
    assert match.group(1) == signal.Signals(sig).name
    step = int(match.group(2))
    total = 5 * (8192 // 64)
    assert 40 <= step < total
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    assert latest.endswith(f"ckpt-{step}")
    assert not (tmp_path / "m.json").exists()  # An unfinished run writes no metrics.

    resumed = _start(model_dir, tmp_path / "m.json")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming from {latest} at step {step}" in out
    assert json.loads((tmp_path / "m.json").read_text())["global_step"] == total


def test_watcher_records_the_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
        assert not watcher.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


# A process that, like run.py, stops cleanly on the first signal, but whose clean stop hangs
# (a save on a stuck disk, a peer that never answers): the second signal must end it.
STUCK_STOP = """
import sys, time
sys.path.insert(0, sys.argv[1])
from trainer.loop.preemption import PreemptionWatcher
with PreemptionWatcher() as watcher:
    print("ready", flush=True)
    while not watcher.requested:
        time.sleep(0.01)
    print("stopping after", watcher.signal_name, flush=True)
    time.sleep(120)
print("finished", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once(sig):
    from tests.conftest import ROOT

    process = subprocess.Popen([sys.executable, "-c", STUCK_STOP, str(ROOT)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(sig)
        # The first signal is a request: the process carries on with its (hung) clean stop.
        assert process.stdout.readline() == f"stopping after {signal.Signals(sig).name}\n"
        assert process.poll() is None
        start = time.monotonic()
        process.send_signal(sig)
        out, err = process.communicate(timeout=10)
        elapsed = time.monotonic() - start
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert elapsed < 5, elapsed
    assert "finished" not in out
    if sig == signal.SIGTERM or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # The default action: killed by it (SIGINT too where this process, and so the child,
        # was started with SIGINT ignored, as `cmd &` in a script does).
        assert process.returncode == -sig
    else:
        # Python's own SIGINT handler again: KeyboardInterrupt, which ends the process.
        assert process.returncode != 0 and "KeyboardInterrupt" in err
