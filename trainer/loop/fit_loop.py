"""The standard training run, :func:`fit`: epochs, evaluation, checkpoints, TensorBoard,
progress and the stop checks (preemption, non-finite storms), as periodic actions of a
:class:`~trainer.loop.controller.Controller`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence

from trainer.core import optimizers
from trainer.core.steps import Trainer
from trainer.errors import TrainingStopped, warn
from trainer.loop.actions import PeriodicAction
from trainer.loop.controller import Controller
from trainer.runtime.lockstep import Lockstep


@dataclasses.dataclass
class EpochLog:
    """What one epoch (or one mid-epoch evaluation) produced."""

    epoch: int
    epochs: int
    train: Dict[str, float]
    validation: Dict[str, float]
    ms_per_step: float
    examples_per_sec: float
    loss_scale: float
    skipped_steps: int
    global_step: int


@dataclasses.dataclass
class FitResult:
    """History and steady-state speed (the first, tracing, step loop excluded)."""

    history: List[EpochLog]
    step_time_ms: float
    examples_per_sec: float
    stopped_by: Optional[str] = None  # The signal that preempted the run, if one did.


def check_non_finite(trainer: Trainer, max_consecutive_skips: int, *,
                     has_checkpoint: bool = False) -> None:
    """Raises TrainingStopped when skipping non-finite steps no longer helps.

    Under every loss-scale mode: ``max_consecutive_skips`` skipped steps in a row (0: no
    limit). Under a dynamic scale also: a skipped step with the scale at its floor (1). The
    Trainer's step loop stops at exactly the step where either became true (the same test,
    ``Trainer._storm``), so the step named here is that step.

    Args:
      has_checkpoint: whether a checkpoint from before the storm exists in
        ``config.model_dir``; the message promises one only then.
    """
    consecutive = int(trainer.consecutive_skips.numpy())
    step = int(trainer.global_step.numpy())
    if max_consecutive_skips and consecutive >= max_consecutive_skips:
        why = (f"the last {consecutive} steps in a row had non-finite gradients and were skipped "
               f"(--max_consecutive_skips={max_consecutive_skips})")
    elif trainer.loss_scaler.dynamic and consecutive and trainer.loss_scale <= 1.0:
        why = "gradients are non-finite with the loss scale at its floor (1)"
    else:
        return
    kept = (f"the last good checkpoint in {trainer.config.model_dir} is kept" if has_checkpoint
            else "no checkpoint was saved")
    raise TrainingStopped(
        f"training stopped at step {step}: {why} ({int(trainer.skipped_steps.numpy())} skipped "
        f"in all); {kept}. The model diverges: lower --learning_rate, set --clip_norm, or check "
        "the data for NaN/Inf")


def log_interval(trainer: Trainer) -> int:
    """Steps between evaluations and log lines: ``eval_every``, else one epoch.

    The training metrics in each log line cover the steps since the previous one (they are
    reset after every log). The final step is always logged and evaluated as well.
    """
    return trainer.config.eval_every or trainer.datasets.steps_per_epoch


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``metric`` is better (Keras' rule for 'auto' mode, plus a few)."""
    return any(key in metric for key in ("acc", "auc", "precision", "recall", "f1", "iou"))


