"""Optimizers and learning-rate schedules by name (the run's Keras; loss scaling is the Trainer's)."""

from __future__ import annotations

from trainer import compat
from trainer.compat import keras, tf
from trainer.errors import ConfigError
from trainer.runtime import devices


class WarmupConstant(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then constant."""

    def __init__(self, learning_rate: float, warmup_steps: int):
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        fraction = tf.minimum(tf.cast(step, tf.float32) / float(max(self.warmup_steps, 1)), 1.0)
        return self.learning_rate * fraction

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}


def schedule(name: str, learning_rate: float, *, total_steps: int, warmup_steps: int = 0):
    """'constant' (optionally warmed up) or 'cosine' (warm-up, then cosine decay to 0)."""
    if name == "constant":
        return WarmupConstant(learning_rate, warmup_steps) if warmup_steps else learning_rate
    if name == "cosine":
        decay_steps = max(total_steps - warmup_steps, 1)
        if not warmup_steps:
            return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps, warmup_target=learning_rate, warmup_steps=warmup_steps)
    raise ConfigError(f"unknown lr_schedule {name!r}; choose constant or cosine (--lr_schedule)")


def build(name: str, learning_rate):
    """Returns a fresh optimizer of the run's Keras, ``name`` with ``learning_rate`` (float or schedule)."""
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


def current_learning_rate(optimizer) -> float:
    """The learning rate the optimizer used last (evaluates a schedule at the current step)."""
    lr = optimizer.learning_rate
    if callable(lr) and not isinstance(lr, tf.Variable):
        lr = lr(optimizer.iterations)
    return float(tf.convert_to_tensor(lr))


def prepare(optimizer) -> None:
    """Readies the inner optimizer for the Trainer's step: fused (XLA) updates, except on Gaudi.

    Habana's bridge has no XLA, so HPU runs keep the plain update (see
    ``compat.prepare_optimizer`` for what fusing does and why it pays on a CPU).
    """
    compat.prepare_optimizer(optimizer, fuse=not devices.hpu_visible())
