"""Distribution: which tf.distribute strategy a run uses and whether this process is the chief.

``--distribution``:
  none          TensorFlow's default strategy (one device).
  mirrored      ``tf.distribute.MirroredStrategy`` over this machine's GPUs.
  multi_worker  ``tf.distribute.MultiWorkerMirroredStrategy``, one process per device, the
                cluster from ``TF_CONFIG`` (derived from mpirun's or Horovod's rank variables
                plus ``--worker_hosts`` and ``--base_port`` when not set).
  hpu           Habana's ``HPUStrategy`` (MultiWorkerMirrored with one Gaudi card per process).
  auto          hpu for several HPU workers, multi_worker when a cluster is configured,
                mirrored with several GPUs, else none.

Call :func:`prepare` before any TensorFlow op (before device selection: Habana's bridge reads
``HLS_MODULE_ID`` when it loads), then :func:`setup` once the device is known. A
multi-worker strategy must be created before the first TensorFlow op runs in the process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import re
import threading
import time
from typing import Iterator, MutableMapping, Optional

from trainer.compat import tf
from trainer.errors import UserError, warn
from trainer.runtime import devices, lockstep, worker_env

HABANA_STRATEGY_MODULE = "habana_frameworks.tensorflow.distribute"
# A collective that waits longer than this for a peer fails (DeadlineExceeded) instead of
# hanging: generous, because the first collective also waits for every worker to start.
COLLECTIVE_TIMEOUT_S = 600
# TensorFlow's coordination service declares a worker dead after this long without a
# heartbeat. Its default (10 s) fails healthy jobs on a busy machine (seen with two workers on
# two shared cores); a dead worker is still noticed at once by its peers' broken connections
# and by the launcher (trainer.launch, mpirun).
HEARTBEAT_TIMEOUT_S = 60
# A dead peer that this worker is not waiting on a connection to (the chief waits for the
# others' requests) is otherwise noticed only after the heartbeat timeout: probe them this often.
PEER_CHECK_S = 2
# How long a worker waits for every other worker to join the cluster before it fails.
# TensorFlow's default is one hour; ours keeps a worker that died at start-up from holding the
# others for more than a minute. Slow starters (many hosts, slow file systems) can have more
# with TRAINER_REGISTER_TIMEOUT_S.
REGISTER_TIMEOUT_S = 50


class WorkerLostError(UserError):
    """Another worker of the job died; this one stops instead of waiting forever."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in the job.

    Attributes:
      strategy: the tf.distribute strategy to train under.
      is_chief: only the chief writes checkpoints, summaries and the metrics file.
      num_workers: processes in the job.
      worker_index: this process's index (0 is the chief).
      kind: the resolved distribution ('none', 'mirrored', 'multi_worker' or 'hpu').
    """

    strategy: tf.distribute.Strategy
    is_chief: bool = True
    num_workers: int = 1
    worker_index: int = 0
    kind: str = "none"


def _wants_habana(config) -> bool:
    return (config.distribution == "hpu" or config.device == "hpu"
            or (config.device == "auto" and devices.habana_available()))


def prepare(config, env: Optional[MutableMapping[str, str]] = None) -> None:
    """Sets up this process's environment before TensorFlow initialises; idempotent.

    Derives ``TF_CONFIG`` from the launcher's rank variables (unless already set), gives each
    local rank its own Gaudi card and refuses Habana's graph-rewrite bf16 mode together with a
    Keras mixed policy.

    Raises:
      UserError: a conflicting setting, a bad ``--worker_hosts``, or a launcher-started job
        with a single-process ``--distribution``.
    """
    env = os.environ if env is None else env
    if env.get("TF_BF16_CONVERSION", "0") not in ("", "0") and config.policy != "float32":
        raise UserError(
            f"TF_BF16_CONVERSION={env['TF_BF16_CONVERSION']!r} turns on Habana's graph-rewrite "
            f"bf16 mode, which must not be combined with the Keras policy {config.policy}; "
            "unset TF_BF16_CONVERSION (the Keras policy already computes in bf16) or use "
            "--policy=float32 with it")
    rank = worker_env.launcher_rank(env)
    if rank is None:
        return
    if rank.size > 1 and config.distribution in ("none", "mirrored"):
        raise UserError(
            f"{rank.source} started {rank.size} workers but --distribution={config.distribution} "
            "trains each of them alone; use --distribution=multi_worker (hpu on Gaudi, or auto)")
    if "TF_CONFIG" not in env and rank.size > 1:
        env["TF_CONFIG"] = json.dumps(worker_env.derive_tf_config(
            rank, worker_hosts=config.worker_hosts, base_port=config.base_port))
    if _wants_habana(config):
        worker_env.habana_module_env(env, rank.local_rank, rank.local_size)


def resolve(distribution: str, device_kind: str, env=None) -> str:
    """The distribution 'auto' stands for here; other values are returned unchanged."""
    if distribution != "auto":
        return distribution
    env = os.environ if env is None else env
    workers = _configured_workers(env)
    if device_kind == "hpu":
        return "hpu" if workers > 1 else "none"
    if workers > 1 or "TF_CONFIG" in env:
        return "multi_worker"
    if device_kind == "gpu" and len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "none"


def _configured_workers(env) -> int:
    if env.get("TF_CONFIG"):
        tf_config = worker_env.read_tf_config(env["TF_CONFIG"])
        return sum(len(tasks) for job, tasks in tf_config["cluster"].items()
                   if job in ("chief", "worker"))
    rank = worker_env.launcher_rank(env)
    return rank.size if rank else 1


def setup(config, device) -> Cluster:
    """Builds the strategy ``config.distribution`` asks for on ``device``.

    Raises:
      UserError: a distribution the device cannot use, a busy port, or a global batch size
        that does not split evenly across the replicas.
    """
    prepare(config)
    kind = resolve(config.distribution, device.kind)
    if kind == "none":
        return Cluster(strategy=tf.distribute.get_strategy())
    if kind == "mirrored":
        if device.kind == "hpu":
            raise UserError("--distribution=mirrored drives several GPUs from one process; on "
                            "Gaudi run one process per card with --distribution=hpu under mpirun")
        strategy = tf.distribute.MirroredStrategy()
        _check_batch(config.batch_size, strategy.num_replicas_in_sync)
        return Cluster(strategy=strategy, kind=kind)
    if kind == "hpu" and device.kind != "hpu":
        raise UserError(f"--distribution=hpu needs Habana's HPU device, but this run uses "
                        f"{device.kind}; pass --device=hpu, or --distribution=multi_worker")
    # Fail before joining the cluster (which waits for every worker): one device per process on
    # CPU and HPU, every local GPU otherwise.
    local = len(tf.config.list_physical_devices("GPU")) if device.kind == "gpu" else 1
    _check_batch(config.batch_size, _configured_workers(os.environ) * max(local, 1))
    if os.environ.get("TF_CONFIG"):
        tf_config = worker_env.read_tf_config(os.environ["TF_CONFIG"])
        worker_env.check_port_free(worker_env.own_address(tf_config))
        exposed = worker_env.exposure_warning(tf_config, os.environ)
        if exposed:
            warn(exposed)
    lockstep.fault_point("setup")
    try:
        strategy = _collective_strategy(kind)
    except tf.errors.DeadlineExceededError as error:
        raise UserError(_not_joined(error)) from None
    _check_batch(config.batch_size, strategy.num_replicas_in_sync)
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    jobs = resolver.cluster_spec().as_dict()
    num_workers = sum(len(jobs.get(job, ())) for job in ("chief", "worker")) or 1
    if task_type is None:  # No TF_CONFIG: a single local worker.
        is_chief, index = True, 0
    else:
        is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0
                                            and "chief" not in jobs)
        index = task_id + (1 if task_type == "worker" and "chief" in jobs else 0)
    if num_workers > 1 and kind != "hpu":
        # Not under HPUStrategy: Habana turns TensorFlow's own peer probing off on purpose
        # (its collectives run over HCCL, not the gRPC links the probe checks).
        _watch_peers(jobs, own=(task_type, task_id))
    return Cluster(strategy=strategy, is_chief=is_chief, num_workers=num_workers,
                   worker_index=index, kind=kind)


def input_context(strategy: tf.distribute.Strategy) -> tf.distribute.InputContext:
    """This process's place among the job's input pipelines (one per worker).

    Read from the strategy's cluster (the same rule as :func:`setup`'s worker index), so a
    Trainer built with any strategy knows which share of sharded files is its own.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if resolver is None or task_type is None:
        return tf.distribute.InputContext(1, 0, strategy.num_replicas_in_sync)
    jobs = resolver.cluster_spec().as_dict()
    workers = sum(len(jobs.get(job, ())) for job in ("chief", "worker")) or 1
    index = resolver.task_id + (1 if task_type == "worker" and "chief" in jobs else 0)
    return tf.distribute.InputContext(workers, index, strategy.num_replicas_in_sync)


