"""Start N training processes on this machine, without MPI: for development and tests.

    python -m trainer.launch --num_workers=2 -- run.py --distribution=multi_worker ...

Each worker gets ``TF_CONFIG`` for a localhost cluster (worker i on port base + i) and the
``TRAINER_RANK``/``TRAINER_WORLD_SIZE``/``TRAINER_LOCAL_RANK``/``TRAINER_LOCAL_SIZE`` variables
(what ``mpirun`` gives as ``OMPI_COMM_WORLD_*``). Their output is streamed with a ``[wI]``
prefix. When one worker fails, the launcher stops the others (SIGTERM, then SIGKILL after
``--grace_s``) instead of leaving them blocked in a collective, and exits non-zero.
On several machines use ``mpirun`` instead (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

POLL_S = 0.1


def free_ports(count: int) -> List[int]:
    """``count`` distinct ports the kernel reports free right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_env(index: int, addresses: Sequence[str], base: Optional[dict] = None) -> dict:
    """The environment of worker ``index`` in a localhost cluster at ``addresses``."""
    env = dict(os.environ if base is None else base)
    size = str(len(addresses))
    env.update({
        "TF_CONFIG": json.dumps({"cluster": {"worker": list(addresses)},
                                 "task": {"type": "worker", "index": index}}),
        "TRAINER_RANK": str(index), "TRAINER_WORLD_SIZE": size,
        "TRAINER_LOCAL_RANK": str(index), "TRAINER_LOCAL_SIZE": size,
        "PYTHONUNBUFFERED": "1",  # Interleave workers' lines as they happen.
    })
    return env


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _stream(index: int, pipe, out, lock: threading.Lock) -> None:
    for line in iter(pipe.readline, b""):
        with lock:
            out.write(f"[w{index}] {line.decode(errors='replace')}")
            out.flush()
    pipe.close()


def _signal_all(procs, sig) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)  # The worker and anything it started.
            except ProcessLookupError:
                pass


def launch(command: Sequence[str], *, num_workers: int, base_port: int = 0,
           grace_s: float = 10.0, out=None) -> int:
    """Runs ``command`` as ``num_workers`` workers of one localhost cluster.

    Args:
      command: the program and its arguments; a leading ``*.py`` runs under this Python.
      num_workers: processes to start.
      base_port: worker i listens on base_port + i; 0 picks free ports.
      grace_s: seconds between SIGTERM and SIGKILL when stopping workers.
      out: where the prefixed output goes (default stdout).

    Returns:
      0 when every worker succeeded, else the first failing worker's exit status
      (128 + signal number when it was killed).
    """
    out = out or sys.stdout
    command = list(command)
    if command[0].endswith(".py"):
        command.insert(0, sys.executable)
    ports = free_ports(num_workers) if base_port == 0 else [base_port + i for i in range(num_workers)]
    addresses = [f"localhost:{port}" for port in ports]
    lock = threading.Lock()

    def say(message: str) -> None:
        with lock:
            out.write(f"[launch] {message}\n")
            out.flush()

    procs, threads = [], []
    for index in range(num_workers):
        proc = subprocess.Popen(command, env=worker_env(index, addresses), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        thread = threading.Thread(target=_stream, args=(index, proc.stdout, out, lock),
                                  daemon=True)
        thread.start()
        procs.append(proc)
        threads.append(thread)
        say(f"worker {index}: pid {proc.pid}, {addresses[index]}")

    def forward(signum, frame):
        del frame
        say(f"received {signal.Signals(signum).name}; stopping the workers")
        _signal_all(procs, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        while any(proc.poll() is None for proc in procs):
            failed = [(i, p) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                index, proc = failed[0]
                status = _exit_code(proc.returncode)
                running = [p for p in procs if p.poll() is None]
                say(f"worker {index} {_describe(proc.returncode)}; stopping the other "
                    f"{len(running)} worker(s), which cannot continue without it")
                _stop(running, grace_s)
                break
            time.sleep(POLL_S)
    finally:
        _stop(procs, grace_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for thread in threads:
            thread.join(timeout=5)
    if status == 0:
        bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
        if bad:
            status = _exit_code(bad[0][1])
            say(f"worker {bad[0][0]} {_describe(bad[0][1])}")
    if status:
        say(f"failed: exit status {status}")
    return status


def _stop(procs, grace_s: float) -> None:
    running = [p for p in procs if p.poll() is None]
    if not running:
        return
    _signal_all(running, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in running):
        time.sleep(POLL_S)
    _signal_all(running, signal.SIGKILL)
    for proc in running:
        proc.wait()


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.launch",
        description="Start N workers of one multi-worker job on this machine.",
        epilog="example: python -m trainer.launch --num_workers=2 -- run.py "
               "--distribution=multi_worker --dataset=synthetic")
    parser.add_argument("--num_workers", type=int, required=True, help="Processes to start.")
    parser.add_argument("--base_port", type=int, default=0,
                        help="Worker i listens on base_port + i (default: free ports).")
    parser.add_argument("--grace_s", type=float, default=10.0,
                        help="Seconds between SIGTERM and SIGKILL when stopping workers.")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="After --: the program and its arguments, e.g. run.py ...")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the command after --, e.g. -- run.py --distribution=multi_worker")
    if args.num_workers < 1:
        parser.error(f"--num_workers must be a positive integer, got {args.num_workers}")
    if args.base_port and not 1 <= args.base_port <= 65536 - args.num_workers:
        parser.error(f"--base_port={args.base_port}: the workers need ports base_port .. "
                     f"base_port + {args.num_workers - 1} within 1-65535")
    if args.grace_s < 0:
        parser.error(f"--grace_s must be >= 0, got {args.grace_s}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    return launch(args.command, num_workers=args.num_workers, base_port=args.base_port,
                  grace_s=args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
