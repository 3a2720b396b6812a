"""The model registry: names are unique, unknown names and bad arguments are refused clearly."""

import sys

import pytest

from trainer import registry
from trainer.compat import keras
from trainer.errors import ConfigError


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    # Test models must not leak into other tests; the built-in zoo is loaded first.
    registry.model_names()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _tiny(*, input_shape, num_classes, width: int = 4):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Dense(width)(keras.layers.Flatten()(inputs))
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs)


def test_builtin_mlp_registered():
    assert "mlp" in registry.model_names()
    model = registry.build_model("mlp", input_shape=(28, 28, 1), num_classes=10,
                                 model_args={"units": 8})
    assert model.count_params() == (784 * 8 + 8) + (8 * 8 + 8) + (8 * 10 + 10)


def test_register_and_build():
    registry.register_model("tiny_test")(_tiny)
    assert "tiny_test" in registry.model_names()
    model = registry.build_model("tiny_test", input_shape=(4, 4, 1), num_classes=3,
                                 model_args={"width": 5})
    assert model.count_params() == (16 * 5 + 5) + (5 * 3 + 3)


def test_duplicate_name_refused():
    registry.register_model("dup_test")(_tiny)
    registry.register_model("dup_test")(_tiny)  # The same builder again (a re-import): fine.

    def other(*, input_shape, num_classes):
        return _tiny(input_shape=input_shape, num_classes=num_classes)

    with pytest.raises(ValueError, match="'dup_test' is already registered by .*_tiny"):
        registry.register_model("dup_test")(other)
    assert registry.get_model_builder("dup_test") is _tiny
    with pytest.raises(ValueError, match=r"'mlp' is built in \(trainer.models.mlp\)"):
        registry.register_model("mlp")(other)
    assert registry.get_model_builder("mlp") is not other


def test_builtin_models_come_from_the_zoo_table():
    # Each name in the table is the function of that name in its trainer.models module, and
    # no top-level package named `models` (a user's own, say) is ever looked up for them.
    for name, module in registry.BUILTIN_MODELS.items():
        builder = registry.get_model_builder(name)
        assert (builder.__module__, builder.__name__) == (module, name)
    assert set(registry.BUILTIN_MODELS) == {"mlp", "cnn", "resnet", "transformer"}
    assert set(registry.BUILTIN_MODELS) <= set(registry.model_names())
    assert "models" not in sys.modules


def test_unknown_model_lists_names():
    registry.register_model("listed_test")(_tiny)
    with pytest.raises(ConfigError) as info:
        registry.get_model_builder("resnet9000")
    message = str(info.value)
    assert "'resnet9000'" in message and "--model" in message
    assert "mlp" in message and "listed_test" in message


def test_bad_model_args_refused():
    with pytest.raises(ConfigError) as info:
        registry.check_model_args("mlp", {"units": 8, "depth": 3})
    assert "'depth'" in str(info.value) and "units" in str(info.value)
    assert "--model_args" in str(info.value)
    with pytest.raises(ConfigError, match="units must be a positive integer"):
        registry.build_model("mlp", input_shape=(28, 28, 1), num_classes=10,
                             model_args={"units": 0})


def test_var_keyword_builder_accepts_any_args():
    def flexible(*, input_shape, num_classes, **kwargs):
        return _tiny(input_shape=input_shape, num_classes=num_classes, **kwargs)

    registry.register_model("flex_test")(flexible)
    registry.check_model_args("flex_test", {"anything": 1})


def test_help_describes_every_model_with_its_argument_defaults():
    from trainer.cli import config_flags as trainer_flags

    @registry.register_model("help_probe")
    def help_probe(*, input_shape, num_classes, width: int = 3, gated: bool = False,
                   rate: float = 0.5):
        raise AssertionError("not built")

    text = trainer_flags.describe_models()
    assert "mlp: units=256" in text.split("; ")
    assert "help_probe: width=3,gated=false,rate=0.5" in text.split("; ")
    assert len(text.split("; ")) == len(registry.model_names())