def _watch_peers(jobs: dict, *, own) -> None:
    """Aborts this worker's collectives as soon as a peer's process is gone.

    TensorFlow's own probe (MultiWorkerMirroredStrategy's health thread) is off under the
    coordination service, whose heartbeat takes up to HEARTBEAT_TIMEOUT_S; a dead peer's port
    refuses at once. The blocked collective then raises UnavailableError, which
    :func:`worker_failures_as_errors` turns into one line. Three failed probes in a row count.
    """
    from tensorflow.python.eager import context  # pylint: disable=g-direct-tensorflow-import

    peers = [f"/job:{job}/replica:0/task:{i}" for job in ("chief", "worker")
             for i in range(len(jobs.get(job, ()))) if (job, i) != own]
    down = (tf.errors.UnavailableError, tf.errors.FailedPreconditionError,
            tf.errors.DeadlineExceededError)

    def watch() -> None:
        while True:
            time.sleep(PEER_CHECK_S)
            for peer in peers:
                for _ in range(3):
                    try:
                        context.context().check_collective_ops_peer_health(
                            peer, timeout_in_ms=10_000)
                        break
                    except down as error:
                        last = error
                else:
                    context.context().abort_collective_ops(
                        tf.errors.UNAVAILABLE,
                        f"worker {peer.rpartition(':')[2]} is gone ({type(last).__name__})")
                    return

    threading.Thread(target=watch, name="peer-watch", daemon=True).start()


