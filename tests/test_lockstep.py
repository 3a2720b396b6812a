"""Lockstep: every collective runs on every worker in the same order, or the job says why.

Single-process tests check the rule's guard (no collective inside chief-only code). The
multi-process tests run the cases that used to fall out of step with two real workers: the
README's own launch commands with default flags, a progress bar, re-running a finished job
and resuming it with more epochs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, small_config

from trainer.core.steps import Trainer
from trainer.runtime import lockstep
from trainer.runtime.lockstep import Lockstep, LockstepError

# mpirun forwards each rank's output in chunks, so another rank's text can follow a line
# with no newline between: match the number itself, not "up to the next space".
WORKER_LINE = re.compile(r"worker (\d)/2[^:]*: global_step (\d+) "
                         r"weights_checksum (-?\d+\.\d+(?:e[-+]?\d+)?)")
SMALL = ("--dataset=synthetic", "--synthetic_examples=512", "--batch_size=32",
         "--model_args=units=16", "--epochs=1", "--steps_per_loop=4", "--seed=5")
# Appended to the README's commands: small sizes only, every other flag as documented.
SMALL_SIZES = ("--dataset=synthetic", "--synthetic_examples=1024", "--epochs=1")
LAUNCHER_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE", "TF_CONFIG", "TRAINER_RANK", "TRAINER_WORLD_SIZE",
                 "TRAINER_LOCAL_RANK", "TRAINER_LOCAL_SIZE")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _workers(output: str) -> dict:
    return {int(i): (int(step), float(checksum))
            for i, step, checksum in WORKER_LINE.findall(output)}


def _launch(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--", "run.py", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env())


# ---------------------------------------------------------------- the guard, one process

def test_collective_inside_chief_only_code_is_refused():
    trainer = Trainer(small_config())
    steps = Lockstep(strategy=trainer.strategy)
    trainer.train_steps(2)
    with steps.chief_only() as chief:
        assert chief
        with pytest.raises(LockstepError, match="'read train metrics' inside chief-only code"):
            trainer.train_results()
    assert trainer.train_results()["loss"] > 0  # Outside the block it is allowed again.


def test_stop_vote_counts_the_collectives_since_the_last_vote():
    steps = Lockstep()
    steps.stop_vote(None)
    lockstep.collective("a")
    lockstep.collective("b")
    sequence = lockstep._SEQUENCE  # pylint: disable=protected-access
    count, digest = sequence.count, sequence.digest
    assert count == 2  # The vote counts itself in the window it closes.
    lockstep.collective("b")
    lockstep.collective("a")
    steps.stop_vote(None)
    lockstep.collective("b")
    lockstep.collective("a")
    assert sequence.count == 2 and sequence.digest != digest  # Order matters.
    assert steps.stop_vote("SIGTERM") == "SIGTERM" and sequence.count == 0


def test_progress_mode_is_decided_from_shared_values(monkeypatch):
    assert Lockstep().progress_mode("log") == "log"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert Lockstep(is_chief=True).progress_mode("auto") == "bar"
    # A non-chief's own terminal does not count: only the chief draws.
    assert Lockstep(is_chief=False).progress_mode("auto") == "log"


def test_fail_together_alone_raises_at_once():
    error = LockstepError("the check failed")
    with pytest.raises(LockstepError) as raised:
        Lockstep().fail_together(error, name="check")  # No peer: no farewell, no signal change.
    assert raised.value is error


LEAVING = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from trainer.loop.preemption import PreemptionWatcher
    from trainer.runtime import lockstep

    # As in the fit loop: the check fails inside the watcher's block, and the error unwinds it.
    with PreemptionWatcher():
        lockstep._record_stop_signals()
    os.kill(os.getpid(), signal.SIGTERM)  # What the launcher sends when the peer left.
    print("survived, printing the error line", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # A second one ends it.
    print("not reached", flush=True)
''')


def test_worker_leaving_with_an_error_survives_the_first_sigterm():
    # The peer that exits first makes trainer.launch (and mpirun) SIGTERM this worker at once;
    # it must still print its own error line. PreemptionWatcher's exit must not undo that.
    result = subprocess.run([sys.executable, "-c", LEAVING.format(root=str(ROOT))],
                            capture_output=True, text=True, timeout=60, env=_env())
    assert result.stdout == "survived, printing the error line\n", result.stderr[-2000:]
    assert result.returncode == -signal.SIGTERM


# ---------------------------------------------------------------- two real workers

DRIVER = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {root!r})
    from tests.conftest import small_config
    from trainer.runtime import devices, distribution, lockstep
    from trainer.runtime.lockstep import Lockstep, LockstepError

    config = small_config(distribution="multi_worker")
    cluster = distribution.setup(config, devices.select_device("cpu", policy="float32"))
    steps = Lockstep.of(cluster)
    assert steps.stop_vote(None) is None
    # Worker 1 registers its collectives in another order than worker 0: the digest differs.
    names = ["x", "y"] if cluster.worker_index == 0 else ["y", "x"]
    for name in names:
        lockstep.collective(name)
    try:
        steps.stop_vote(None)
    except LockstepError as error:
        print("caught:", error)
        sys.exit(3)
    print("not caught")
''')


def test_workers_that_ran_different_collectives_are_stopped_by_the_vote(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=str(ROOT)))
    result = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--", str(script)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=_env())
    assert result.stdout.count("caught: the workers ran different collectives") == 2, \
        result.stdout[-3000:]
    assert result.returncode == 3


def _readme_commands(prefix: str) -> list:
    """The shell lines of README.md and docs/distributed.md that start with ``prefix``
    (continuations joined, comments dropped); tests/test_docs.py leaves these to this file."""
    lines = []
    for page in ("README.md", "docs/distributed.md"):
        text = (ROOT / page).read_text().replace("\\\n", " ")
        lines += [re.sub(r"\s+", " ", re.sub(r"\s+#.*$", "", line)).strip()
                  for line in text.splitlines() if line.strip().startswith(prefix)]
    return lines


def _as_runnable(command: str) -> list:
    words = shlex.split(command)
    return [sys.executable if w in ("python", "python3") else w for w in words]


MPIRUN = shutil.which("mpirun")


@pytest.mark.skipif(MPIRUN is None, reason="Open MPI's mpirun is not installed (make setup)")
def test_readme_mpirun_command_with_default_flags():
    """The README's CPU mpirun launch, as written, plus small sizes: ranks' stdout are ptys,
    so --progress=auto draws a bar on the chief; every worker reads the metrics with it."""
    commands = [c for c in _readme_commands("mpirun ") if "--device=hpu" not in c]
    assert commands, "README shows no CPU mpirun command"
    for command in commands:
        words = _as_runnable(command)
        if os.geteuid() == 0 and "--allow-run-as-root" not in words:
            words.insert(1, "--allow-run-as-root")
        result = subprocess.run(words + list(SMALL_SIZES), cwd=ROOT,
                                capture_output=True, text=True, timeout=300, env=_env())
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{command}\n{output[-3000:]}"
        workers = _workers(result.stdout)
        assert sorted(workers) == [0, 1] and workers[0] == workers[1], output[-3000:]


def test_readme_launcher_command_with_default_flags():
    commands = _readme_commands("python -m trainer.launch")
    assert commands, "README shows no trainer.launch command"
    for command in commands:
        result = subprocess.run(_as_runnable(command) + list(SMALL_SIZES),
                                cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}"
        workers = _workers(result.stdout)
        assert sorted(workers) == [0, 1] and workers[0] == workers[1], result.stdout[-3000:]


def test_progress_bar_rerun_of_a_finished_job_and_more_epochs(tmp_path):
    model_dir = tmp_path / "run"
    args = (*SMALL, "--distribution=multi_worker", f"--model_dir={model_dir}")
    # 1. A progress bar: only the chief draws it, every worker reads the metrics for it.
    first = _launch(*args, "--progress=bar")
    assert first.returncode == 0, first.stdout[-3000:]
    done = _workers(first.stdout)
    assert sorted(done) == [0, 1] and done[0] == done[1] and done[0][0] == 14
    # The Progbar's final line for the epoch (Keras 3 draws the count in bold).
    assert re.search(r"14/14(\x1b\[0m)? ", first.stdout)

    # 2. The same command again: nothing to train, nothing on disk changes.
    def snapshot():
        return sorted((str(p.relative_to(model_dir)), p.stat().st_mtime_ns, p.stat().st_size)
                      for p in model_dir.rglob("*") if p.is_file())

    before = snapshot()
    again = _launch(*args, "--progress=bar")
    assert again.returncode == 0, again.stdout[-3000:]
    assert "already at step 14, the final step of --epochs=1" in again.stdout
    assert _workers(again.stdout) == done
    assert snapshot() == before

    # 3. More epochs: resumes at step 14 and trains on to 28, workers in step.
    more = _launch(*[a for a in args if not a.startswith("--epochs")], "--epochs=2",
                   "--progress=log")
    assert more.returncode == 0, more.stdout[-3000:]
    assert "resuming from" in more.stdout and "at step 14" in more.stdout
    workers = _workers(more.stdout)
    assert workers[0] == workers[1] and workers[0][0] == 28
