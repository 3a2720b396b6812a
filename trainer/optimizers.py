"""Optimizers by name (Keras 2 classes; loss scaling is added by the Trainer)."""

from __future__ import annotations

from trainer.compat import keras
from trainer.errors import ConfigError


def build(name: str, learning_rate):
    """Returns a fresh Keras 2 optimizer ``name`` with ``learning_rate`` (float or schedule)."""
    opt = keras.optimizers
    factories = {
        "sgd": lambda: opt.SGD(learning_rate),
        "momentum": lambda: opt.SGD(learning_rate, momentum=0.9),
        "adam": lambda: opt.Adam(learning_rate),
        "adamw": lambda: opt.AdamW(learning_rate, weight_decay=1e-4),
        "rmsprop": lambda: opt.RMSprop(learning_rate),
    }
    if name not in factories:
        raise ConfigError(
            f"unknown optimizer {name!r}; choose one of: {', '.join(factories)} (--optimizer)")
    return factories[name]()
