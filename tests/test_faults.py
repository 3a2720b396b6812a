"""The multi-worker fault matrix (issue 8): a worker SIGKILLed, and what the others do.

Two real ``run.py`` workers of one localhost cluster, started here (not by trainer.launch,
which would stop the survivor itself), each with its own output. ``TRAINER_FAULT_AT`` makes
the victim SIGKILL itself right before its n-th operation of a kind (see
:func:`trainer.runtime.lockstep.fault_point`). For the chief (worker 0) and a non-chief (worker 1), at
start-up, mid-loop, during a checkpoint save and during evaluation:

- the survivor exits non-zero within :data:`EXIT_BOUND_S` of the victim's death, and the last
  line of its output is its one ``error:`` line: no traceback, no gRPC dump;
- the chief's newest checkpoint is the last one completed before the fault.

Then the job is restarted (both workers, same command, no fault): it resumes from that
checkpoint and ends with exactly the global step and weights checksum of one uninterrupted
2-worker run (float32, ``--deterministic``, 24 steps), in every case (a death before the
first checkpoint restarts afresh). A busy port is checked the same way: the worker that cannot
bind says so, and the other one does not wait for it forever.

Start-up deaths are noticed by the registration timeout: these jobs run with
``TRAINER_REGISTER_TIMEOUT_S`` = :data:`REGISTER_TIMEOUT_S`, so that the survivor's wait fits
the bound; with the default (``trainer.runtime.distribution.REGISTER_TIMEOUT_S``) it waits that long.

Timings (victim's death to survivor's exit) are printed: ``pytest -rP tests/test_faults.py``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import pytest
from conftest import ROOT

from trainer.runtime import launch

EXIT_BOUND_S = 60  # The bound: the others exit within 60 s of the death.
START_BOUND_S = 180  # Start-up and training up to the fault point, on a busy machine.
RUN_BOUND_S = 240  # A whole 2-worker run.
REGISTER_TIMEOUT_S = 15  # Ample for two workers started together; well inside EXIT_BOUND_S.
# 512 examples, 25 % held out: 384 / 32 = 12 steps per epoch, 24 in all. Step loops of 4;
# a checkpoint every 4 steps, evaluation at steps 12 and 24 (before that step's checkpoint).
ARGS = ("--dataset=synthetic", "--synthetic_examples=512", "--batch_size=32",
        "--model_args=units=16", "--policy=float32", "--deterministic", "--device=cpu",
        "--progress=log", "--distribution=multi_worker", "--validation_split=0.25",
        "--epochs=2", "--steps_per_loop=4", "--checkpoint_every=4")
FINAL_STEP = 24
# Fault point -> the chief's newest complete checkpoint when it strikes (None: none yet).
LAST_SAVED = {
    "setup:1": None,  # Before joining the cluster.
    "train steps:3": 8,  # Before the loop of steps 9-12; ckpt-4 and ckpt-8 are saved.
    "checkpoint save:2": 4,  # Before writing ckpt-8.
    "evaluate:1": 8,  # The validation at step 12, before ckpt-12.
}
WORKER_LINE = re.compile(r"^worker (\d)/2[^:]*: global_step (\d+) weights_checksum (\S+)$",
                         re.M)
# What TensorFlow's C++ runtime prints about a broken collective or cluster: never for a user.
GRPC_DUMP = re.compile(r"grpc|base_collective_executor|ring_alg|coordination_service"
                       r"|context_distributed_manager|CoordinationServiceError", re.I)
# The cluster and launcher variables of the environment pytest runs in; the log level is left
# to run.py (what a user gets).
OWN_VARS = ("TF_CONFIG", "TF_CPP_MIN_LOG_LEVEL", "OMPI_COMM_WORLD_", "HOROVOD_", "TRAINER_")


class Job:
    """Two run.py workers of one localhost cluster, each writing its output to its own file."""

    def __init__(self, workdir: Path, model_dir: Path, *, fault: str = "",
                 ports: Optional[Sequence[int]] = None):
        self.ports = list(ports or launch.free_ports(2))
        addresses = [f"localhost:{port}" for port in self.ports]
        base = {k: v for k, v in os.environ.items() if not k.startswith(OWN_VARS)}
        base["TRAINER_REGISTER_TIMEOUT_S"] = str(REGISTER_TIMEOUT_S)
        if fault:
            base["TRAINER_FAULT_AT"] = fault
        self.logs = [workdir / f"w{i}.log" for i in range(2)]
        self.procs: List[subprocess.Popen] = []
        self.ended: List[Optional[float]] = [None, None]
        for index, log in enumerate(self.logs):
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "run.py", *ARGS, f"--model_dir={model_dir}"], cwd=ROOT,
                    env=launch.worker_env(index, addresses, base), stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True))

    def poll(self) -> None:
        now = time.monotonic()
        for index, proc in enumerate(self.procs):
            if self.ended[index] is None and proc.poll() is not None:
                self.ended[index] = now

    def wait_for(self, index: int, deadline: float) -> bool:
        """Polls until worker ``index`` has exited or ``deadline``; whether it exited."""
        while True:
            self.poll()
            if self.ended[index] is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def output(self, index: int) -> str:
        return self.logs[index].read_text(errors="replace")

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def tails(self) -> str:
        return "\n".join(f"--- w{i} (exit {p.returncode}):\n{self.output(i)[-3000:]}"
                         for i, p in enumerate(self.procs))


def _run(workdir: Path, model_dir: Path) -> dict:
    """Runs the job to the end; returns {worker: (global_step, checksum)} and the chief's output."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = Job(workdir, model_dir)
    try:
        deadline = time.monotonic() + RUN_BOUND_S
        finished = job.wait_for(0, deadline) and job.wait_for(1, deadline)
    finally:
        job.kill()
    assert finished and [p.returncode for p in job.procs] == [0, 0], job.tails()
    workers = {}
    for index in range(2):
        lines = WORKER_LINE.findall(job.output(index))
        assert len(lines) == 1, job.tails()
        worker, step, checksum = lines[0]
        workers[int(worker)] = (int(step), float(checksum))
    assert sorted(workers) == [0, 1], job.tails()
    return {"workers": workers, "chief_output": job.output(0)}