class FitLoop:
    """The standard training run: which actions run when, and the state they share.

    Every method here runs on every worker; output goes through ``lockstep.chief_only()``
    from values already reduced (see :mod:`trainer.runtime.lockstep` for the rule).

    Args:
      trainer: does the steps (*what*).
      lockstep: the job's collectives; a single-process one when None.
      epochs, steps_per_loop: default to the trainer's config.
      on_log: called on the chief with each :class:`EpochLog` (every evaluation).
      checkpointer: saves every ``checkpoint_every`` steps (or epoch), the best by
        ``best_metric`` and at the end; None for no checkpoints.
      summaries: a :class:`trainer.outputs.summaries.SummaryWriter` or None.
      progress: a :class:`trainer.outputs.console.ProgressBar` (drawn on the chief) or None.
      extra_actions: the caller's periodic actions, run on every worker.
      should_stop: returns this worker's reason to stop (e.g. 'SIGTERM') or None; the
        workers vote on it after every step loop.
      best_metric: the validation metric that picks the best checkpoint (default: the
        config's).
      clock: seconds as a float (injectable for tests).
    """

    def __init__(self, trainer: Trainer, *, lockstep: Optional[Lockstep] = None,
                 epochs: Optional[int] = None, steps_per_loop: Optional[int] = None,
                 on_log: Optional[Callable[[EpochLog], None]] = None, checkpointer=None,
                 summaries=None, progress=None, extra_actions: Sequence[PeriodicAction] = (),
                 should_stop: Optional[Callable[[], Optional[str]]] = None,
                 best_metric: Optional[str] = None,
                 clock: Callable[[], float] = time.perf_counter):
        config = trainer.config
        self.best_metric = best_metric or config.best_metric
        self.trainer = trainer
        self.lockstep = lockstep or Lockstep(strategy=trainer.strategy)
        self.epochs = config.epochs if epochs is None else epochs
        self.total_steps = self.epochs * trainer.datasets.steps_per_epoch
        self.on_log = on_log
        self.checkpointer = checkpointer
        self.summaries = summaries
        self.progress = progress
        self.should_stop = should_stop
        self.history: List[EpochLog] = []
        self.stopped_by: Optional[str] = None
        actions = []
        # Progress and the caller's actions first: they see the training metrics before the
        # evaluation resets them.
        if progress is not None:
            actions.append(PeriodicAction(self._show_progress, name="progress"))
        actions.extend(extra_actions)
        actions.append(PeriodicAction(self._log_and_evaluate, every_steps=log_interval(trainer),
                                      name="evaluate"))
        if checkpointer is not None:
            every = config.checkpoint_every or trainer.datasets.steps_per_epoch
            actions.append(PeriodicAction(self._save, every_steps=every, name="checkpoint"))
        self.controller = Controller(
            trainer=trainer, total_steps=self.total_steps,
            steps_per_loop=config.steps_per_loop if steps_per_loop is None else steps_per_loop,
            actions=actions, should_stop=self._stop_requested, after_loop=self._check_storm,
            clock=clock)

    def run(self) -> FitResult:
        """Trains to the final step (or until stopped); saves and evaluates the end state."""
        finished = self.controller.run()
        step = int(self.trainer.global_step.numpy())
        logged = self.history[-1].global_step if self.history else None
        if finished and self.controller.timer.steps and logged != step:
            self._log_and_evaluate(step, 0.0)  # The final weights are always validated.
        if self.checkpointer is not None and self.checkpointer.last_saved_step != step:
            # At the end, and where a stopped run stopped. `last_saved_step` is the same on
            # every worker (restored or saved together), so all of them decide alike.
            self.checkpointer.save()
        timer = self.controller.timer
        if not timer.steady_steps:  # A single loop: the traced one is all there is.
            timer.steady_seconds, timer.steady_steps = timer.seconds, timer.steps
        batch = self.trainer.config.batch_size
        return FitResult(
            history=self.history,
            step_time_ms=1000 * timer.steady_seconds / timer.steady_steps
            if timer.steady_steps else 0.0,
            examples_per_sec=(timer.steady_steps * batch / timer.steady_seconds
                              if timer.steady_seconds else 0.0),
            stopped_by=None if finished else (self.stopped_by or "stop"))

    # ------------------------------------------------------------------ actions

    def _show_progress(self, step: int, now: float) -> None:
        del now
        values = {**self.trainer.train_results(), "loss_scale": self.trainer.loss_scale}
        with self.lockstep.chief_only() as chief:
            if chief:
                self.progress.update(step, values)

    def _log_and_evaluate(self, step: int, now: float) -> None:
        del now
        trainer, config = self.trainer, self.trainer.config
        steps, seconds = self.controller.timer.lap()
        validation = trainer.evaluate(trainer.datasets.validation) \
            if trainer.datasets.validation is not None else {}
        log = EpochLog(
            epoch=-(-step // trainer.datasets.steps_per_epoch), epochs=self.epochs,
            train=trainer.train_results(reset=True), validation=validation,
            ms_per_step=1000 * seconds / max(steps, 1),
            examples_per_sec=steps * config.batch_size / seconds if seconds else 0.0,
            loss_scale=trainer.loss_scale, skipped_steps=int(trainer.skipped_steps.numpy()),
            global_step=step)
        self.history.append(log)
        if self.checkpointer is not None and self.best_metric in validation:
            self.checkpointer.maybe_save_best(validation[self.best_metric],
                                              higher_is_better=higher_is_better(self.best_metric))
        with self.lockstep.chief_only() as chief:
            if not chief:
                return
            if trainer.loss_scaler.dynamic and log.loss_scale <= 1.0:
                warn(
                    f"step {step}: the dynamic loss scale is stuck at its floor (1), so "
                    "gradients overflow even unscaled; training stops if steps keep being "
                    "skipped. Lower --learning_rate or set --clip_norm")
            if self.summaries is not None:
                lr = optimizers.current_learning_rate(trainer.optimizer)
                self.summaries.scalars("train", step, {
                    **log.train, "loss_scale": log.loss_scale, "learning_rate": lr,
                    "examples_per_sec": log.examples_per_sec,
                    "skipped_steps": log.skipped_steps})
                self.summaries.scalars("validation", step, validation)
                self.summaries.flush()
            if self.on_log:
                self.on_log(log)

    def _save(self, step: int, now: float) -> None:
        del step, now
        self.checkpointer.save()

    def _check_storm(self, step: int) -> None:
        del step
        saved = self.checkpointer is not None and self.checkpointer.last_saved_step is not None
        try:
            check_non_finite(self.trainer, self.trainer.config.max_consecutive_skips,
                             has_checkpoint=saved)
        except TrainingStopped as error:
            # From all-reduced gradients: every worker stops here, and they leave together.
            self.lockstep.fail_together(error, name="non-finite stop")

    def _stop_requested(self) -> bool:
        local = self.should_stop() if self.should_stop else None
        reason = self.lockstep.stop_vote(local)
        if reason:
            self.stopped_by = reason
        return bool(reason)


def fit(trainer: Trainer, **kwargs) -> FitResult:
    """Trains for ``epochs`` (default: the config's) from wherever the trainer's step is.

    Evaluates on the validation split every ``config.eval_every`` steps, at each epoch end
    and at the final step; keeps the best checkpoint by ``config.best_metric``; saves every
    ``config.checkpoint_every`` steps (or each epoch) and at the end; writes summaries.
    Takes :class:`FitLoop`'s keyword arguments.
    """
    return FitLoop(trainer, **kwargs).run()
