"""Where this process sits in a multi-worker job, read from the launcher's environment.

``mpirun`` (Open MPI) and Horovod tell each process its rank through environment variables;
TensorFlow's multi-worker strategies read the cluster from ``TF_CONFIG``. This module turns
the first into the second (pure functions of the environment, no TensorFlow), and sets the
per-rank Habana variables that must be in place before Habana's bridge loads.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
from typing import List, Mapping, MutableMapping, Optional, Tuple

from trainer.errors import UserError

# Launcher name -> (rank, size, local rank, local size) as it spells them.
RANK_VARIABLES = {
    "mpirun": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
               "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "horovodrun": ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
    "trainer.launch": ("TRAINER_RANK", "TRAINER_WORLD_SIZE",
                       "TRAINER_LOCAL_RANK", "TRAINER_LOCAL_SIZE"),
}
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")


@dataclasses.dataclass(frozen=True)
class Rank:
    """This process's place as the launcher reports it."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    source: str  # The launcher that set it, for error messages.


def launcher_rank(env: Mapping[str, str]) -> Optional[Rank]:
    """The rank that ``mpirun`` or Horovod gave this process, or None when neither did."""
    for launcher, names in RANK_VARIABLES.items():
        if names[0] not in env:
            continue
        values = []
        for name in names:
            text = env.get(name, "")
            if not text.strip().isdigit():
                raise UserError(f"{name}={text!r} is not a non-negative integer; it is set by "
                                "the launcher (mpirun/horovodrun), do not set it by hand")
            values.append(int(text))
        rank, size, local_rank, local_size = values
        if not (rank < size and local_rank < local_size <= size):
            raise UserError(f"inconsistent launcher variables {dict(zip(names, values))}; "
                            "start the job with mpirun or python -m trainer.launch")
        return Rank(rank, size, local_rank, local_size, launcher)
    return None


def parse_worker_hosts(text: str) -> List[Tuple[str, Optional[int]]]:
    """Parses ``--worker_hosts`` ('ip1:8,ip2:8' or 'ip1,ip2') into (host, slots or None).

    Raises:
      UserError: naming the bad entry and the expected form.
    """
    hosts = []
    for entry in text.split(","):
        entry = entry.strip()
        host, slots = entry, None
        if entry.count(":") == 1:  # 'host:slots'; more colons would be a bare IPv6 address.
            host, _, slots_text = entry.partition(":")
            if not slots_text.isdigit() or int(slots_text) < 1:
                raise UserError(
                    f"--worker_hosts entry {entry!r}: slots must be a positive integer; use a "
                    "comma list of host or host:slots, e.g. --worker_hosts=10.0.0.1:8,10.0.0.2:8")
            slots = int(slots_text)
        if not _HOST.match(host):
            raise UserError(
                f"--worker_hosts entry {entry!r} is not a host name or address; use a comma "
                "list of host or host:slots, e.g. --worker_hosts=10.0.0.1:8,10.0.0.2:8")
        hosts.append((host, slots))
    return hosts


def worker_addresses(hosts: List[Tuple[str, Optional[int]]], *, base_port: int,
                     local_size: int) -> List[str]:
    """Every worker's address in rank order: ranks fill each host's slots in turn (mpirun's
    default by-slot mapping), and the worker with local rank j listens on base_port + j."""
    addresses = []
    for host, slots in hosts:
        addresses += [f"{host}:{base_port + j}" for j in range(slots or local_size)]
    if base_port + max(slots or local_size for _, slots in hosts) - 1 > 65535:
        raise UserError(f"--base_port={base_port} plus the local rank exceeds port 65535; "
                        "choose a lower --base_port")
    return addresses


def derive_tf_config(rank: Rank, *, worker_hosts: str, base_port: int) -> dict:
    """The TF_CONFIG for ``rank``: one 'worker' task per process, task 0 the chief.

    With no ``worker_hosts`` the job must fit on this machine (one host, 'localhost').

    Raises:
      UserError: a bad host list, or one that does not match the launcher's ranks.
    """
    if worker_hosts.strip():
        hosts = parse_worker_hosts(worker_hosts)
    elif rank.size == rank.local_size:
        hosts = [("localhost", rank.local_size)]
    else:
        raise UserError(
            f"the job has {rank.size} workers but only {rank.local_size} on this machine; pass "
            "every machine with its worker count, e.g. --worker_hosts=10.0.0.1:8,10.0.0.2:8 "
            "(the same list as mpirun -H)")
    addresses = worker_addresses(hosts, base_port=base_port, local_size=rank.local_size)
    if len(addresses) < rank.size:
        raise UserError(
            f"--worker_hosts={worker_hosts!r} has {len(addresses)} worker slots but the launcher "
            f"started {rank.size} workers; list every machine with its slot count (host:slots)")
    addresses = addresses[:rank.size]
    # The host list must place this rank where the launcher did, or ports would collide.
    expected_port = base_port + rank.local_rank
    if not addresses[rank.rank].endswith(f":{expected_port}"):
        raise UserError(
            f"--worker_hosts={worker_hosts!r} puts rank {rank.rank} at {addresses[rank.rank]}, "
            f"but the launcher made it local rank {rank.local_rank} on its machine; give the "
            "hosts in mpirun's order with their slot counts (mpirun -H ip1:8,ip2:8 and "
            "--worker_hosts=ip1:8,ip2:8), with ranks mapped by slot (the default)")
    return {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": rank.rank}}


def read_tf_config(text: str) -> dict:
    """Parses and checks a TF_CONFIG value; one clear line when it is malformed."""
    try:
        tf_config = json.loads(text)
        cluster = tf_config["cluster"]
        task = tf_config["task"]
        own = cluster[task["type"]][int(task["index"])]
        host, _, port = own.rpartition(":")
        int(port)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise UserError(
            f"TF_CONFIG={text!r} is not a valid cluster description; expected JSON like "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}} '
            "or unset it and launch with mpirun / python -m trainer.launch") from None
    return tf_config


