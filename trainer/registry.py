"""Models register by name; ``--model`` picks one. Duplicate names are refused."""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Callable, Dict

from trainer.errors import ConfigError, UserError

ModelBuilder = Callable[..., "object"]
_REGISTRY: Dict[str, ModelBuilder] = {}
_BUILTINS_LOADED = False
# The built-in zoo (trainer/models/): model name -> the module whose function of that name
# builds it. Declared here, not registered by the zoo on import, so that the registry imports
# the zoo and never the other way round, and so that no top-level package named `models`
# (a user's own, say) is ever looked up in its place.
BUILTIN_MODELS = {
    "mlp": "trainer.models.mlp",
    "cnn": "trainer.models.cnn",
    "resnet": "trainer.models.resnet",
    "transformer": "trainer.models.transformer",
}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``builder(*, input_shape, num_classes, **model_args)`` as ``name``.

    Raises:
      ValueError: when ``name`` is already registered, or is a built-in model's (two models
        must not share a name).
    """

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in BUILTIN_MODELS:
            raise ValueError(f"a model named {name!r} is built in ({BUILTIN_MODELS[name]}); "
                             "pick another name")
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(
                f"a model named {name!r} is already registered by "
                f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}; pick another name")
        _REGISTRY[name] = builder
        return builder

    return decorator


def _load_builtin_models() -> None:
    # On first lookup, not at import: the zoo imports TensorFlow, and flags parse before it.
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for name, module in BUILTIN_MODELS.items():
            _REGISTRY[name] = getattr(importlib.import_module(module), name)


def model_names() -> list:
    """Names of every registered model, sorted."""
    _load_builtin_models()
    return sorted(_REGISTRY)


def get_model_builder(name: str) -> ModelBuilder:
    """Returns the builder registered as ``name``; ConfigError listing the choices if none."""
    _load_builtin_models()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))} (--model)")
    return _REGISTRY[name]


def check_model_args(name: str, model_args: dict) -> None:
    """Raises ConfigError when ``model_args`` holds a keyword the builder does not take."""
    params = inspect.signature(get_model_builder(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = sorted(set(params) - {"input_shape", "num_classes"})
    for key in model_args:
        if key not in allowed:
            raise ConfigError(
                f"model {name!r} takes no argument {key!r}; it accepts: "
                f"{', '.join(allowed) or 'none'} (--model_args)")


def build_model(name: str, *, input_shape, num_classes: int, model_args: dict):
    """Builds the registered model ``name`` (call under the wanted dtype policy)."""
    check_model_args(name, model_args)
    from trainer.compat import tf  # Deferred: the registry is imported before TensorFlow.

    try:
        return get_model_builder(name)(input_shape=input_shape, num_classes=num_classes,
                                       **model_args)
    except (tf.errors.ResourceExhaustedError, MemoryError) as error:
        text = re.sub(r"\{\{.*?\}\}\s*", "", getattr(error, "message", None) or str(error))
        first = text.strip().splitlines()
        raise UserError(
            f"model {name!r} with --model_args={_args_text(model_args)} does not fit in memory "
            f"({type(error).__name__}: {first[0][:150] if first else ''}); choose smaller "
            "--model_args") from None


def _args_text(model_args: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in model_args.items()) or "''"
