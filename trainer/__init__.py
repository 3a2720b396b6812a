"""Mixed-precision training with TensorFlow custom training loops.

The public API (docs/architecture.md lists it; everything else may change):

- ``Trainer`` -- subclass it to train your own model, loss, data or step.
- ``TrainConfig`` -- every setting of a run, validated when built.
- ``run(config, trainer_cls=..., actions=...)`` -- one training job end to end.
- ``main(argv=None)`` -- the command line (``python run.py``, ``mptrain``).
- ``register_model(name)`` -- add a model that ``--model=name`` builds.
- ``fit``, ``Controller``, ``PeriodicAction`` -- the loop and its actions, for your own runs.
- ``UserError``, ``ConfigError``, ``TrainingStopped`` -- errors printed as one ``error:`` line.
- ``data`` -- datasets: ``trainer.data.from_arrays(...)``, ``from_datasets``, ``load_arrays``.

Names are imported on first use (PEP 562): ``import trainer`` and ``--help`` stay free of
TensorFlow until something that needs it is touched.
"""

import importlib

_EXPORTS = {
    "Controller": "trainer.loop.controller",
    "ConfigError": "trainer.errors",
    "PeriodicAction": "trainer.loop.actions",
    "TrainConfig": "trainer.config",
    "Trainer": "trainer.core.steps",
    "TrainingStopped": "trainer.errors",
    "UserError": "trainer.errors",
    "fit": "trainer.loop.fit_loop",
    "main": "trainer.cli.main",
    "register_model": "trainer.registry",
    "run": "trainer.job",
}
_SUBPACKAGES = ("data",)

__all__ = sorted([*_EXPORTS, *_SUBPACKAGES])


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"trainer.{name}")
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
