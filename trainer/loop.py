"""The loop decides *when* (epochs, step loops, evaluation, logging); the Trainer does *what*."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional

from trainer.trainer import Trainer


@dataclasses.dataclass
class EpochLog:
    """What one epoch produced; ``ms_per_step`` is wall time over the epoch's steps."""

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
    """The run's history and steady-state speed (the first, tracing, step loop excluded)."""

    history: List[EpochLog]
    step_time_ms: float
    examples_per_sec: float


def fit(trainer: Trainer, *, epochs: int, steps_per_loop: int,
        on_epoch_end: Optional[Callable[[EpochLog], None]] = None,
        clock: Callable[[], float] = time.perf_counter) -> FitResult:
    """Trains ``epochs`` epochs in compiled loops of up to ``steps_per_loop`` steps.

    Each epoch ends with an evaluation on the validation split (when there is one) and a call
    to ``on_epoch_end``.
    """
    datasets = trainer.datasets
    batch = trainer.config.batch_size
    history: List[EpochLog] = []
    steady_time, steady_steps, first_loop = 0.0, 0, True
    for epoch in range(1, epochs + 1):
        trainer.train_results(reset=True)
        epoch_time, done = 0.0, 0
        while done < datasets.steps_per_epoch:
            n = min(steps_per_loop, datasets.steps_per_epoch - done)
            start = clock()
            trainer.train_steps(n)
            int(trainer.global_step.numpy())  # Waits for the device, so the clock is honest.
            elapsed = clock() - start
            epoch_time += elapsed
            done += n
            if not first_loop:
                steady_time, steady_steps = steady_time + elapsed, steady_steps + n
            first_loop = False
        validation = trainer.evaluate(datasets.validation) if datasets.validation else {}
        log = EpochLog(
            epoch=epoch, epochs=epochs, train=trainer.train_results(), validation=validation,
            ms_per_step=1000 * epoch_time / done, examples_per_sec=done * batch / epoch_time,
            loss_scale=trainer.loss_scale, skipped_steps=int(trainer.skipped_steps.numpy()),
            global_step=int(trainer.global_step.numpy()))
        history.append(log)
        if on_epoch_end:
            on_epoch_end(log)
    if not steady_steps and history:  # A single loop: nothing but the traced one to report.
        steady_time = sum(h.ms_per_step * datasets.steps_per_epoch for h in history) / 1000
        steady_steps = datasets.steps_per_epoch * len(history)
    return FitResult(
        history=history,
        step_time_ms=1000 * steady_time / steady_steps if steady_steps else 0.0,
        examples_per_sec=steady_steps * batch / steady_time if steady_time else 0.0)
