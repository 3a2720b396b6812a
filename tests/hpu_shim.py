"""Test-only: Habana's real ``HPUStrategy`` on the CPU, for a machine without a Gaudi card.

:func:`install` replaces two things in habana-tensorflow's ``distribution._hpu_strategy`` module
and nothing else:

- ``HabanaCollectiveAllReduceExtended._initialize_local_devices``: the one local device is
  ``/device:CPU:0`` instead of ``/device:HPU:0`` (no card, no HPU device);
- ``comm_init``: skipped. It places Habana's communicator handshake ops on the HPU, and those
  exist only once the bridge has loaded on a card.

Everything else HPUStrategy does still runs, from Habana's code: the cluster from
``TF_CONFIG``, relabelling its class as ``CollectiveAllReduceStrategy``,
``_stop_check_health_thread()``, ``experimental_enable_get_next_as_optional = False``,
``install_allcompare()``, its dataset distribution, and TensorFlow's collective all-reduce.

Run as a script, it is one worker of a multi-worker job (started by ``trainer.launch``) that
trains through ``trainer.job.run`` and writes what it saw to ``OUT_PREFIX.<rank>.json``::

    python -m trainer.launch --num_workers=2 -- tests/hpu_shim.py hpu OUT_PREFIX
    python -m trainer.launch --num_workers=2 -- tests/hpu_shim.py multi_worker OUT_PREFIX

``hpu`` builds the strategy with our ``distribution._collective_strategy('hpu')`` (so Habana's
HPUStrategy, shimmed); ``multi_worker`` with TensorFlow's MultiWorkerMirroredStrategy.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HPU_STRATEGY_MODULE = "habana_frameworks.tensorflow.distribute._hpu_strategy"

# One epoch of 256 synthetic examples in global batches of 32: 8 steps, a horizon short
# enough that two reduction orders still agree to float32 round-off (REFERENCE.md).
TRAIN_SETTINGS = dict(
    policy="float32", device="cpu", distribution="multi_worker", dataset="synthetic",
    synthetic_examples=256, batch_size=32, epochs=1, model_args={"units": 16},
    steps_per_loop=4, validation_split=0.0, seed=7, deterministic=True, verbose=False,
    progress="none")


def install() -> None:
    """Points Habana's HPUStrategy at this process's CPU and skips its HPU handshake."""
    import importlib

    hpu_strategy = importlib.import_module(HPU_STRATEGY_MODULE)

    def cpu_local_devices(self, cluster_resolver, worker_device):
        del self, cluster_resolver
        return (f"{worker_device}/device:CPU:0",), "CPU"

    hpu_strategy.HabanaCollectiveAllReduceExtended._initialize_local_devices = cpu_local_devices
    hpu_strategy.comm_init = lambda num_replicas_in_sync: None


def _observe_health_check_stops() -> list:
    """Records each call of TF's ``_stop_check_health_thread`` (it still runs).

    Our distribute module configures TensorFlow's coordination service, which already turns
    the Python health check off, so no thread is running either way; the record shows that
    HPUStrategy's own stop call ran.
    """
    from tensorflow.python.distribute import collective_all_reduce_strategy as collective

    calls = []
    real_stop = collective.CollectiveAllReduceExtended._stop_check_health_thread

    def stop(self):
        calls.append(type(self).__name__)
        real_stop(self)

    collective.CollectiveAllReduceExtended._stop_check_health_thread = stop
    return calls


def main(argv) -> int:
    kind, out_prefix = argv
    sys.path.insert(0, ROOT)
    from trainer import job
    from trainer.config import TrainConfig
    from trainer.runtime import distribution

    if kind == "hpu":
        install()
    stops = _observe_health_check_stops()
    record = {}
    real_collective_strategy = distribution._collective_strategy

    def collective_strategy(requested: str):
        del requested  # 'multi_worker': the config trains on the CPU.
        strategy = real_collective_strategy(kind)
        extended = strategy.extended
        record.update(
            strategy_class=type(strategy).__name__,
            extended_class=type(extended).__name__,
            local_devices=list(extended.worker_devices),
            num_replicas_in_sync=strategy.num_replicas_in_sync,
            get_next_as_optional=extended.experimental_enable_get_next_as_optional,
            health_check_stops_at_creation=len(stops),
            health_thread_running=getattr(extended, "_check_health_thread", None) is not None)
        record["strategy"] = strategy
        return strategy

    distribution._collective_strategy = collective_strategy
    summary = job.run(TrainConfig(**TRAIN_SETTINGS))
    extended = record.pop("strategy").extended
    record.update(
        get_next_as_optional_after_run=extended.experimental_enable_get_next_as_optional,
        health_thread_running_after_run=getattr(extended, "_check_health_thread", None)
        is not None,
        **{key: summary[key] for key in ("global_step", "weights_checksum", "test_loss",
                                         "test_accuracy", "num_workers", "skipped_steps")})
    with open(f"{out_prefix}.{os.environ['TRAINER_RANK']}.json", "w") as f:
        json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
