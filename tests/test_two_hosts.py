"""Two machines, simulated: one worker per network namespace, joined by a veth pair.

Each worker sees only its own address (10.200.0.1 or 10.200.0.2) and reaches its peer over
the veth link, as on two boxes. They are configured the way a user on two boxes would:
``--worker_hosts=10.200.0.1:1,10.200.0.2:1`` and the rank variables ``mpirun -H`` would give
(``OMPI_COMM_WORLD_*``), from which each builds its own TF_CONFIG. Needs root and ``ip``
(Debian's iproute2); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest
from conftest import ROOT

IP = shutil.which("ip")
ADDRESSES = ("10.200.0.1", "10.200.0.2")
WORKER_HOSTS = ",".join(f"{address}:1" for address in ADDRESSES)  # One slot on each host.
BASE_PORT = 2410  # Habana's multi-box default; each namespace has its own ports.
TRAIN_ARGS = ("--dataset=synthetic", "--synthetic_examples=256", "--batch_size=32",
              "--model_args=units=16", "--epochs=1", "--validation_split=0", "--policy=float32",
              "--device=cpu", "--progress=log", "--seed=5")
WORKER_LINE = re.compile(r"^worker (\d)/2[^:]*: global_step (\d+) weights_checksum (\S+)$", re.M)
# Names the launchers set: a worker must see only the variables its own "mpirun" gave it.
CLUSTER_VARS = ("TF_CONFIG", "OMPI_COMM_WORLD_", "HOROVOD_", "TRAINER_")


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two namespaces joined by a veth pair; yields [(namespace, link)] for host 0 and 1."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if IP is None:
        pytest.skip("no `ip` command: install Debian's iproute2 (apt-get install iproute2)")
    tag = uuid.uuid4().hex[:6]  # Unique per run: interface names are at most 15 characters.
    namespaces = [f"trn{tag}h0", f"trn{tag}h1"]
    links = [f"vtr{tag}h0", f"vtr{tag}h1"]
    created = []
    try:
        for namespace in namespaces:
            result = _ip("netns", "add", namespace)
            if result.returncode:
                pytest.skip(f"cannot create a network namespace here: {result.stderr.strip()}")
            created.append(namespace)
        steps = [("link", "add", links[0], "type", "veth", "peer", "name", links[1])]
        for namespace, link, address in zip(namespaces, links, ADDRESSES):
            steps += [("link", "set", link, "netns", namespace),
                      ("-n", namespace, "addr", "add", f"{address}/24", "dev", link),
                      ("-n", namespace, "link", "set", link, "up"),
                      ("-n", namespace, "link", "set", "lo", "up")]
        for step in steps:
            result = _ip(*step)
            if result.returncode:
                pytest.skip(f"cannot set up the veth link (ip {' '.join(step)}): "
                            f"{result.stderr.strip()}")
        yield list(zip(namespaces, links))
    finally:
        # Deleting a namespace deletes the veth end in it, and with it the peer.
        for namespace in created:
            _ip("netns", "delete", namespace)
        if _ip("link", "show", links[0]).returncode == 0:  # Never moved into a namespace.
            _ip("link", "delete", links[0])


def _bytes_sent(namespace: str, link: str) -> int:
    """Bytes ``link`` in ``namespace`` has sent: traffic that crossed to the other host."""
    result = _ip("-n", namespace, "-j", "-s", "link", "show", link)
    return json.loads(result.stdout)[0]["stats64"]["tx"]["bytes"]


def _worker_env(rank: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARS)}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2",
               OMPI_COMM_WORLD_LOCAL_RANK="0", OMPI_COMM_WORLD_LOCAL_SIZE="1")
    return env


def test_one_worker_on_each_of_two_hosts_trains_in_sync(tmp_path, two_hosts):
    metrics = [tmp_path / f"host{rank}.json" for rank in range(2)]
    procs = []
    try:
        for rank, (namespace, _) in enumerate(two_hosts):
            procs.append(subprocess.Popen(
                [IP, "netns", "exec", namespace, sys.executable, "run.py", *TRAIN_ARGS,
                 "--distribution=multi_worker", f"--worker_hosts={WORKER_HOSTS}",
                 f"--base_port={BASE_PORT}", f"--metrics_file={metrics[rank]}"],
                cwd=ROOT, env=_worker_env(rank), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True))
        # Bounded: about 8 s on the 2-core machine; a worker that cannot reach its peer
        # would otherwise wait for TensorFlow's registration timeout.
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    sent = [_bytes_sent(*host) for host in two_hosts]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"host {rank}:\n{output[-3000:]}"
    lines = [WORKER_LINE.findall(output) for output in outputs]
    assert [len(found) for found in lines] == [1, 1], outputs
    (index0, step0, checksum0), (index1, step1, checksum1) = lines[0][0], lines[1][0]
    assert (index0, index1) == ("0", "1")  # Ranks from OMPI_COMM_WORLD_RANK.
    assert int(step0) == int(step1) == 256 // 32  # One epoch of full global batches.
    assert float(checksum0) == float(checksum1)  # All-reduced gradients: identical weights.
    assert " (chief)" in re.search(r"^worker 0/2.*$", outputs[0], re.M).group(0)
    # Every step's gradients crossed the link: a 2-worker ring all-reduce sends each worker's
    # half twice (reduce-scatter, all-gather), 4 bytes per float32 parameter in all. Measured:
    # about 1.2x (host 1) and 1.5x (host 0, which also broadcasts the initial weights) of it.
    params = int(re.search(r"model: \S+ \(([\d,]+) parameters\)", outputs[0]).group(1)
                 .replace(",", ""))
    assert min(sent) >= int(step0) * 4 * params, (sent, params)
    # Only the chief writes its metrics file; it reports the same run.
    chief = json.loads(metrics[0].read_text())
    assert not metrics[1].exists()
    assert chief["num_workers"] == 2
    assert (chief["global_step"], chief["weights_checksum"]) == (int(step0), float(checksum0))
