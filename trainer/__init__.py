"""Mixed-precision training with TensorFlow custom loops (Keras 2 loss scaling, explicit).

The public names are imported lazily (PEP 562), so ``import trainer.config`` (what ``run.py``
needs to define its flags) does not pull in TensorFlow and ``--help`` stays fast.
"""

import importlib

_EXPORTS = {
    "main": "trainer.app",
    "run": "trainer.app",
    "PeriodicAction": "trainer.actions",
    "TrainConfig": "trainer.config",
    "Trainer": "trainer.trainer",
    "register_model": "trainer.registry",
    "UserError": "trainer.errors",
    "ConfigError": "trainer.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
