"""The Controller decides *when* (step loops, periodic actions, early stops); the Trainer's
compiled step loop does *what*.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

from trainer.core.steps import Trainer
from trainer.loop.actions import PeriodicAction


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
      after_loop: called with the global step right after every loop, before the actions
        (a check that may raise, e.g. a non-finite storm, so no action saves its state). It
        returns True when it rewound the trainer to an earlier step (a recovery from a
        checkpoint): then no action runs for the abandoned loop and training goes on from
        the restored step.
      clock: seconds as a float (injectable for tests).
    """

    def __init__(self, *, trainer: Trainer, total_steps: int, steps_per_loop: int,
                 actions: Sequence[PeriodicAction] = (),
                 should_stop: Callable[[], bool] = lambda: False,
                 after_loop: Callable[[int], Optional[bool]] = lambda step: None,
                 clock: Callable[[], float] = time.perf_counter):
        self.trainer = trainer
        self.after_loop = after_loop
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
            before, step = step, int(self.trainer.global_step.numpy())  # Waits for the device.
            self.timer.add(step - before, self.clock() - start)  # A storm may end it early.
            if self.after_loop(step):
                step = int(self.trainer.global_step.numpy())  # Rewound: go on from there.
            else:
                if step == before:
                    # The step loop's own stop condition held before its first step, and the
                    # check above did not explain why: looping again would never end.
                    raise RuntimeError(
                        f"a step loop of {n} steps ran none at step {step}; the Trainer's "
                        "stop condition and the loop's after_loop check disagree")
                now = self.clock()
                for action in self.actions:
                    action(step, now)
            if self.should_stop():
                return False
        return True
