"""SIGTERM/SIGINT turn into a request to stop cleanly after the current step loop."""

from __future__ import annotations

import signal
from typing import Optional


class PreemptionWatcher:
    """While active, SIGTERM and SIGINT set ``signal_name`` instead of killing the process.

    The loop polls :attr:`signal_name` between step loops; the workers vote on it
    (:meth:`trainer.runtime.lockstep.Lockstep.stop_vote`), so all of them stop at the same step, save
    a checkpoint and exit 0. A second signal falls back to the default behaviour, so a stuck
    run can still be stopped.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name
        for sig, handler in self._previous.items():
            # A process started in the background by a non-interactive shell inherits SIGINT
            # ignored; restoring that would make the second signal do nothing, so the
            # default action (end the process) takes its place.
            signal.signal(sig, signal.SIG_DFL if handler == signal.SIG_IGN else handler)

    def __enter__(self) -> "PreemptionWatcher":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # Not the main thread: signals cannot be caught here.
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # Only a handler that is still ours: one set since (a worker leaving with an
            # error, Lockstep.fail_together) must outlive the block, or the launcher's
            # SIGTERM would kill the worker before it prints why it stops.
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler)
        self._previous.clear()