def _collective_strategy(kind: str) -> tf.distribute.Strategy:
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=COLLECTIVE_TIMEOUT_S)
    if kind == "hpu":
        # After load_habana_module() (device selection did that); one card per process.
        strategy_cls = importlib.import_module(HABANA_STRATEGY_MODULE).HPUStrategy
        accepts = inspect.signature(strategy_cls).parameters
        kwargs = {"communication_options": options} if "communication_options" in accepts else {}
    else:
        strategy_cls = tf.distribute.MultiWorkerMirroredStrategy
        kwargs = {"communication_options": options}
    _configure_coordination_service()
    # With TF_CONFIG set this raises "Collective ops must be configured at program startup"
    # if the TensorFlow runtime already started (any op, or listing *logical* devices).
    return strategy_cls(**kwargs)


def register_timeout_s() -> float:
    """Seconds a worker waits for all the others to join (TRAINER_REGISTER_TIMEOUT_S)."""
    return float(os.environ.get("TRAINER_REGISTER_TIMEOUT_S", REGISTER_TIMEOUT_S))


def _not_joined(error) -> str:
    """One line for a cluster that did not assemble: which workers never joined, and where."""
    cluster = worker_env.read_tf_config(os.environ["TF_CONFIG"])["cluster"]
    message = error.message or ""
    if "Wait_for_all_tasks_to_register" in message:  # This worker leads; the others are late.
        lists = re.findall(r"timed out task names:\s*((?:/job:\w+/replica:0/task:\d+\s*)+)",
                           message)
        missing = sorted({(job, int(task)) for names in lists for job, task in
                          re.findall(r"/job:(\w+)/replica:0/task:(\d+)", names)})
    else:  # This worker could not register with the leader, task 0.
        missing = [("chief" if "chief" in cluster else "worker", 0)]
    named = ", ".join(f"{job} {task} ({cluster[job][task]})" for job, task in missing
                      if task < len(cluster.get(job, ()))) or "another worker"
    return (f"{named} did not join this job within {register_timeout_s():g} s; start every "
            "worker of the job (same cluster in TF_CONFIG / --worker_hosts) and check that its "
            "address is reachable from here and its port open, or give slow starters more time "
            "with TRAINER_REGISTER_TIMEOUT_S")


