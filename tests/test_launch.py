"""The local launcher: per-worker TF_CONFIG, prefixed output, failure handling, signals.

Workers here are tiny Python scripts, so these tests take seconds; the real two-worker
training runs are in test_distribution.py and test_two_hosts.py. The last test runs the real
run.py alone, as one worker of two whose peer never starts.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from conftest import ROOT

from trainer.runtime import launch

REPORT = """
import json, os
tf_config = json.loads(os.environ["TF_CONFIG"])
print(tf_config["task"]["index"], os.environ["TRAINER_RANK"], os.environ["TRAINER_WORLD_SIZE"],
      os.environ["TRAINER_LOCAL_RANK"], ",".join(tf_config["cluster"]["worker"]))
"""


def script(tmp_path, body: str) -> str:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_each_worker_gets_its_task_and_prefixed_output(tmp_path):
    out = io.StringIO()
    status = launch.launch([script(tmp_path, REPORT)], num_workers=3, out=out)
    assert status == 0
    lines = [line for line in out.getvalue().splitlines() if not line.startswith("[launch]")]
    assert len(lines) == 3
    by_worker = {line[:4]: line[5:].split() for line in lines}
    assert sorted(by_worker) == ["[w0]", "[w1]", "[w2]"]
    clusters = {fields[4] for fields in by_worker.values()}
    assert len(clusters) == 1  # Every worker sees the same cluster ...
    ports = [int(address.rsplit(":", 1)[1]) for address in clusters.pop().split(",")]
    assert len(set(ports)) == 3  # ... of three distinct localhost ports.
    for prefix, (task, rank, size, local_rank, _) in by_worker.items():
        assert task == rank == local_rank == prefix[2] and size == "3"


def test_base_port_gives_consecutive_ports(tmp_path):
    out = io.StringIO()
    assert launch.launch([script(tmp_path, REPORT)], num_workers=2, base_port=23900, out=out) == 0
    assert "localhost:23900,localhost:23901" in out.getvalue()


def test_failing_worker_stops_the_others(tmp_path):
    body = """
    import os, sys, time
    if os.environ["TRAINER_RANK"] == "1":
        sys.exit(3)
    time.sleep(120)  # Worker 0 would wait for its peer forever.
    """
    out = io.StringIO()
    start = time.monotonic()
    status = launch.launch([script(tmp_path, body)], num_workers=2, grace_s=5, out=out)
    assert status == 3
    assert time.monotonic() - start < 20
    text = out.getvalue()
    assert "[launch] worker 1 exited with code 3; stopping the other 1 worker(s)" in text
    assert "[launch] failed: exit status 3" in text


def test_worker_ignoring_sigterm_is_killed_after_grace(tmp_path):
    body = """
    import os, signal, sys, time
    if os.environ["TRAINER_RANK"] == "1":
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(120)
    """
    out = io.StringIO()
    start = time.monotonic()
    status = launch.launch([script(tmp_path, body)], num_workers=2, grace_s=1, out=out)
    elapsed = time.monotonic() - start
    assert status == 128 + 9  # The first failure's status: worker 1 killed by SIGKILL.
    assert elapsed < 15, elapsed
    assert "worker 1 was killed by SIGKILL" in out.getvalue()


def test_all_workers_succeed_but_one_late_failure_counts(tmp_path):
    body = """
    import os, sys, time
    time.sleep(0.3 * int(os.environ["TRAINER_RANK"]))
    sys.exit(0 if os.environ["TRAINER_RANK"] == "0" else 5)
    """
    assert launch.launch([script(tmp_path, body)], num_workers=2, out=io.StringIO()) == 5


@pytest.mark.parametrize("args, message", [
    (["--num_workers=0", "--", "run.py"], "--num_workers must be a positive integer"),
    (["--num_workers=2"], "give the command after --"),
    (["--num_workers=2", "--base_port=65535", "--", "run.py"], "--base_port=65535"),
])
def test_cli_bad_arguments(args, message):
    result = subprocess.run([sys.executable, "-m", "trainer.launch", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_exit_status_is_the_workers(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--",
         script(tmp_path, "import sys; print('hi'); sys.exit(7)")],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 7
    # The first worker to exit stops the other, which may not have printed yet; whatever
    # each printed carries its prefix.
    hi_lines = [line for line in result.stdout.splitlines() if line.endswith("hi")]
    assert hi_lines and all(line in ("[w0] hi", "[w1] hi") for line in hi_lines)


def test_worker_env_is_tf_config_json():
    env = launch.worker_env(1, ["localhost:1", "localhost:2"], base={"PATH": "/bin"})
    assert json.loads(env["TF_CONFIG"]) == {
        "cluster": {"worker": ["localhost:1", "localhost:2"]},
        "task": {"type": "worker", "index": 1}}
    assert env["PATH"] == "/bin" and env["TRAINER_LOCAL_SIZE"] == "2"


def test_worker_env_reads_back_as_the_launchers_rank():
    # What the launcher sets is what run.py's side (trainer.runtime.worker_env) reads.
    from trainer.runtime import worker_env

    env = launch.worker_env(1, ["localhost:1", "localhost:2"], base={})
    assert worker_env.launcher_rank(env) == worker_env.Rank(1, 2, 1, 2, "trainer.launch")


# ---------------------------------------------------------------- signals and a dying launcher
#
# The launcher runs as its own process here (python -m trainer.launch), the way a user or
# `timeout` signals it; its workers are tiny scripts that report "ready" and sleep.

LAUNCHER = [sys.executable, "-m", "trainer.launch"]
SLEEPER = """
import signal, sys, time
if "--ignore-sigterm" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(120)
"""
WORKER_PID = re.compile(r"\[launch\] worker (\d+): pid (\d+)")


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids, timeout: float) -> float:
    """Seconds until none of ``pids`` is alive; fails after ``timeout``."""
    start = time.monotonic()
    while any(alive(pid) for pid in pids):
        assert time.monotonic() - start < timeout, \
            f"workers {[p for p in pids if alive(p)]} still running after {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


class Launcher:
    """``python -m trainer.launch`` in a subprocess, its output collected by a thread."""

    def __init__(self, tmp_path, *flags: str, worker_args=(), stdout=None):
        path = tmp_path / "sleeper.py"
        path.write_text(textwrap.dedent(SLEEPER))
        self.proc = subprocess.Popen(
            [*LAUNCHER, "--num_workers=2", *flags, "--", str(path), *worker_args], cwd=ROOT,
            stdout=stdout or subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list = []
        self.pids: list = []
        if stdout is None:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 30) -> list:
        """Waits for both workers' "ready"; returns their pids."""
        deadline = time.monotonic() + timeout
        while sum(line.endswith("ready\n") for line in self.lines) < 2:
            assert self.proc.poll() is None, self.text
            assert time.monotonic() < deadline, f"workers not ready in {timeout} s:\n{self.text}"
            time.sleep(0.01)
        self.pids = [int(pid) for _, pid in WORKER_PID.findall(self.text)]
        assert len(self.pids) == 2, self.text
        return self.pids

    def wait(self, timeout: float) -> float:
        """Seconds until the launcher returns; fails (and cleans up) after ``timeout``."""
        start = time.monotonic()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"the launcher hung: no exit {timeout} s after the signals\n{self.text}")
        if hasattr(self, "_reader"):
            self._reader.join(timeout=5)
        return time.monotonic() - start

    def kill_all(self):
        """Test clean-up: the launcher and the workers it reported."""
        for pid in [self.proc.pid, *self.pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def launchers():
    """Starts Launchers; whatever a failing test leaves running is killed."""
    started = []

    def start(*args, **kwargs) -> Launcher:
        started.append(Launcher(*args, **kwargs))
        return started[-1]

    yield start
    for launcher in started:
        if launcher.proc.poll() is None or any(alive(pid) for pid in launcher.pids):
            launcher.kill_all()


def send_back_to_back(pid: int, first, second, gap_s: float) -> None:
    os.kill(pid, first)
    end = time.perf_counter() + gap_s  # Busy-wait: sleep() cannot wait a few microseconds.
    while time.perf_counter() < end:
        pass
    os.kill(pid, second)


# The second signal must land while the launcher is still handling the first (the old
# launcher deadlocked when it came while its handler held the output lock, a window of tens
# of microseconds): sweep the gap across it.
GAPS_S = [0, 10e-6, 20e-6, 30e-6, 40e-6, 50e-6, 70e-6, 100e-6]


@pytest.mark.parametrize("first, second", [
    (signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT),
    (signal.SIGTERM, signal.SIGINT)], ids=["TERM-TERM", "INT-INT", "TERM-INT"])
def test_two_quick_signals_stop_the_workers_and_the_launcher_returns(
        tmp_path, launchers, first, second):
    for gap in GAPS_S:
        launcher = launchers(tmp_path, "--grace_s=30")
        pids = launcher.wait_ready()
        send_back_to_back(launcher.proc.pid, first, second, gap)
        elapsed = launcher.wait(timeout=10)
        assert elapsed < 5, (gap, elapsed)
        wait_gone(pids, timeout=2)
        # The workers die of the forwarded SIGTERM, or of the SIGKILL the second signal sends.
        assert launcher.proc.returncode in (128 + signal.SIGTERM, 128 + signal.SIGKILL), \
            launcher.text
        # Said once. Two different signals pending together are handled in signal-number
        # order, so with TERM-INT either may come first.
        assert len(re.findall(r"\[launch\] received SIG(TERM|INT); stopping the workers",
                              launcher.text)) == 1, launcher.text


def test_second_signal_while_the_output_is_blocked_does_not_deadlock(tmp_path, launchers):
    # A reader that stops reading (a paused pager, a stalled log collector) blocks the
    # launcher's own writes; the old signal handler then held the output lock while it
    # waited, and a second signal deadlocked it every time.
    read_fd, write_fd = os.pipe()
    try:
        launcher = launchers(tmp_path, "--grace_s=30", stdout=write_fd)
        chunks = []
        deadline = time.monotonic() + 30
        while b"".join(chunks).count(b"ready\n") < 2:
            assert time.monotonic() < deadline and launcher.proc.poll() is None, chunks
            if select.select([read_fd], [], [], 0.1)[0]:
                chunks.append(os.read(read_fd, 65536))
        pids = launcher.pids = [int(pid) for _, pid in
                                WORKER_PID.findall(b"".join(chunks).decode())]
        # Fill the pipe through a non-blocking descriptor of our own (the launcher's stays
        # blocking): its next write blocks.
        filler = os.open(f"/proc/self/fd/{write_fd}", os.O_WRONLY | os.O_NONBLOCK)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(filler, b"." * 4096)
        os.close(filler)
        os.kill(launcher.proc.pid, signal.SIGTERM)
        time.sleep(0.5)  # The launcher is now stuck writing "received SIGTERM".
        os.kill(launcher.proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        os.close(write_fd)  # Ours; the launcher and its workers keep theirs.
        write_fd = -1

        def drain():
            while data := os.read(read_fd, 65536):
                chunks.append(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        launcher.wait(timeout=10)
        reader.join(timeout=5)
        wait_gone(pids, timeout=2)
        text = b"".join(chunks).decode()
        assert "[launch] received SIGTERM; stopping the workers" in text
        assert launcher.proc.returncode in (128 + signal.SIGTERM, 128 + signal.SIGKILL), text
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)


def test_second_signal_kills_workers_that_ignore_sigterm_at_once(tmp_path, launchers):
    launcher = launchers(tmp_path, "--grace_s=60", worker_args=["--ignore-sigterm"])
    pids = launcher.wait_ready()
    os.kill(launcher.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while "[launch] received SIGTERM" not in launcher.text:
        assert time.monotonic() < deadline, launcher.text
        time.sleep(0.01)
    time.sleep(0.3)
    assert all(alive(pid) for pid in pids)  # SIGTERM ignored, and 60 s of grace left ...
    os.kill(launcher.proc.pid, signal.SIGINT)
    elapsed = launcher.wait(timeout=10)
    assert elapsed < 3, elapsed  # ... but the second signal does not wait for it.
    wait_gone(pids, timeout=1)
    assert launcher.proc.returncode == 128 + signal.SIGKILL
    assert "[launch] received SIGINT while stopping; killing the workers" in launcher.text
    assert "[launch] failed: exit status 137" in launcher.text


def test_one_sigterm_kills_workers_that_ignore_it_after_grace(tmp_path, launchers):
    launcher = launchers(tmp_path, "--grace_s=1", worker_args=["--ignore-sigterm"])
    pids = launcher.wait_ready()
    os.kill(launcher.proc.pid, signal.SIGTERM)
    elapsed = launcher.wait(timeout=15)
    assert 1 <= elapsed < 5, elapsed
    wait_gone(pids, timeout=1)
    assert launcher.proc.returncode == 128 + signal.SIGKILL
    assert "[launch] 2 worker(s) still running 1 s after SIGTERM; killing them" in launcher.text


def test_killed_launcher_leaves_no_worker_running(tmp_path, launchers):
    # SIGKILL cannot be caught: the kernel kills the workers (PR_SET_PDEATHSIG), even ones
    # that ignore SIGTERM.
    launcher = launchers(tmp_path, worker_args=["--ignore-sigterm"])
    pids = launcher.wait_ready()
    os.kill(launcher.proc.pid, signal.SIGKILL)
    launcher.proc.wait(timeout=5)
    assert wait_gone(pids, timeout=5) < 2


def test_die_with_parent_sets_sigkill_and_kills_an_orphan(tmp_path):
    report = script(tmp_path, """
    import ctypes, signal
    value = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
    print(signal.Signals(value.value).name if value.value else "none")
    """)
    child = subprocess.run([sys.executable, report], capture_output=True, text=True, timeout=30,
                           preexec_fn=launch.die_with_parent(os.getpid()))
    assert (child.returncode, child.stdout.strip()) == (0, "SIGKILL")
    # A launcher that died between fork and prctl: the child sees another parent and dies.
    orphan = subprocess.run([sys.executable, report], capture_output=True, timeout=30,
                            preexec_fn=launch.die_with_parent(os.getpid() + 1))
    assert orphan.returncode == -signal.SIGKILL and orphan.stdout == b""


def test_cli_missing_program_is_one_line(tmp_path):
    result = subprocess.run([*LAUNCHER, "--num_workers=2", "--", str(tmp_path / "nothing")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot start ") and "No such file" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


# ---------------------------------------------------------------- a worker that never joins
#
# The real run.py (TensorFlow) as worker 0 of a 2-worker TF_CONFIG whose worker 1 is a port
# nobody listens on: what a user sees when one box's process never starts.

REGISTER_TIMEOUT_S = 15  # TRAINER_REGISTER_TIMEOUT_S for this test (the default is 50 s).
NEVER_JOINS_ARGS = ("--dataset=synthetic", "--synthetic_examples=256", "--batch_size=32",
                    "--model_args=units=16", "--epochs=1", "--validation_split=0",
                    "--progress=log", "--device=cpu")


def _registration_timeout_available() -> bool:
    from trainer.runtime import \
        distribution  # TensorFlow: imported only when this test is collected.

    return hasattr(distribution, "REGISTER_TIMEOUT_S")


def _register_barrier_available() -> bool:
    from tensorflow.python.eager import context  # pylint: disable=g-direct-tensorflow-import

    fields = context.coordination_config_pb2.CoordinationServiceConfig.DESCRIPTOR.fields_by_name
    return "cluster_register_with_barrier" in fields  # TF 2.16+, not 2.15.


@pytest.mark.skipif(not _registration_timeout_available(),
                    reason="trainer/distribution.py has no registration timeout yet (issue 8): "
                           "TensorFlow's own waits an hour for a worker that never starts")
@pytest.mark.parametrize("own_index", [0, 1], ids=["leader-alone", "follower-alone"])
def test_worker_whose_peer_never_starts_fails_within_the_timeout(own_index):
    if not _register_barrier_available():
        # Measured on TF 2.15: a follower alone still waited past 135 s with a 15 s timeout.
        pytest.skip("this TensorFlow's coordination service has no registration barrier: it "
                    "waits for missing peers for a fixed hour, whatever the timeout")
    ports = launch.free_ports(2)  # Closed again at once: the peer's port has no listener.
    addresses = [f"localhost:{port}" for port in ports]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TF_CONFIG", "OMPI_COMM_WORLD_", "HOROVOD_", "TRAINER_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", TRAINER_REGISTER_TIMEOUT_S=str(REGISTER_TIMEOUT_S),
               TF_CONFIG=json.dumps({"cluster": {"worker": addresses},
                                     "task": {"type": "worker", "index": own_index}}))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "run.py", *NEVER_JOINS_ARGS,
                             "--distribution=multi_worker"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=REGISTER_TIMEOUT_S + 120)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr[-3000:]
    # The wait itself, plus TensorFlow's start-up and its 5 s of slack for a follower.
    assert REGISTER_TIMEOUT_S <= elapsed < REGISTER_TIMEOUT_S + 60, elapsed
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    missing = addresses[1 - own_index]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: worker {1 - own_index} ({missing}) did not join this "
                                f"job within {REGISTER_TIMEOUT_S} s; "), errors[0]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- who can reach the workers
#
# A TensorFlow server listens on every interface (its ServerDef has a port, no bind address),
# unauthenticated. The launcher's workers share a private network namespace (loopback only):
# from another machine, here another network namespace joined to this one by a veth pair,
# their ports refuse, and this machine's listening sockets (what `ss -ltn` lists) hold none.

IP = shutil.which("ip")
TF_SERVER = """
import json, os, time
import tensorflow as tf
spec = json.loads(os.environ["TF_CONFIG"])
# The gRPC server a multi-worker strategy starts, without waiting for the other workers.
server = tf.distribute.Server(tf.train.ClusterSpec(spec["cluster"]), job_name="worker",
                              task_index=spec["task"]["index"], protocol="grpc", start=True)
print("ready", flush=True)
time.sleep(120)
"""
LISTENER = """
import json, os, socket, time
spec = json.loads(os.environ["TF_CONFIG"])
port = int(spec["cluster"]["worker"][spec["task"]["index"]].rpartition(":")[2])
server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
print("ready", flush=True)  # Listening on every interface, as a TensorFlow server does.
time.sleep(120)
"""
PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("connected")
except OSError as error:
    print(type(error).__name__)
"""


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def another_machine():
    """A network namespace joined to this one by a veth pair: yields (namespace, the address
    of this machine it reaches). A random /30 keeps concurrent runs apart."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if IP is None:
        pytest.skip("no `ip` command: install Debian's iproute2 (apt-get install iproute2)")
    tag = uuid.uuid4().hex[:6]
    namespace, here, there = f"trn{tag}x", f"vtr{tag}a", f"vtr{tag}b"
    net = f"10.{random.randint(201, 239)}.{random.randint(0, 255)}.{4 * random.randint(0, 63)}"
    prefix = net.rpartition(".")[0]
    base = int(net.rpartition(".")[2])
    ours, theirs = f"{prefix}.{base + 1}", f"{prefix}.{base + 2}"
    try:
        if _ip("netns", "add", namespace).returncode:
            pytest.skip("cannot create a network namespace here")
        steps = [("link", "add", here, "type", "veth", "peer", "name", there),
                 ("link", "set", there, "netns", namespace),
                 ("addr", "add", f"{ours}/30", "dev", here), ("link", "set", here, "up"),
                 ("-n", namespace, "addr", "add", f"{theirs}/30", "dev", there),
                 ("-n", namespace, "link", "set", there, "up")]
        for step in steps:
            result = _ip(*step)
            if result.returncode:
                pytest.skip(f"cannot set up the veth link (ip {' '.join(step)}): "
                            f"{result.stderr.strip()}")
        yield namespace, ours
    finally:
        _ip("netns", "delete", namespace)  # Takes the veth pair with it.
        if _ip("link", "show", here).returncode == 0:
            _ip("link", "delete", here)


def _probe(namespace: str, address: str, port: int) -> str:
    """'connected', or the error a connection from ``namespace`` got."""
    result = subprocess.run([IP, "netns", "exec", namespace, sys.executable, "-c", PROBE,
                             address, str(port)], capture_output=True, text=True, timeout=60)
    return result.stdout.strip() or result.stderr[-500:]


def _listening_ports(net_dir: str) -> dict:
    """Port -> local addresses in state LISTEN, from ``net_dir``/tcp and tcp6 (what `ss -ltn`
    reads): the sockets of the network namespace that ``net_dir`` belongs to."""
    found: dict = {}
    for name in ("tcp", "tcp6"):
        with open(os.path.join(net_dir, name)) as table:
            for row in list(table)[1:]:
                local, state = row.split()[1], row.split()[3]
                if state == "0A":  # TCP_LISTEN
                    address, _, port = local.partition(":")
                    found.setdefault(int(port, 16), []).append(address)
    return found


def _start(tmp_path, body: str, *flags: str):
    path = tmp_path / "server.py"
    path.write_text(textwrap.dedent(body))
    return subprocess.Popen([*LAUNCHER, "--num_workers=2", *flags, "--", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def _wait_ready(proc, timeout: float = 120) -> str:
    """The launcher's output up to both workers' "ready"."""
    text = ""
    deadline = time.monotonic() + timeout
    while text.count("ready\n") < 2:
        assert time.monotonic() < deadline and proc.poll() is None, text
        text += proc.stdout.readline()
    return text


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)  # Forwarded to the workers; they die of it.
    proc.communicate(timeout=30)


def test_local_job_serves_nothing_to_another_machine(tmp_path, another_machine):
    namespace, address = another_machine
    # The probe can reach what listens on every interface here: a socket of our own.
    control = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    with control:
        assert _probe(namespace, address, control.getsockname()[1]) == "connected"
    proc = _start(tmp_path, TF_SERVER)
    try:
        text = _wait_ready(proc)
        assert "[launch] network: private" in text, text
        pids = [int(pid) for _, pid in WORKER_PID.findall(text)]
        ports = [int(port) for port in re.findall(r"localhost:(\d+)", text)]
        assert len(pids) == len(ports) == 2, text
        inside = _listening_ports(f"/proc/{pids[0]}/net")
        here = _listening_ports("/proc/self/net")
        for port in ports:
            # TensorFlow's server listens on every interface (all zeros) of the workers'
            # namespace, whose only interface is loopback ...
            assert port in inside and set(inside[port]) <= {"00000000", "0" * 32}, inside
            # ... and on no address of this machine's; from another machine it refuses.
            assert port not in here, (port, here[port])
            assert _probe(namespace, address, port) == "ConnectionRefusedError"
    finally:
        _stop(proc)


def test_network_host_is_reachable_and_says_so(tmp_path, another_machine):
    namespace, address = another_machine
    proc = _start(tmp_path, LISTENER, "--network=host")
    try:
        text = _wait_ready(proc, timeout=30)
        ports = [int(port) for port in re.findall(r"localhost:(\d+)", text)]
        warning = re.search(r"^\[launch\] warning: --network=host: the workers' TensorFlow "
                            r"servers \(ports (\d+), (\d+)\) listen on every interface.*$",
                            text, re.M)
        assert warning and [int(p) for p in warning.groups()] == ports, text
        assert _probe(namespace, address, ports[0]) == "connected"
    finally:
        _stop(proc)


def test_no_private_network_is_one_warning_line(tmp_path, monkeypatch):
    def refused() -> int:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(launch, "private_network", refused)
    monkeypatch.setattr(launch, "other_interfaces", lambda: ["eth0"])
    out = io.StringIO()
    assert launch.launch([script(tmp_path, REPORT)], num_workers=2, out=out) == 0
    lines = [line for line in out.getvalue().splitlines() if "network" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "[launch] warning: cannot give the workers a private network namespace (it needs root "
        "(CAP_SYS_ADMIN)): the workers' TensorFlow servers (ports "), out.getvalue()
    assert "unshare --user --map-root-user --net" in lines[0]
