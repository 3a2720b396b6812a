"""Errors a user can fix: the entry point prints them as one line and exits non-zero."""

import os
import sys
from typing import NoReturn


class UserError(Exception):
    """A mistake in the user's input (flags, files, environment) with a clear fix.

    The message must say what was wrong and how to fix it; ``run.py`` prints it without
    a traceback.
    """


class ConfigError(UserError, ValueError):
    """An invalid configuration value; the message names the argument and the value."""


class TrainingStopped(UserError):
    """Training cannot usefully go on (a non-finite storm); the message says where and why."""


def exit_with(error: Exception) -> "NoReturn":
    """Prints ``error: <message>`` as the last line of the process's output and exits 1.

    ``os._exit`` skips TensorFlow's teardown: in a multi-worker job whose peer died, its gRPC
    threads would otherwise print pages of C++ log lines after ours, or hang on shutdown.
    """
    sys.stdout.flush()
    print(f"error: {error}", file=sys.stderr, flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os._exit(1)


def warn(message: str) -> None:
    """Prints one ``warning: message`` line on stderr: the run's one channel for warnings."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _print_user_errors(kind, error, traceback) -> None:
    """An uncaught UserError in a user's script is one ``error:`` line and exit status 1.

    ``run.py`` catches them itself; a script calling ``trainer.run`` gets the same output
    instead of a traceback through the library. Any other exception goes to the previous hook.
    """
    if issubclass(kind, UserError):
        sys.stdout.flush()
        print(f"error: {error}", file=sys.stderr, flush=True)
        return
    _previous_hook(kind, error, traceback)


_previous_hook = sys.excepthook
sys.excepthook = _print_user_errors
