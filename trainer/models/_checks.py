"""Argument checks shared by the zoo's builders (one clear ConfigError per bad value)."""

from trainer.errors import ConfigError


def positive_int(model: str, name: str, value) -> int:
    """Returns ``value`` when it is an int >= 1, else raises ConfigError naming the argument."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"{model}: {name} must be a positive integer, got {value!r} (--model_args)")
    return value


def fraction(model: str, name: str, value) -> float:
    """Returns ``value`` when it is a number in [0, 1), else raises ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{model}: {name} must be a number in [0, 1), got {value!r} (--model_args)")
    return float(value)
