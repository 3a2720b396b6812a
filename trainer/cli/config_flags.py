"""Command-line flags generated from TrainConfig's fields: each setting is declared once.

A field's name, default and help (``metadata["help"]``) become an absl flag of the same name;
a field with ``metadata["choices"]`` becomes an enum flag, and one with
``metadata["flag"] = False`` is no flag. Nothing here imports TensorFlow, so flags parse (and
a bad value is refused) before it starts; only :func:`describe_registries`, which ``--help``
uses, imports the model zoo.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Iterator, List

from absl import flags

from trainer import registry  # TF-free: the zoo (and TensorFlow) loads at the first lookup.
from trainer.config import TrainConfig, dataset_names

# Field type (as TrainConfig annotates it) -> absl DEFINE function. Mappings and loss scales
# are given as text; TrainConfig parses them ('units=64', 'dynamic', '1024').
_DEFINERS = {
    str: flags.DEFINE_string,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
    typing.Optional[str]: flags.DEFINE_string,
    typing.Mapping[str, typing.Any]: flags.DEFINE_string,
    typing.Union[str, float]: flags.DEFINE_string,
}


def flag_fields() -> Iterator[dataclasses.Field]:
    """TrainConfig's fields that are command-line flags, in declaration order."""
    return (f for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag", True))


def flag_names() -> List[str]:
    """The names of every flag made from TrainConfig (each is also its field's name)."""
    return [f.name for f in flag_fields()]


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        return "" if value == {} else value  # model_args: no arguments.
    return field.default


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> List[str]:
    """Defines one flag per TrainConfig field on ``flag_values``; returns their names.

    Raises:
      TypeError: for a field whose type has no flag kind yet (add it to _DEFINERS).
    """
    hints = typing.get_type_hints(TrainConfig)
    names = []
    for field in flag_fields():
        help_text = field.metadata.get("help") or field.name
        choices = field.metadata.get("choices")
        if choices:
            flags.DEFINE_enum(field.name, _default(field), list(choices), help_text,
                              flag_values=flag_values)
        elif hints[field.name] in _DEFINERS:
            _DEFINERS[hints[field.name]](field.name, _default(field), help_text,
                                         flag_values=flag_values)
        else:
            raise TypeError(f"TrainConfig.{field.name} has type {hints[field.name]}, which has "
                            "no flag kind; add it to trainer/cli/config_flags.py's _DEFINERS")
        names.append(field.name)
    return names


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS, **overrides) -> TrainConfig:
    """The validated TrainConfig of parsed ``flag_values`` (``overrides`` replace fields).

    Raises:
      ConfigError: for a value TrainConfig refuses.
    """
    values = {name: flag_values[name].value for name in flag_names()}
    values.update(overrides)
    return TrainConfig(**values)


def describe_models() -> str:
    """One line per registered model: its name and ``--model_args`` with their defaults."""
    lines = []
    for name in registry.model_names():
        params = inspect.signature(registry.get_model_builder(name)).parameters.values()
        args = [p for p in params if p.name not in ("input_shape", "num_classes")
                and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        shown = ",".join(f"{p.name}={_show(p.default)}" for p in args) or "(no arguments)"
        lines.append(f"{name}: {shown}")
    return "; ".join(lines)


def _show(value) -> str:
    if value is inspect.Parameter.empty:
        return "REQUIRED"
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe_registries(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Adds the registered models and datasets to the help of --model and --dataset."""
    flag_values["model"].help = (f"{flag_values['model'].help} Registered models and their "
                                 f"--model_args defaults: {describe_models()}.")
    flag_values["dataset"].help = (f"{flag_values['dataset'].help} Datasets: "
                                   f"{', '.join(dataset_names())}, tfds:NAME[/CONFIG].")
