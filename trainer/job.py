"""One training job end to end, from a TrainConfig: :func:`run` (what ``run.py`` trains with)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Type

from trainer import compat, registry
from trainer.config import TrainConfig
from trainer.core.steps import Trainer
from trainer.errors import TrainingStopped, UserError
from trainer.loop import fit_loop
from trainer.loop.actions import PeriodicAction
from trainer.loop.preemption import PreemptionWatcher
from trainer.loop.profiling import StepProfiler
from trainer.outputs import checkpoint, console, export, files
from trainer.outputs.summaries import SummaryWriter
from trainer.runtime import devices, distribution
from trainer.runtime.lockstep import Lockstep, check_restored_steps
from trainer.tools import auto_policy, numerics


def run(config: TrainConfig, *, trainer_cls: Type[Trainer] = Trainer,
        actions: Sequence[PeriodicAction] = ()) -> dict:
    """Selects the device, builds the Trainer, resumes, trains, tests, writes the metrics file.

    Every check of user input (model name and arguments, device, data files, output paths,
    a model_dir from another run) happens before the first step, so a mistake costs seconds
    and changes nothing on disk. Every worker of a multi-worker job runs this same sequence;
    the collectives in it go through :mod:`trainer.runtime.lockstep`.

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
    files.check_outputs(metrics_file=config.metrics_file, model_dir=config.model_dir)
    if config.export_dir:
        export.check_export_dir(config.export_dir)
    distribution.prepare(config)  # TF_CONFIG and the Gaudi card: before TensorFlow starts.
    device = devices.select_device(config.device, policy=config.policy)
    devices.check_jit_compile(device, config.jit_compile)  # 'auto' may have picked Gaudi.
    cluster = distribution.setup(config, device)
    steps = Lockstep.of(cluster)
    auto = None
    if config.policy == "auto":  # A trial on the chief (or run.json's choice), for every worker.
        config, auto = auto_policy.resolve(config, device=device, lockstep=steps,
                                           trainer_cls=trainer_cls)
    trainer = trainer_cls(config, strategy=cluster.strategy)
    best_metric = _best_metric(config, trainer)
    verbose = config.verbose
    checkpointer = _resume(config, trainer, steps, verbose, auto=auto) \
        if config.model_dir else None
    trainer.mark_reads()
    with steps.chief_only() as chief:
        if chief and verbose:
            console.banner(device=device, config=config, trainer=trainer)
    mode = steps.progress_mode(config.progress)
    progress = console.ProgressBar(trainer.datasets.steps_per_epoch, trainer.train_metrics) \
        if mode == "bar" and verbose else None
    summaries = SummaryWriter(config.model_dir, enabled=cluster.is_chief)
    if config.numerics_every:  # Off: no action at all, the step loops are unchanged.
        actions = [*actions, numerics.periodic_action(trainer, summaries, steps)]
    start_step = int(trainer.global_step.numpy())
    final_step = config.epochs * trainer.datasets.steps_per_epoch
    if checkpointer is not None and start_step >= final_step:
        with steps.chief_only() as chief:
            if chief and verbose:
                print(f"{config.model_dir} is already at step {start_step}, the final step of "
                      f"--epochs={config.epochs}; nothing to train (pass a larger --epochs to "
                      "train further)", flush=True)
    profiler = StepProfiler.from_config(config, is_chief=cluster.is_chief, step=start_step)
    try:
        with PreemptionWatcher() as watcher, profiler:
            result = fit_loop.FitLoop(
                trainer, lockstep=steps, checkpointer=checkpointer, summaries=summaries,
                progress=progress, extra_actions=[*actions, *profiler.actions],
                best_metric=best_metric,
                on_log=console.print_epoch if verbose and mode != "none" else None,
                should_stop=lambda: watcher.signal_name).run()
    finally:
        summaries.close()
        if checkpointer is not None:
            checkpointer.close()
    step = int(trainer.global_step.numpy())
    if result.stopped_by:
        with steps.chief_only() as chief:
            if chief and verbose:
                where = (f"; checkpoint saved in {config.model_dir}, run the same command to "
                         "resume") if checkpointer else " (no --model_dir: nothing saved)"
                print(f"stopped by {result.stopped_by} at step {step}{where}", flush=True)
        return {"preempted": True, "global_step": step, "stopped_by": result.stopped_by}
    test = trainer.evaluate(trainer.datasets.test)
    summary = _summary(config, trainer, device, cluster, result, test, checkpointer)
    with steps.chief_only() as chief:
        if chief and verbose:
            console.print_test(test)
        if chief and config.metrics_file:
            files.write_metrics(config.metrics_file, summary)
    if cluster.num_workers > 1:  # Every worker: equal checksums show the replicas stayed in sync.
        print(distribution.worker_line(cluster, summary), flush=True)
    try:
        _check_finite_end(trainer, test, checkpointer)
    except TrainingStopped as error:
        # From shared values (synchronised weights, the reduced test loss): every worker
        # stops here, and they leave together.
        steps.fail_together(error, name="non-finite end")
    if config.export_dir:  # Every worker: saving is a collective (trainer/outputs/export.py).
        signature = export.export_model(trainer, config.export_dir, is_chief=cluster.is_chief)
        with steps.chief_only() as chief:
            if chief and verbose:
                print(f"exported SavedModel to {config.export_dir} ({signature})", flush=True)
    return summary


