"""The standard training run, :func:`fit`: epochs, evaluation, checkpoints, TensorBoard,
progress and the stop checks (preemption, non-finite storms, and with ``--recover_trials`` the
recovery from a checkpoint), as periodic actions of a
:class:`~trainer.loop.controller.Controller`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence

from trainer.core import optimizers
from trainer.core.steps import Trainer
from trainer.errors import TrainingStopped, warn
from trainer.loop.actions import PeriodicAction
from trainer.loop.controller import Controller
from trainer.runtime.lockstep import Lockstep, check_restored_steps


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
    # Share of the step loops' time spent waiting for the next batch (this worker's; None
    # under --deterministic, whose op determinism forbids reading the clock in the graph).
    input_wait: Optional[float] = None


@dataclasses.dataclass
class FitResult:
    """History and steady-state speed (the first, tracing, step loop excluded)."""

    history: List[EpochLog]
    step_time_ms: float
    examples_per_sec: float
    stopped_by: Optional[str] = None  # The signal that preempted the run, if one did.
    recoveries: int = 0  # Restores of the last checkpoint after a divergence (--recover_trials).


# Above this share of step time spent waiting for input, a run is input-bound: said once.
INPUT_BOUND = 0.2


def storm_reason(trainer: Trainer, max_consecutive_skips: int) -> str:
    """Why skipping non-finite steps no longer helps ('' while it still does).

    Under every loss-scale mode: ``max_consecutive_skips`` skipped steps in a row (0: no
    limit). Under a dynamic scale also: a skipped step with the scale at its floor (1). The
    Trainer's step loop stops at exactly the step where either became true (the same test,
    ``Trainer._storm``). Both counts are equal on every worker (the gradients were
    all-reduced before the finiteness check), so every worker gets the same answer.
    """
    consecutive = int(trainer.consecutive_skips.numpy())
    if max_consecutive_skips and consecutive >= max_consecutive_skips:
        return (f"the last {consecutive} steps in a row had non-finite gradients and were "
                f"skipped (--max_consecutive_skips={max_consecutive_skips})")
    if trainer.loss_scaler.dynamic and consecutive and trainer.loss_scale <= 1.0:
        return "gradients are non-finite with the loss scale at its floor (1)"
    return ""


def loss_bound_reason(loss: float, bound: float) -> str:
    """Why a mean training loss counts as divergence under ``--loss_upper_bound`` ('' if not).

    A NaN loss compares False with everything, so it is named explicitly rather than let
    through by ``loss > bound``.
    """
    if not bound:
        return ""
    if not math.isfinite(loss):
        return f"the mean training loss is {loss} (--loss_upper_bound={bound:g})"
    if loss > bound:
        return f"the mean training loss {loss:.6g} is above --loss_upper_bound={bound:g}"
    return ""


def _stopped(trainer: Trainer, why: str, *, has_checkpoint: bool, recoveries: int = 0) -> \
        TrainingStopped:
    step = int(trainer.global_step.numpy())
    kept = (f"the last good checkpoint in {trainer.config.model_dir} is kept" if has_checkpoint
            else "no checkpoint was saved")
    tried = (f"; {recoveries} recoveries from the last checkpoint did not help "
             f"(--recover_trials={trainer.config.recover_trials})" if recoveries else "")
    return TrainingStopped(
        f"training stopped at step {step}: {why} ({int(trainer.skipped_steps.numpy())} skipped "
        f"in all){tried}; {kept}. The model diverges: lower --learning_rate, set --clip_norm, "
        "or check the data for NaN/Inf")


def check_non_finite(trainer: Trainer, max_consecutive_skips: int, *,
                     has_checkpoint: bool = False) -> None:
    """Raises TrainingStopped when skipping non-finite steps no longer helps (see
    :func:`storm_reason`), naming the step the Trainer's step loop stopped at.

    Args:
      has_checkpoint: whether a checkpoint from before the storm exists in
        ``config.model_dir``; the message promises one only then.
    """
    why = storm_reason(trainer, max_consecutive_skips)
    if why:
        raise _stopped(trainer, why, has_checkpoint=has_checkpoint)


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
      recover_trials: how often a divergence (a non-finite storm, or a mean training loss
        above ``config.loss_upper_bound``) restores the newest checkpoint and goes on before
        the run stops with TrainingStopped (default: the config's with a ``checkpointer``,
        else 0).
      clock: seconds as a float (injectable for tests).
    """

    def __init__(self, trainer: Trainer, *, lockstep: Optional[Lockstep] = None,
                 epochs: Optional[int] = None, steps_per_loop: Optional[int] = None,
                 on_log: Optional[Callable[[EpochLog], None]] = None, checkpointer=None,
                 summaries=None, progress=None, extra_actions: Sequence[PeriodicAction] = (),
                 should_stop: Optional[Callable[[], Optional[str]]] = None,
                 best_metric: Optional[str] = None, recover_trials: Optional[int] = None,
                 clock: Callable[[], float] = time.perf_counter):
        config = trainer.config
        if recover_trials is None:
            # The config's, where there are checkpoints to go back to: a loop without them
            # (e.g. each policy of --compare_policies) stops at a divergence as before.
            recover_trials = config.recover_trials if checkpointer is not None else 0
        if recover_trials and checkpointer is None:
            raise ValueError(f"recover_trials={recover_trials} restores checkpoints: pass a "
                             "checkpointer")
        self.recover_trials = recover_trials
        self.recoveries = 0
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
        self._input_wait_s = float(trainer.input_wait_s.numpy())
        self._said_input_bound = False
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
            actions=actions, should_stop=self._stop_requested, after_loop=self._check_divergence,
            clock=clock)

    def run(self) -> FitResult:
        """Trains to the final step (or until stopped); saves and evaluates the end state."""
        if self.recover_trials and self.checkpointer.last_saved_step is None:
            # A divergence before the first periodic save still has a state to go back to.
            # Decided from shared values (the config, last_saved_step): every worker saves.
            self.checkpointer.save()
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
            stopped_by=None if finished else (self.stopped_by or "stop"),
            recoveries=self.recoveries)

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
        waited = float(trainer.input_wait_s.numpy())
        input_wait = None if config.deterministic else \
            min(1.0, (waited - self._input_wait_s) / seconds) if seconds else 0.0
        self._input_wait_s = waited
        validation = trainer.evaluate(trainer.datasets.validation) \
            if trainer.datasets.validation is not None else {}
        log = EpochLog(
            epoch=-(-step // trainer.datasets.steps_per_epoch), epochs=self.epochs,
            train=trainer.train_results(reset=True), validation=validation,
            ms_per_step=1000 * seconds / max(steps, 1),
            examples_per_sec=steps * config.batch_size / seconds if seconds else 0.0,
            loss_scale=trainer.loss_scale, skipped_steps=int(trainer.skipped_steps.numpy()),
            global_step=step, input_wait=input_wait)
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
            # In-memory data gathered in the step loop cannot be sped up by these fixes.
            if (input_wait or 0.0) > INPUT_BOUND and not self._said_input_bound and \
                    trainer.in_graph_input is None:
                self._said_input_bound = True
                warn(f"input-bound: the steps waited for input {input_wait:.0%} of the time; "
                     "decode in more parallel calls (--parallel_calls), cache a small set in "
                     "memory, or train on smaller images (--image_size)")
            if self.summaries is not None:
                lr = optimizers.current_learning_rate(trainer.optimizer)
                self.summaries.scalars("train", step, {
                    **log.train, "loss_scale": log.loss_scale, "learning_rate": lr,
                    "examples_per_sec": log.examples_per_sec,
                    **({} if log.input_wait is None else {"input_wait": log.input_wait}),
                    "skipped_steps": log.skipped_steps})
                self.summaries.scalars("validation", step, validation)
                self.summaries.flush()
            if self.on_log:
                self.on_log(log)

    def _save(self, step: int, now: float) -> None:
        del step, now
        self.checkpointer.save()

    def _check_divergence(self, step: int) -> bool:
        """After every step loop: a storm or a loss above the bound recovers or stops the run.

        Every input to the decision is shared by all workers (the skip counters and loss scale
        follow the all-reduced gradients, the loss is a reduced metric, the recovery count and
        ``last_saved_step`` change on all of them alike), so they all recover, or all stop,
        together.

        Returns:
          True when the state was rewound to a checkpoint (the controller then re-reads the
          global step and runs no action for the abandoned steps).

        Raises:
          TrainingStopped: divergence with no recovery left.
        """
        config = self.trainer.config
        why = storm_reason(self.trainer, config.max_consecutive_skips)
        if not why and config.loss_upper_bound:
            # A collective read of the training loss, on every worker after every loop: the
            # mean since the last log line (metrics are reset there and restored with a
            # checkpoint).
            why = loss_bound_reason(self.trainer.train_results()["loss"],
                                    config.loss_upper_bound)
        if not why:
            return False
        saved = self.checkpointer is not None and self.checkpointer.last_saved_step is not None
        if self.recoveries >= self.recover_trials or not saved:
            # From all-reduced gradients and reduced metrics: every worker stops here, and
            # they leave together.
            self.lockstep.fail_together(
                _stopped(self.trainer, why, has_checkpoint=saved, recoveries=self.recoveries),
                name="non-finite stop")
        self._recover(step, why)
        return True

    def _recover(self, step: int, why: str) -> None:
        """Restores the newest checkpoint through the normal restore path and goes on from it.

        The restore brings back the weights, optimizer slots, loss-scale state, skip counters,
        training metrics and (where it is saved) the input iterator; the Trainer's input then
        restarts at the restored step, so the replay reads exactly the batches the run read
        the first time. A recovered run is therefore the run that never diverged, whenever
        the blow-up does not recur on replay.
        """
        self.recoveries += 1
        path = self.checkpointer.restore_or_initialize()
        self.trainer.restart_input()
        restored = int(self.trainer.global_step.numpy())
        check_restored_steps(self.lockstep, restored, self.trainer.config.model_dir)
        # Log lines of the abandoned steps are no longer part of this run's history.
        self.history = [log for log in self.history if log.global_step <= restored]
        with self.lockstep.chief_only() as chief:
            if chief:
                warn(f"step {step}: {why}; restored {path} (step {restored}) and going on, "
                     f"recovery {self.recoveries} of {self.recover_trials} (--recover_trials)")

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