def _configure_coordination_service() -> None:
    """What MultiWorkerMirroredStrategy would configure, with a longer heartbeat timeout.

    The strategy leaves an already configured coordination service alone. There is no public
    API for the timeout (ParameterServerStrategy sets it the same way).
    """
    from tensorflow.python.eager import context  # pylint: disable=g-direct-tensorflow-import

    ctx = context.context()
    if not os.environ.get("TF_CONFIG") or ctx.coordination_service is not None:
        return
    cluster = worker_env.read_tf_config(os.environ["TF_CONFIG"])["cluster"]
    jobs = [job for job in ("chief", "worker") if cluster.get(job)]
    if not jobs:
        return
    proto = context.coordination_config_pb2
    ctx.configure_coordination_service(
        service_type="standalone", service_leader=f"/job:{jobs[0]}/replica:0/task:0",
        heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_S * 1000,
        cluster_register_timeout_in_ms=int(register_timeout_s() * 1000),
        coordinated_jobs=[proto.CoordinatedJob(name=job, num_tasks=len(cluster[job]))
                          for job in jobs])
    # Registration as a barrier: every task waits at most the register timeout for all the
    # others (without it the leader waits in WaitForAllTasks, whose timeout is a fixed hour).
    # TF 2.15 has no such field: there only a follower's wait is bounded.
    config = ctx.coordination_service
    if "cluster_register_with_barrier" in config.DESCRIPTOR.fields_by_name:
        config.cluster_register_with_barrier = True


def _check_batch(batch_size: int, replicas: int) -> None:
    if batch_size % replicas:
        lower = batch_size - batch_size % replicas
        raise UserError(
            f"--batch_size={batch_size} is the global batch and must split evenly across the "
            f"{replicas} replicas; use a multiple of {replicas}, e.g. --batch_size={lower or replicas}"
            f" or --batch_size={lower + replicas}")


def worker_line(cluster: Cluster, summary: dict) -> str:
    """One line per worker at the end of a multi-worker run (equal checksums: in sync)."""
    return (f"worker {cluster.worker_index}/{cluster.num_workers}"
            f"{' (chief)' if cluster.is_chief else ''}: global_step {summary['global_step']} "
            f"weights_checksum {summary['weights_checksum']!r}")


@contextlib.contextmanager
def worker_failures_as_errors() -> Iterator[None]:
    """Turns the errors a dead peer causes in a multi-worker job into one clear line.

    When a worker stops answering, TensorFlow aborts the collectives (its heartbeat or health
    check) and the training call raises ``UnavailableError``, or ``DeadlineExceededError``
    after :data:`COLLECTIVE_TIMEOUT_S`. Single-process runs re-raise unchanged.
    """
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError, tf.errors.AbortedError) as error:
        if not os.environ.get("TF_CONFIG") or _configured_workers(os.environ) < 2:
            raise
        lines = [line.strip() for line in (error.message or str(error)).splitlines()]
        cause = next((line for line in lines if "aborted by" in line.lower()),
                     next((line for line in lines if line and "Graph execution error" not in line),
                          type(error).__name__))
        if cause.startswith("{{function_node"):  # The traced function's name: not for a user.
            cause = cause.partition("}}")[2].strip() or type(error).__name__
        raise WorkerLostError(
            f"another worker of this job stopped responding ({type(error).__name__}: "
            f"{cause[:300]}); this worker stops too. Check the other workers' output for the "
            "cause, then restart the job (it resumes from the chief's last checkpoint when "
            "--model_dir is set)") from None
