"""Start N training processes on this machine, without MPI: for development and tests.

    python -m trainer.launch --num_workers=2 -- run.py --distribution=multi_worker ...

Each worker gets ``TF_CONFIG`` for a localhost cluster (worker i on port base + i) and the
``TRAINER_RANK``/``TRAINER_WORLD_SIZE``/``TRAINER_LOCAL_RANK``/``TRAINER_LOCAL_SIZE`` variables
(what ``mpirun`` gives as ``OMPI_COMM_WORLD_*``). Their output is streamed with a ``[wI]``
prefix. When one worker fails, the launcher stops the others (SIGTERM, then SIGKILL after
``--grace_s``) instead of leaving them blocked in a collective, and exits non-zero.

Stopping: SIGTERM or SIGINT (Ctrl-C) to the launcher is forwarded to the workers as SIGTERM
(run.py then saves a checkpoint and exits 0); they are killed if still running ``--grace_s``
later, or at once on a second signal. The launcher always returns. If it dies, even by
SIGKILL, the kernel kills its workers (``PR_SET_PDEATHSIG``), so none is left behind.
On several machines use ``mpirun`` instead (see docs/distributed.md).

Network (``--network``): each worker's TensorFlow gRPC server listens on every interface
(TensorFlow's ``ServerDef`` has a port but no bind address) and is unauthenticated. With
``private`` (the default) the workers share a network namespace of their own whose only
interface is its loopback, so nothing they serve is reachable from another machine (or from
this one's other namespaces). Creating it needs root (``CAP_SYS_ADMIN``); without it the
launcher says so in one ``warning:`` line and the workers share this machine's network, as
they do with ``host`` (for workers that must reach the network, e.g. to download a dataset).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

from trainer.runtime.worker_env import RANK_VARIABLES, other_interfaces

POLL_S = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.
CLONE_NEWNET = 0x40000000  # From <sched.h>.
# From <linux/sockios.h> and <net/if.h>: read and set an interface's flags; "up".
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ = struct.Struct("16sH22x")  # struct ifreq (40 bytes): the name, then ifr_flags.
NETWORKS = ("private", "host")
DOCS_NETWORK = "docs/distributed.md#who-can-reach-the-workers"


class StartError(Exception):
    """A worker's command could not be started."""


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
    # The names worker_env reads back: rank, world size, local rank, local size.
    names = RANK_VARIABLES["trainer.launch"]
    env.update(zip(names, (str(index), size, str(index), size)))
    env.update({
        "TF_CONFIG": json.dumps({"cluster": {"worker": list(addresses)},
                                 "task": {"type": "worker", "index": index}}),
        "PYTHONUNBUFFERED": "1",  # Interleave workers' lines as they happen.
    })
    return env


def _libc_function(name: str, argtypes):
    """libc's function ``name``, or None off Linux. Loaded in the launcher: the forked child
    before exec must not import or dlopen anything."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def _load_prctl():
    """libc's ``prctl``, or None off Linux."""
    return _libc_function("prctl", [ctypes.c_int] + [ctypes.c_ulong] * 4)