def _latest_step(model_dir: Path) -> Optional[int]:
    """The step of the newest checkpoint in ``model_dir`` (by its 'checkpoint' file)."""
    state = model_dir / "checkpoints" / "checkpoint"
    if not state.exists():
        return None
    match = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', state.read_text(), re.M)
    return int(match.group(1)) if match else None


def _user_lines(output: str) -> List[str]:
    """Non-empty lines, without TensorFlow's start-up lines (printed before absl is set up,
    whatever the log level) and Python warnings from inside TensorFlow."""
    lines = [line for line in output.splitlines() if line.strip()]
    return [line for line in lines
            if not re.match(r"[IW]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl|"
                            r"E\d{4} .*cuda_platform|To enable the following instructions|"
                            r".*UserWarning:|\s+warnings\.warn\(", line)]


def _check_one_error_line(output: str) -> str:
    lines = _user_lines(output)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert lines[-1] == errors[0], output[-3000:]  # Nothing after it.
    assert "Traceback" not in output, output[-3000:]
    dump = [line for line in lines[:-1] if GRPC_DUMP.search(line)]
    assert not dump, "gRPC/collective log lines in front of the user:\n" + "\n".join(dump)
    return errors[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """One 2-worker run of the same command, start to end: what every restart must match."""
    path = tmp_path_factory.mktemp("uninterrupted")
    result = _run(path, path / "model")
    workers = result["workers"]
    assert workers[0] == workers[1] and workers[0][0] == FINAL_STEP
    return workers[0]


@pytest.mark.parametrize("point", list(LAST_SAVED))
@pytest.mark.parametrize("victim", [0, 1], ids=["chief", "non-chief"])
def test_killed_worker(tmp_path, victim, point, uninterrupted):
    survivor = 1 - victim
    model_dir = tmp_path / "model"
    job = Job(tmp_path, model_dir, fault=f"w{victim}:{point}")
    try:
        died = job.wait_for(victim, time.monotonic() + START_BOUND_S)
        assert died, f"the fault never struck\n{job.tails()}"
        killed_at = job.ended[victim]
        exited = job.wait_for(survivor, killed_at + EXIT_BOUND_S)
        waited = (job.ended[survivor] or time.monotonic()) - killed_at
        print(f"w{victim} killed at {point!r}: w{survivor} exited {waited:.1f} s later "
              f"(exit {job.procs[survivor].poll()})")
    finally:
        job.kill()
    name, _, nth = point.rpartition(":")
    assert job.procs[victim].returncode == -signal.SIGKILL, job.tails()
    assert f"[fault] worker {victim} killed at {name} #{nth}" in job.output(victim)
    assert exited, f"w{survivor} still running {EXIT_BOUND_S} s after w{victim} died\n" \
                   + job.tails()
    assert job.procs[survivor].returncode not in (0, None), job.tails()
    line = _check_one_error_line(job.output(survivor))
    assert "worker" in line and "job" in line, line
    # Nothing half-written became the newest checkpoint.
    assert _latest_step(model_dir) == LAST_SAVED[point], job.tails()

    resumed = _run(tmp_path / "restart", model_dir)
    saved = LAST_SAVED[point]
    if saved is None:  # Died before any checkpoint: the restart is a fresh start.
        assert "resuming from" not in resumed["chief_output"], resumed["chief_output"]
    else:
        assert f"ckpt-{saved} at step {saved} " in resumed["chief_output"], \
            resumed["chief_output"]
    # float32, --deterministic and the step-derived input position: bit-identical weights.
    assert resumed["workers"] == {0: uninterrupted, 1: uninterrupted}


def test_busy_port_stops_both_workers(tmp_path):
    """Worker 1's port is held by another program: it says so; worker 0 stops too."""
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        ports = [launch.free_ports(1)[0], held.getsockname()[1]]
        job = Job(tmp_path, tmp_path / "model", ports=ports)
        try:
            failed = job.wait_for(1, time.monotonic() + START_BOUND_S)
            assert failed, job.tails()
            exited = job.wait_for(0, job.ended[1] + EXIT_BOUND_S)
            waited = (job.ended[0] or time.monotonic()) - job.ended[1]
            print(f"port {ports[1]} busy: w1 exited (exit {job.procs[1].returncode}), "
                  f"w0 exited {waited:.1f} s later (exit {job.procs[0].poll()})")
        finally:
            job.kill()
    line = _check_one_error_line(job.output(1))
    assert f"port {ports[1]}" in line and "already in use" in line, line
    assert job.procs[1].returncode == 1
    assert exited, f"w0 still running {EXIT_BOUND_S} s after w1 failed\n{job.tails()}"
    assert job.procs[0].returncode == 1, job.tails()
    line = _check_one_error_line(job.output(0))
    assert "worker 1" in line, line
    assert _latest_step(tmp_path / "model") is None