def own_address(tf_config: dict) -> str:
    """This task's 'host:port' in ``tf_config``."""
    task = tf_config["task"]
    return tf_config["cluster"][task["type"]][int(task["index"])]


def check_port_free(address: str) -> None:
    """Binds this task's port once, so a busy port is one clear line, not a gRPC trace.

    Raises:
      UserError: when another process already listens on the port.
    """
    port = int(address.rpartition(":")[2])
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: a port left in TIME_WAIT by a previous run is free for gRPC too.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("", port))
    except OSError as error:
        raise UserError(
            f"port {port} for this worker ({address}) is already in use ({error.strerror}); "
            "stop the process holding it or choose another --base_port (each machine uses "
            "base_port .. base_port + workers - 1)") from None
    finally:
        probe.close()


def other_interfaces() -> List[str]:
    """This process's network interfaces other than ``lo``: what a listener on every
    interface is reachable through."""
    return sorted(name for _, name in socket.if_nameindex() if name != "lo")


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def exposure_warning(tf_config: dict, env: Mapping[str, str]) -> Optional[str]:
    """The warning for a job all on this machine whose servers others can reach, or None.

    A TensorFlow server listens on every interface (its ``ServerDef`` has a port but no bind
    address), unauthenticated. ``python -m trainer.launch`` puts its workers in a private
    network namespace and says itself when it cannot; ranks that ``mpirun`` (or a user)
    started are each their own process by the time this runs, so they cannot be moved into
    one namespace here: say so, on the chief only (task 0 of the first job), once.
    """
    cluster = tf_config["cluster"]
    jobs = [job for job in ("chief", "worker") if cluster.get(job)]
    addresses = [address for job in jobs for address in cluster[job]]
    task = tf_config["task"]
    if (len(addresses) < 2 or RANK_VARIABLES["trainer.launch"][0] in env
            or (task["type"], int(task["index"])) != (jobs[0], 0)
            or not all(_is_loopback(a.rpartition(":")[0]) for a in addresses)
            or not other_interfaces()):
        return None
    ports = ", ".join(address.rpartition(":")[2] for address in addresses)
    return (f"the {len(addresses)} workers of this job are all on this machine, but their "
            f"TensorFlow servers (ports {ports}) listen on every interface, unauthenticated "
            "(TensorFlow cannot bind them to loopback): anyone who can reach this machine can "
            "run operations in the job. Start it in a private network namespace, e.g. as root "
            "unshare --net sh -c 'ip link set lo up && exec mpirun ...', or with python -m "
            "trainer.launch (docs/distributed.md#who-can-reach-the-workers)")


def habana_module_env(env: MutableMapping[str, str], local_rank: int, local_size: int) -> None:
    """Gives each local rank its own Gaudi card: ``HLS_MODULE_ID`` from the local rank.

    An ``HLS_MODULE_ID`` already set is kept. When ``HABANA_VISIBLE_MODULES`` lists the cards
    this job may use, local rank j takes the j-th of them.

    Raises:
      UserError: when fewer cards are visible than there are local ranks.
    """
    if "HLS_MODULE_ID" in env:
        return
    visible = [m.strip() for m in env.get("HABANA_VISIBLE_MODULES", "").split(",") if m.strip()]
    if visible:
        if len(visible) < local_size:
            raise UserError(
                f"HABANA_VISIBLE_MODULES={env['HABANA_VISIBLE_MODULES']!r} lists {len(visible)} "
                f"cards but {local_size} workers run on this machine; list one card per worker "
                "or start fewer (mpirun -np)")
        env["HLS_MODULE_ID"] = visible[local_rank]
    else:
        env["HLS_MODULE_ID"] = str(local_rank)