def _loopback_up() -> None:
    """Brings up ``lo`` in the calling thread's network namespace (a new one has it down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = IFREQ.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, IFREQ.pack(b"lo", 0)))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, IFREQ.pack(b"lo", flags | IFF_UP))


def private_network() -> int:
    """A new network namespace whose only interface, ``lo``, is up; returns a descriptor of it.

    Made by a short-lived thread: ``unshare(CLONE_NEWNET)`` moves only the calling thread, so
    the launcher (and a test process calling :func:`launch`) keeps its own network. The
    namespace lives while the descriptor or a process in it does; workers join it with
    :func:`join_network` between fork and exec.

    Raises:
      OSError: it cannot be made (EPERM without root, ENOSYS off Linux).
    """
    unshare = _libc_function("unshare", [ctypes.c_int])
    if unshare is None:
        raise OSError(errno.ENOSYS, "network namespaces are a Linux feature")
    made: dict = {}

    def make() -> None:
        try:
            if unshare(CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
            _loopback_up()
            made["fd"] = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net",
                                 os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            made["error"] = error

    thread = threading.Thread(target=make, name="private-network")
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["fd"]


def join_network(network_fd: int) -> Callable[[], None]:
    """A ``preexec_fn`` that moves the worker into the network namespace ``network_fd``.

    Raises (in the child, reported by Popen as SubprocessError):
      OSError: the kernel refused.
    """
    setns = _libc_function("setns", [ctypes.c_int, ctypes.c_int])

    def preexec() -> None:
        if setns is None or setns(network_fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    return preexec


def _network_for_workers(network: str, ports: Sequence[int]) -> Tuple[Optional[int], str]:
    """The namespace descriptor the workers join (None: this process's), and the line that
    says who can reach them (a ``warning:`` when others can)."""
    exposed = (f"the workers' TensorFlow servers (ports {', '.join(map(str, ports))}) listen "
               "on every interface of this machine, unauthenticated: anyone who can reach it "
               "can run operations in the job and read its tensors")
    if network == "host":
        if not other_interfaces():
            return None, "network: host (loopback only here: nothing is reachable from outside)"
        return None, (f"warning: --network=host: {exposed}; use it only on a trusted network "
                      f"({DOCS_NETWORK})")
    try:
        return private_network(), ("network: private (the workers' own namespace, loopback "
                                   "only: nothing they serve is reachable from another machine)")
    except OSError as error:
        if not other_interfaces():
            return None, "network: this process's, which has loopback only"
        why = error.strerror or str(error)
        if error.errno == errno.EPERM:
            why = "it needs root (CAP_SYS_ADMIN)"
        return None, (f"warning: cannot give the workers a private network namespace ({why}): "
                      f"{exposed}. Run as root, or start the launcher inside one: unshare "
                      "--user --map-root-user --net sh -c 'ip link set lo up && exec python "
                      f"-m trainer.launch ...' ({DOCS_NETWORK})")


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` after which the worker is SIGKILLed when ``parent_pid`` dies.

    SIGKILL, not SIGTERM: a worker that outlives its launcher has lost its supervisor and its
    stdout (a broken pipe: its next print fails), so a clean SIGTERM stop (run.py's preemption
    checkpoint, agreed with its peers) could not complete or be watched, and a worker that
    blocks SIGTERM or hangs in a collective would then run forever. SIGKILL is certain; the
    chief's last periodic checkpoint is whole and the job resumes from it.

    The death signal is tied to the *thread* that forked the child: call Popen from the
    launcher's main thread, which lives as long as the launcher.
    """
    prctl = _load_prctl()

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The launcher may have died between fork and prctl: then no signal would ever come.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _write(out, lock: threading.Lock, text: str) -> None:
    with lock:
        try:
            out.write(text)
            out.flush()
        except (OSError, ValueError):
            # Our output is gone (a closed pipe): carry on, so workers are still reaped and
            # their pipes drained instead of blocking them.
            pass


def _stream(index: int, pipe, out, lock: threading.Lock) -> None:
    for line in iter(pipe.readline, b""):
        _write(out, lock, f"[w{index}] {line.decode(errors='replace')}")
    pipe.close()


def _signal_all(procs, sig) -> None:
    for proc in procs:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, sig)  # The worker and anything it started.
            except ProcessLookupError:
                pass


class _Supervisor:
    """Watches the workers from the main thread and stops them, bounded in time.

    Signal handlers only append to :attr:`received`; everything else (forwarding, printing)
    happens here, outside the handler. A handler that printed would take the output lock,
    and a second signal arriving while the main thread holds it deadlocks the launcher.
    One thread per worker waits for it, appends its index to :attr:`exited` and wakes the
    main thread: the worker that failed *first* is the one reported, and the others are
    stopped at once (they usually fail because of it, a few milliseconds later).
    """

    def __init__(self, procs, grace_s: float, say: Callable[[str], None]):
        self.procs = procs
        self.grace_s = grace_s
        self.say = say
        self.received: List[int] = []  # Signal numbers, appended by the handler.
        self.exited: List[int] = []  # Worker indices in the order they exited.
        self._exit_seen = threading.Event()  # Set by the waiting threads, never by a handler.
        self._handled = 0
        self._kill_at: Optional[float] = None  # Set once the workers were sent SIGTERM.
        self._killed = False
        self.status = 0
        self._failed: Optional[int] = None  # Index of the first worker that failed.
        self._reported = False  # Its failure was already printed.

    def record(self, signum, frame) -> None:
        """The signal handler: records and returns. No lock, no I/O (see the class doc)."""
        del frame
        self.received.append(signum)

    def watch(self, index: int) -> threading.Thread:
        """Starts the thread that waits for worker ``index``."""
        def wait() -> None:
            self.procs[index].wait()
            self.exited.append(index)
            self._exit_seen.set()

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        return thread

    def _terminate(self) -> None:
        _signal_all(self.procs, signal.SIGTERM)
        self._kill_at = time.monotonic() + self.grace_s

    def _kill(self) -> None:
        _signal_all(self.procs, signal.SIGKILL)
        self._killed = True

    def _on_signals(self) -> None:
        while self._handled < len(self.received):
            name = signal.Signals(self.received[self._handled]).name
            self._handled += 1
            if self._kill_at is None:
                self._terminate()  # Before printing: output may block, stopping must not wait.
                self.say(f"received {name}; stopping the workers (SIGKILL in "
                         f"{self.grace_s:g} s, or at once on another signal)")
            elif not self._killed:
                self._kill()
                self.say(f"received {name} while stopping; killing the workers")

    def _on_exits(self, exited: List[int]) -> None:
        if self.status:
            return
        index = next((i for i in exited if self.procs[i].returncode != 0), None)
        if index is None:
            return
        code = self.procs[index].returncode
        self._failed, self.status = index, _exit_code(code)
        running = len(self.procs) - len(exited)
        if running and self._kill_at is None:
            self._terminate()
            self.say(f"worker {index} {_describe(code)}; stopping the other {running} "
                     "worker(s), which cannot continue without it")
            self._reported = True

    def run(self) -> int:
        """Waits until every worker has exited; returns the job's exit status."""
        while True:
            self._exit_seen.clear()  # Before reading: an exit after this wakes the wait below.
            self._on_signals()
            exited = list(self.exited)
            self._on_exits(exited)
            running = len(self.procs) - len(exited)
            if not running:
                break
            if self._kill_at is not None and not self._killed and time.monotonic() >= self._kill_at:
                self._kill()
                self.say(f"{running} worker(s) still running {self.grace_s:g} s after SIGTERM; "
                         "killing them")
            # A signal interrupts the wait only to run its handler: it is acted on within
            # POLL_S; an exit is acted on at once.
            self._exit_seen.wait(POLL_S)
        if self.status and not self._reported:
            self.say(f"worker {self._failed} {_describe(self.procs[self._failed].returncode)}")
        if self.status:
            self.say(f"failed: exit status {self.status}")
        return self.status


