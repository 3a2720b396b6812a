"""The loop decides *when* (step loops, evaluation, checkpoints, logs); the Trainer does *what*.

:class:`Controller` runs the Trainer's compiled step loops up to a total step count and calls
periodic actions between them. :func:`fit` is the standard set-up: epochs, evaluation,
checkpoints, TensorBoard, progress and the stop checks (preemption, non-finite storms).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence

from trainer import optimizers, reporting
from trainer.actions import PeriodicAction
from trainer.errors import UserError
from trainer.trainer import Trainer


class TrainingStopped(UserError):
    """Training cannot usefully go on (a non-finite storm); the message says where and why."""


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


class StepTimer:
    """Wall time spent in step loops, total and since the last ``lap``."""

    def __init__(self):
        self.seconds = self.steps = 0
        self.steady_seconds = self.steady_steps = 0
        self._lap_seconds = self._lap_steps = 0
        self._loops = 0

    def add(self, steps: int, seconds: float) -> None:
        self.seconds, self.steps = self.seconds + seconds, self.steps + steps
        if self._loops:  # The first loop traces and compiles; keep it out of the speed.
            self.steady_seconds += seconds
            self.steady_steps += steps
        self._loops += 1

    def lap(self):
        """(steps, seconds) since the previous lap."""
        steps, seconds = self.steps - self._lap_steps, self.seconds - self._lap_seconds
        self._lap_steps, self._lap_seconds = self.steps, self.seconds
        return steps, seconds


class Controller:
    """Runs ``trainer`` to ``total_steps`` in step loops, calling ``actions`` between them.

    Args:
      trainer: does the steps.
      total_steps: the global step to stop at.
      steps_per_loop: the most steps per compiled call; loops also end at every step-based
        action's boundary.
      actions: called after every loop with (global step, clock reading).
      should_stop: polled after every loop; True ends training early (e.g. preemption).
      clock: seconds as a float (injectable for tests).
    """

    def __init__(self, *, trainer: Trainer, total_steps: int, steps_per_loop: int,
                 actions: Sequence[PeriodicAction] = (),
                 should_stop: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.perf_counter):
        self.trainer = trainer
        self.total_steps = total_steps
        self.steps_per_loop = steps_per_loop
        self.actions = list(actions)
        self.should_stop = should_stop
        self.clock = clock
        self.timer = StepTimer()

    def next_loop_size(self, step: int) -> int:
        sizes = [self.steps_per_loop, self.total_steps - step]
        sizes += [n for n in (a.steps_until_due(step) for a in self.actions) if n]
        return min(sizes)

    def run(self) -> bool:
        """Trains until ``total_steps``; returns False when ``should_stop`` ended it early."""
        step = int(self.trainer.global_step.numpy())
        while step < self.total_steps:
            n = self.next_loop_size(step)
            start = self.clock()
            self.trainer.train_steps(n)
            step = int(self.trainer.global_step.numpy())  # Also waits for the device.
            self.timer.add(n, self.clock() - start)
            now = self.clock()
            for action in self.actions:
                action(step, now)
            if self.should_stop():
                return False
        return True


def check_non_finite(trainer: Trainer, max_consecutive_skips: int) -> None:
    """Raises TrainingStopped when skipping non-finite steps no longer helps."""
    scaler = trainer.loss_scaler
    if not scaler.dynamic:
        return
    consecutive = int(trainer.consecutive_skips.numpy())
    step = int(trainer.global_step.numpy())
    if max_consecutive_skips and consecutive >= max_consecutive_skips:
        why = f"the last {consecutive} steps in a row had non-finite gradients"
    elif consecutive and trainer.loss_scale <= 1.0:
        why = "gradients are non-finite with the loss scale at its floor (1)"
    else:
        return
    raise TrainingStopped(
        f"training stopped at step {step}: {why} ({int(trainer.skipped_steps.numpy())} skipped "
        "in all); the last good checkpoint is kept. The model diverges: lower --learning_rate, "
        "set --clip_norm, or check the data for NaN/Inf")


def log_interval(trainer: Trainer) -> int:
    """Steps between evaluations and log lines: ``eval_every``, else one epoch.

    The training metrics in each log line cover the steps since the previous one (they are
    reset after every log).
    """
    return trainer.config.eval_every or trainer.datasets.steps_per_epoch


def fit(trainer: Trainer, *, epochs: Optional[int] = None, steps_per_loop: Optional[int] = None,
        on_epoch_end: Optional[Callable[[EpochLog], None]] = None, checkpointer=None,
        summaries=None, progress=None, extra_actions: Sequence[PeriodicAction] = (),
        should_stop: Optional[Callable[[], Optional[str]]] = None,
        clock: Callable[[], float] = time.perf_counter) -> FitResult:
    """Trains for ``epochs`` (default: the config's) from wherever the trainer's step is.

    Evaluates on the validation split every ``config.eval_every`` steps or at each epoch end,
    keeps the best checkpoint by ``config.best_metric``, saves every
    ``config.checkpoint_every`` steps (or each epoch) and at the end, and writes summaries.

    Args:
      should_stop: returns the reason (e.g. 'SIGTERM') to stop after the current step loop.
    """
    config = trainer.config
    epochs = config.epochs if epochs is None else epochs
    steps_per_epoch = trainer.datasets.steps_per_epoch
    history: List[EpochLog] = []
    timer_ref: List[StepTimer] = []
    lower_is_better = config.best_metric == "loss"

    def log_and_evaluate(step: int, now: float) -> None:
        del now
        steps, seconds = timer_ref[0].lap()
        validation = trainer.evaluate(trainer.datasets.validation) \
            if trainer.datasets.validation is not None else {}
        log = EpochLog(
            epoch=-(-step // steps_per_epoch), epochs=epochs,
            train=trainer.train_results(reset=True), validation=validation,
            ms_per_step=1000 * seconds / max(steps, 1),
            examples_per_sec=steps * config.batch_size / seconds if seconds else 0.0,
            loss_scale=trainer.loss_scale, skipped_steps=int(trainer.skipped_steps.numpy()),
            global_step=step)
        history.append(log)
        if trainer.loss_scaler.dynamic and log.loss_scale <= 1.0:
            reporting.warn(
                f"step {step}: the dynamic loss scale is stuck at its floor (1), so gradients "
                "overflow even unscaled; training stops if steps keep being skipped. Lower "
                "--learning_rate or set --clip_norm")
        if summaries is not None:
            lr = optimizers.current_learning_rate(trainer.optimizer)
            summaries.scalars("train", step, {
                **log.train, "loss_scale": log.loss_scale, "learning_rate": lr,
                "examples_per_sec": log.examples_per_sec, "skipped_steps": log.skipped_steps})
            summaries.scalars("validation", step, validation)
            summaries.flush()
        if checkpointer is not None and config.best_metric in validation:
            checkpointer.maybe_save_best(validation[config.best_metric],
                                         higher_is_better=not lower_is_better)
        if on_epoch_end:
            on_epoch_end(log)

    def save(step: int, now: float) -> None:
        del step, now
        checkpointer.save()

    # Progress and the caller's actions first: they see the training metrics before the
    # epoch-end evaluation resets them.
    actions = []
    if progress is not None:
        actions.append(PeriodicAction(lambda step, now: progress.update(trainer, step),
                                      name="progress"))
    actions.extend(extra_actions)
    actions.append(PeriodicAction(log_and_evaluate, every_steps=log_interval(trainer),
                                  name="evaluate"))
    if checkpointer is not None:
        actions.append(PeriodicAction(save, every_steps=config.checkpoint_every or steps_per_epoch,
                                      name="checkpoint"))
    stopped_by: List[str] = []

    def stop_requested() -> bool:
        check_non_finite(trainer, config.max_consecutive_skips)
        reason = should_stop() if should_stop else None
        if reason:
            stopped_by.append(reason)
        return bool(reason)

    controller = Controller(trainer=trainer, total_steps=epochs * steps_per_epoch,
                            steps_per_loop=config.steps_per_loop if steps_per_loop is None
                            else steps_per_loop,
                            actions=actions, should_stop=stop_requested, clock=clock)
    timer_ref.append(controller.timer)
    finished = controller.run()
    if checkpointer is not None:
        step = int(trainer.global_step.numpy())
        latest = checkpointer.manager.latest_checkpoint
        if not latest or not latest.endswith(f"-{step}"):
            checkpointer.save()  # At the end, and where a preempted run stopped.
    timer = controller.timer
    if not timer.steady_steps:  # A single loop: the traced one is all there is.
        timer.steady_seconds, timer.steady_steps = timer.seconds, timer.steps
    return FitResult(
        history=history,
        step_time_ms=1000 * timer.steady_seconds / timer.steady_steps if timer.steady_steps else 0.0,
        examples_per_sec=(timer.steady_steps * config.batch_size / timer.steady_seconds
                          if timer.steady_seconds else 0.0),
        stopped_by=None if finished else (stopped_by[0] if stopped_by else "stop"))
