"""Periodic actions: the loop decides *when*, an action decides *what*.

An action wraps a callable ``fn(step, now)``. The loop calls the action after every compiled
step loop with the global step and a clock reading; the action decides whether it is due.
Step-based actions also tell the loop how far away they are, so a step loop never runs past
a boundary (a checkpoint every 250 steps lands on step 250, not 300).
"""

from __future__ import annotations

from typing import Callable, Optional


class PeriodicAction:
    """Runs ``fn(step, now)`` every ``every_steps`` steps and/or ``every_secs`` seconds.

    With neither set, it runs after every step loop (e.g. a progress bar).

    Args:
      fn: the work; receives the global step (int) and the clock reading (float seconds).
      every_steps: run when the global step is a multiple of this (0: not step-based).
      every_secs: run when this many seconds passed since the last run (0: not time-based).
      name: for messages.
    """

    def __init__(self, fn: Callable[[int, float], None], *, every_steps: int = 0,
                 every_secs: float = 0.0, name: Optional[str] = None):
        if every_steps < 0 or every_secs < 0:
            raise ValueError(f"every_steps and every_secs must be >= 0, got {every_steps}, "
                             f"{every_secs}")
        self.fn = fn
        self.every_steps = every_steps
        self.every_secs = every_secs
        self.name = name or getattr(fn, "__name__", "action")
        self._last_time: Optional[float] = None

    def steps_until_due(self, step: int) -> Optional[int]:
        """Steps until the next step-based run (None when not step-based)."""
        if not self.every_steps:
            return None
        return self.every_steps - step % self.every_steps

    def is_due(self, step: int, now: float) -> bool:
        if not self.every_steps and not self.every_secs:
            return True
        if self.every_steps and step % self.every_steps == 0:
            return True
        if self.every_secs:
            if self._last_time is None:
                self._last_time = now  # The clock starts with the first loop.
            return now - self._last_time >= self.every_secs
        return False

    def __call__(self, step: int, now: float, *, force: bool = False) -> bool:
        """Runs ``fn`` if due (or ``force``); returns whether it ran."""
        if not (force or self.is_due(step, now)):
            return False
        self.fn(step, now)
        self._last_time = now
        return True