def launch(command: Sequence[str], *, num_workers: int, base_port: int = 0,
           grace_s: float = 10.0, out=None, network: str = "private") -> int:
    """Runs ``command`` as ``num_workers`` workers of one localhost cluster.

    Call it from the main thread (it handles SIGINT and SIGTERM while it runs).

    Args:
      command: the program and its arguments; a leading ``*.py`` runs under this Python.
      num_workers: processes to start.
      base_port: worker i listens on base_port + i; 0 picks free ports.
      grace_s: seconds between SIGTERM and SIGKILL when stopping workers.
      out: where the prefixed output goes (default stdout).
      network: 'private' (a network namespace of the workers' own, loopback only, when this
        process may create one; else a warning) or 'host' (this machine's network).

    Returns:
      0 when every worker succeeded (also after a SIGTERM they handled cleanly), else the
      first failing worker's exit status (128 + signal number when it was killed).

    Raises:
      StartError: a worker could not be started (e.g. no such program); none is left running.
      ValueError: ``network`` is not one of :data:`NETWORKS`.
    """
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    out = out or sys.stdout
    command = list(command)
    if command[0].endswith(".py"):
        command.insert(0, sys.executable)
    ports = (free_ports(num_workers) if base_port == 0
             else [base_port + i for i in range(num_workers)])
    addresses = [f"localhost:{port}" for port in ports]
    lock = threading.Lock()
    procs: list = []
    threads = []
    supervisor = _Supervisor(procs, grace_s, lambda message: _write(
        out, lock, f"[launch] {message}\n"))
    network_fd, network_line = _network_for_workers(network, ports)
    previous = {sig: signal.signal(sig, supervisor.record) for sig in STOP_SIGNALS}
    try:
        # Every worker is forked before any output thread starts: the preexec_fn runs
        # between fork and exec, where other threads' locks could be held.
        die = die_with_parent(os.getpid())
        join = join_network(network_fd) if network_fd is not None else None

        def preexec() -> None:
            die()
            if join is not None:
                join()

        for index in range(num_workers):
            if supervisor.received:
                break  # Stopped while starting: start no more.
            try:
                procs.append(subprocess.Popen(
                    command, env=worker_env(index, addresses), stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec))
            except OSError as error:
                raise StartError(
                    f"cannot start {command[0]!r} ({error.strerror or error}); give an "
                    "existing program after --, e.g. -- run.py --distribution=multi_worker"
                ) from None
            except subprocess.SubprocessError:  # Raised by preexec: the namespace refused it.
                raise StartError(
                    "cannot move a worker into the private network namespace; start the job "
                    "with --network=host (see " + DOCS_NETWORK + ")") from None
        supervisor.say(network_line)  # Once they started: a failed start prints one line.
        for index, proc in enumerate(procs):
            supervisor.say(f"worker {index}: pid {proc.pid}, {addresses[index]}")
            thread = threading.Thread(target=_stream, args=(index, proc.stdout, out, lock),
                                      daemon=True)
            thread.start()
            threads += [thread, supervisor.watch(index)]
        return supervisor.run()
    finally:
        # Only after an error in the launcher itself is anything still running here.
        _signal_all(procs, signal.SIGKILL)
        for proc in procs:
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for thread in threads:
            thread.join(timeout=5)
        if network_fd is not None:
            os.close(network_fd)  # The namespace goes with its last worker.


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
                        help="Seconds between SIGTERM and SIGKILL when stopping workers "
                             "(after a worker failed or the launcher got SIGTERM/SIGINT).")
    parser.add_argument("--network", choices=NETWORKS, default="private",
                        help="private: the workers in a network namespace of their own, "
                             "loopback only, so no other machine can reach their unauthenticated "
                             "TensorFlow servers (needs root; else a warning and this machine's "
                             "network); host: this machine's network (default: %(default)s).")
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
    try:
        return launch(args.command, num_workers=args.num_workers, base_port=args.base_port,
                      grace_s=args.grace_s, network=args.network)
    except StartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