def _best_metric(config: TrainConfig, trainer: Trainer) -> str:
    """The validation metric that picks the best checkpoint ('auto': accuracy, else loss).

    It matters only when a checkpoint is kept (``--model_dir``), so only then is a name this
    model does not report refused.
    """
    name = config.best_metric
    if name == "auto":
        return "accuracy" if "accuracy" in trainer.eval_metrics else "loss"
    if config.model_dir and name not in trainer.eval_metrics:
        raise UserError(
            f"unknown best_metric {name!r}; this model reports "
            f"{', '.join(trainer.eval_metrics)} (--best_metric)")
    return name


def _check_finite_end(trainer: Trainer, test: dict, checkpointer) -> None:
    """A run whose final weights or test loss are not finite did not train: exit non-zero."""
    loss = test.get("loss", 0.0)
    weights_finite = trainer.weights_finite()
    if weights_finite and math.isfinite(loss):
        return
    what = "final weights are" if not weights_finite else "test loss is"
    kept = (f"; the checkpoints in {checkpointer.model_dir} hold the last state"
            if checkpointer is not None else "")
    raise TrainingStopped(
        f"training diverged: the {what} not finite ({int(trainer.skipped_steps.numpy())} "
        f"non-finite steps were skipped){kept}. Lower --learning_rate, set --clip_norm, or "
        "check the data for NaN/Inf")


def _resume(config: TrainConfig, trainer: Trainer, steps: Lockstep, verbose: bool, *,
            auto: Optional[dict] = None):
    """Checks ``config.model_dir`` belongs to this run, restores its newest checkpoint.

    Args:
      auto: the ``--policy=auto`` decision, recorded in run.json (``policy_auto``) so that a
        resume keeps the policy without a new trial.

    Returns:
      The Checkpointer that saves into it.
    """
    signature = checkpoint.run_signature(trainer)
    if auto is not None:
        signature["policy_auto"] = auto
    checkpoint.check_compatible(config.model_dir, signature,
                                allow_policy_change=config.allow_policy_change)
    checkpointer = checkpoint.Checkpointer(trainer, model_dir=config.model_dir,
                                           keep=config.keep_checkpoints, is_chief=steps.is_chief)
    restored = checkpointer.restore_or_initialize()
    step = int(trainer.global_step.numpy())
    check_restored_steps(steps, step, config.model_dir)
    with steps.chief_only() as chief:
        if chief:
            checkpoint.write_run_file(config.model_dir, signature)
        if chief and verbose:
            for note in checkpointer.notes:
                print(f"note: {note}", flush=True)
            if restored:
                epoch = step // trainer.datasets.steps_per_epoch
                print(f"resuming from {restored} at step {step} (epoch {epoch} done)",
                      flush=True)
    return checkpointer


def _summary(config: TrainConfig, trainer: Trainer, device, cluster, result, test,
             checkpointer=None) -> dict:
    """What a finished run reports (the ``--metrics_file`` JSON)."""
    return {
        "policy": config.policy,
        "device": device.kind,
        "device_description": device.description,
        "model": trainer.model_name,
        "dataset": config.dataset,
        "data_source": trainer.datasets.source,  # The folder, file or arrays actually read.
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "loss_scale_mode": str(config.resolved_loss_scale),
        "keras": compat.KERAS_NAME,
        "num_workers": cluster.num_workers,
        # Every evaluation metric, as test_<name> and (last validation) val_<name>.
        **{f"test_{name}": value for name, value in test.items()},
        **{f"val_{name}": value
           for name, value in (result.history[-1].validation if result.history else {}).items()},
        "examples_per_sec": result.examples_per_sec,
        "step_time_ms": result.step_time_ms,
        "loss_scale": trainer.loss_scale,
        "skipped_steps": int(trainer.skipped_steps.numpy()),
        "recoveries": result.recoveries,  # --recover_trials: restores after a divergence.
        "global_step": int(trainer.global_step.numpy()),
        "weights_checksum": trainer.weights_checksum(),
        # What continuing the input cost: bytes read from after the resume to the end of the
        # first step loop, and the size of this worker's newest saved input state.
        "first_loop_read_bytes": trainer.first_loop_read_bytes,
        "input_state_bytes": checkpointer.input_state_bytes() if checkpointer else None,
        "history": files.history_rows(result.history),
    }
