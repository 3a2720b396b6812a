"""``--profile_steps=START,END``: a TensorBoard profiler trace of global steps START+1..END.

Training runs in compiled step loops of ``--steps_per_loop`` steps, and the profiler can only
start and stop between them. So the action below makes the loop end at exactly START and END
(as a checkpoint every N steps does), starts the trace when the global step is START and stops
it at END: the trace holds whole step loops of exactly those steps. Every worker breaks its
loops at the same steps (they run in lockstep); only the chief traces, into
``MODEL_DIR/profile`` (``tensorboard --logdir=MODEL_DIR`` shows it under Profile).
"""

from __future__ import annotations

from typing import List, Optional

from trainer.compat import tf
from trainer.config import TrainConfig, parse_profile_steps
from trainer.loop.actions import PeriodicAction
from trainer.outputs import layout


class StepProfiler(PeriodicAction):
    """Starts the profiler at global step ``start`` and stops it at ``end``.

    Use it as a context manager around training, so a run that stops early (an error, a
    preemption, fewer steps than ``end``) still closes the trace.

    Args:
      start, end: the global steps between which the trace runs (0 <= start < end; an
        empty range, start == end, does nothing).
      logdir: where the trace goes (``logdir/plugins/profile/RUN/HOST.xplane.pb``).
      enabled: False on workers other than the chief: loops still break at the same steps.
      step: the global step training starts from (a resumed run may be inside the range).
    """

    def __init__(self, start: int, end: int, logdir: str, *, enabled: bool = True,
                 step: int = 0):
        super().__init__(self._at_step, name="profile")
        self.start, self.end, self.logdir, self.enabled = start, end, logdir, enabled
        self.running = False
        self.done = step >= end
        if not self.done and step >= start:
            self._start_trace()  # Before the first loop: step 0, or a resume inside the range.

    @classmethod
    def from_config(cls, config: TrainConfig, *, is_chief: bool,
                    step: int) -> "StepProfiler":
        """The profiler ``config.profile_steps`` asks for (one doing nothing when unset)."""
        if not config.profile_steps:
            return cls(0, 0, "", enabled=False)  # An empty range: no action, no trace.
        start, end = parse_profile_steps(config.profile_steps)
        return cls(start, end, layout.profile(config.model_dir), enabled=is_chief,
                   step=step)

    @property
    def actions(self) -> List[PeriodicAction]:
        return [] if self.done else [self]

    def steps_until_due(self, step: int) -> Optional[int]:
        if self.done:
            return None
        boundary = self.end if self.running or step >= self.start else self.start
        return boundary - step if boundary > step else None

    def is_due(self, step: int, now: float) -> bool:
        del now
        return not self.done and step >= (self.end if self.running else self.start)

    def _at_step(self, step: int, now: float) -> None:
        del now
        if not self.running and step < self.end:
            self._start_trace()
        elif step >= self.end:
            self.stop()

    def _start_trace(self) -> None:
        self.running = True
        if self.enabled:
            tf.profiler.experimental.start(self.logdir)

    def stop(self) -> None:
        """Ends the trace and writes it (idempotent)."""
        if self.running and self.enabled:
            tf.profiler.experimental.stop()
        self.running = False
        self.done = True

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
