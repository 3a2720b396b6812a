"""Errors a user can fix: the entry point prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in the user's input (flags, files, environment) with a clear fix.

    The message must say what was wrong and how to fix it; ``run.py`` prints it without
    a traceback.
    """


class ConfigError(UserError, ValueError):
    """An invalid configuration value; the message names the argument and the value."""
