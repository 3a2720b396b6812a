"""One call that runs a whole training job from a TrainConfig (what ``run.py`` calls)."""

from __future__ import annotations

from typing import Sequence, Type

from trainer import checkpoint, devices, distribute, loop, registry, reporting
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer import preemption
from trainer.actions import PeriodicAction
from trainer.preemption import PreemptionWatcher
from trainer.summaries import SummaryWriter
from trainer.trainer import Trainer


def main(config: TrainConfig) -> int:
    """What ``run.py`` calls: the audit, a policy comparison, or a training run."""
    if config.audit:
        from trainer import audit
        return audit.run(config)
    if config.compare_policies:
        from trainer import compare
        compare.run(config)
        return 0
    with distribute.worker_failures_as_errors():
        run(config)
    return 0


def run(config: TrainConfig, *, trainer_cls: Type[Trainer] = Trainer,
        actions: Sequence[PeriodicAction] = ()) -> dict:
    """Selects the device, builds the Trainer, resumes, trains, tests, writes the metrics file.

    Every check of user input (model name and arguments, device, data files, output paths,
    a model_dir from another run) happens before the first step, so a mistake costs seconds
    and changes nothing on disk.

    Args:
      config: the run's settings.
      trainer_cls: a Trainer subclass to train instead of the registered ``config.model``.
      actions: extra periodic actions (e.g. a custom logger), run on every worker after
        each step loop.

    Returns:
      The summary that ``--metrics_file`` receives (``preempted`` is set when a signal
      stopped the run early; then no metrics file is written).
    """
    if trainer_cls is Trainer:
        registry.check_model_args(config.model, config.model_args)
    if config.metrics_file:
        reporting.prepare_output_file(config.metrics_file)
    distribute.prepare(config)  # TF_CONFIG and the Gaudi card: before TensorFlow starts.
    device = devices.select_device(config.device, policy=config.policy)
    cluster = distribute.setup(config, device)
    trainer = trainer_cls(config, strategy=cluster.strategy)
    chief = cluster.is_chief
    if config.best_metric not in trainer.eval_metrics:
        raise UserError(
            f"unknown best_metric {config.best_metric!r}; this model reports "
            f"{', '.join(trainer.eval_metrics)} (--best_metric)")
    verbose = config.verbose and chief
    checkpointer = _resume(config, trainer, cluster, verbose) if config.model_dir else None
    if verbose:
        reporting.banner(device=device, config=config, trainer=trainer)
    mode = reporting.progress_mode(config.progress)
    progress = reporting.ProgressBar(trainer.datasets.steps_per_epoch, trainer.train_metrics) \
        if mode == "bar" and verbose else None
    summaries = SummaryWriter(config.model_dir, enabled=chief)
    try:
        with PreemptionWatcher() as watcher:
            result = loop.fit(
                trainer, checkpointer=checkpointer, summaries=summaries, progress=progress,
                extra_actions=actions,
                on_epoch_end=reporting.print_epoch if verbose and mode != "none" else None,
                should_stop=lambda: preemption.agree(cluster, watcher.signal_name))
    finally:
        summaries.close()
        if checkpointer is not None:
            checkpointer.close()
    step = int(trainer.global_step.numpy())
    if result.stopped_by:
        if verbose:
            where = f"; checkpoint saved in {config.model_dir}, run the same command to resume" \
                if checkpointer else " (no --model_dir: nothing saved)"
            print(f"stopped by {result.stopped_by} at step {step}{where}", flush=True)
        return {"preempted": True, "global_step": step, "stopped_by": result.stopped_by}
    test = trainer.evaluate(trainer.datasets.test)
    if verbose:
        reporting.print_test(test)
    summary = _summary(config, trainer, device, cluster, result, test)
    if config.metrics_file and chief:
        reporting.write_json(config.metrics_file, summary)
    if cluster.num_workers > 1:  # Every worker: equal checksums show the replicas stayed in sync.
        print(distribute.worker_line(cluster, summary), flush=True)
    return summary


def _resume(config: TrainConfig, trainer: Trainer, cluster, verbose: bool):
    """Checks ``config.model_dir`` belongs to this run, restores its newest checkpoint.

    Returns:
      The Checkpointer that saves into it.
    """
    signature = checkpoint.run_signature(trainer)
    checkpoint.check_compatible(config.model_dir, signature,
                                allow_policy_change=config.allow_policy_change)
    checkpointer = checkpoint.Checkpointer(trainer, model_dir=config.model_dir,
                                           keep=config.keep_checkpoints, is_chief=cluster.is_chief)
    restored = checkpointer.restore_or_initialize()
    step = int(trainer.global_step.numpy())
    if not distribute.all_workers_equal(cluster, step):
        raise UserError(
            f"the workers restored different steps from {config.model_dir}: it must be on a "
            "file system that every worker can read (the chief writes, all restore)")
    if cluster.is_chief:
        checkpoint.write_run_file(config.model_dir, signature)
    if restored and verbose:
        epoch = step // trainer.datasets.steps_per_epoch
        print(f"resuming from {restored} at step {step} (epoch {epoch} done)", flush=True)
    return checkpointer


def _summary(config: TrainConfig, trainer: Trainer, device, cluster, result, test) -> dict:
    """What a finished run reports (the ``--metrics_file`` JSON)."""
    return {
        "policy": config.policy,
        "device": device.kind,
        "device_description": device.description,
        "model": trainer.model_name,
        "dataset": config.dataset,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "loss_scale_mode": str(config.resolved_loss_scale),
        "num_workers": cluster.num_workers,
        "test_accuracy": test.get("accuracy"),
        "test_loss": test["loss"],
        "val_accuracy": result.history[-1].validation.get("accuracy") if result.history else None,
        "examples_per_sec": result.examples_per_sec,
        "step_time_ms": result.step_time_ms,
        "loss_scale": trainer.loss_scale,
        "skipped_steps": int(trainer.skipped_steps.numpy()),
        "global_step": int(trainer.global_step.numpy()),
        "weights_checksum": trainer.weights_checksum(),
        "history": [
            {"epoch": h.epoch, "step": h.global_step, **h.train,
             **{f"val_{k}": v for k, v in h.validation.items()}, "ms_per_step": h.ms_per_step}
            for h in result.history
        ],
    }
