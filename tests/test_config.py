"""TrainConfig validation: every bad value is refused early, naming the field and the flag."""

import dataclasses

import pytest

from trainer.config import TrainConfig, parse_loss_scale, parse_model_args
from trainer.errors import ConfigError, UserError


@pytest.mark.parametrize("field, value, flag", [
    ("policy", "float16", "--policy"),
    ("policy", "mixed_float32", "--policy"),
    ("device", "tpu", "--device"),
    ("dataset", "cifar10", "--dataset"),
    ("optimizer", "lamb", "--optimizer"),
    ("epochs", -1, "--epochs"),
    ("batch_size", 0, "--batch_size"),
    ("batch_size", 2.5, "--batch_size"),
    ("steps_per_loop", 0, "--steps_per_loop"),
    ("learning_rate", 0.0, "--learning_rate"),
    ("learning_rate", float("nan"), "--learning_rate"),
    ("validation_split", 1.0, "--validation_split"),
    ("validation_split", -0.1, "--validation_split"),
    ("loss_scale", -1, "--loss_scale"),
    ("loss_scale", "abc", "--loss_scale"),
    ("loss_scale", "0", "--loss_scale"),
    ("loss_scale", "inf", "--loss_scale"),
    ("seed", -3, "--seed"),
    ("model_args", "units", "--model_args"),
    ("data_dir", "/nonexistent/folder", "--data_dir"),
])
def test_bad_value_names_field_and_flag(field, value, flag):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    message = str(info.value)
    assert flag in message
    assert "\n" not in message  # One line for run.py's `error:` output.
    assert isinstance(info.value, UserError)


def test_fp16_on_hpu_refused_by_config():
    with pytest.raises(ConfigError, match="mixed_bfloat16"):
        TrainConfig(device="hpu", policy="mixed_float16")


@pytest.mark.parametrize("policy, expected", [
    ("float32", "none"), ("mixed_bfloat16", "dynamic"), ("mixed_float16", "dynamic")])
def test_loss_scale_defaults_per_policy(policy, expected):
    assert TrainConfig(policy=policy).resolved_loss_scale == expected


@pytest.mark.parametrize("text, expected", [
    ("dynamic", "dynamic"), ("NONE", "none"), ("auto", "auto"), (None, "auto"),
    ("128", 128.0), (" 1024.0 ", 1024.0), (4, 4.0)])
def test_parse_loss_scale(text, expected):
    assert parse_loss_scale(text) == expected


def test_explicit_loss_scale_overrides_default():
    config = TrainConfig(policy="float32", loss_scale="256")
    assert config.loss_scale == 256.0 and config.resolved_loss_scale == 256.0
    assert TrainConfig(policy="mixed_bfloat16", loss_scale="none").resolved_loss_scale == "none"


def test_parse_model_args_types():
    assert parse_model_args("units=64, rate=0.5,flag=true,name=wide") == {
        "units": 64, "rate": 0.5, "flag": True, "name": "wide"}
    assert parse_model_args("") == {}
    assert TrainConfig(model_args="units=32").model_args == {"units": 32}


def test_config_is_frozen_and_replace_revalidates():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]
    assert config.replace(epochs=3).epochs == 3
    with pytest.raises(ConfigError, match="--batch_size"):
        config.replace(batch_size=0)


def test_keyword_only():
    with pytest.raises(TypeError):
        TrainConfig("float32")  # type: ignore[misc]


def test_metrics_file_that_is_a_directory_refused(tmp_path):
    with pytest.raises(ConfigError, match="--metrics_file"):
        TrainConfig(metrics_file=str(tmp_path))


@pytest.mark.parametrize("value, words", [
    ("1e40", "too large"),  # Above float32's maximum: used to fail mid-training.
    ("1e38", "too large"),  # Representable, but 1/scale flushes to zero: nothing learns.
    (2.0 ** 126 * 1.0000001, "too large"),
    (10 ** 400, "too large"),  # An int no float can hold.
    ("inf", "too large"),
    ("0.5", "below 1"),
    (1e-30, "below 1"),
    ("nan", "positive number"),
    ("-inf", "positive number"),
    (True, "positive number"),
])
def test_fixed_loss_scale_out_of_range_refused(value, words):
    with pytest.raises(ConfigError) as info:
        parse_loss_scale(value)
    message = str(info.value)
    assert words in message and "--loss_scale" in message
    assert "\n" not in message and len(message) < 300


@pytest.mark.parametrize("value, expected", [
    ("1", 1.0), (1, 1.0), ("32768", 32768.0), (2.0 ** 126, 2.0 ** 126), ("1_000", 1000.0)])
def test_fixed_loss_scale_in_range_accepted(value, expected):
    assert parse_loss_scale(value) == expected


def test_fixed_loss_scale_limits_match_tensorflow():
    """The largest scale accepted still unscales to the true gradient; the next power of 2
    would silently make every gradient 0 (the reciprocal is a subnormal, flushed to zero)."""
    from trainer.compat import keras, tf
    from trainer.config import MAX_FIXED_LOSS_SCALE, MIN_FIXED_LOSS_SCALE
    from trainer.core.loss_scale import LossScaler

    def unscaled_gradient(scale):
        scaler = LossScaler(keras.optimizers.SGD(0.1), mode=scale)
        weight = tf.Variable(1.0)

        @tf.function
        def gradient():
            with tf.GradientTape() as tape:
                loss = scaler.scale_loss(weight * 0.5)
            return scaler.unscale_gradients(tape.gradient(loss, [weight]))[0]

        return float(gradient())

    assert unscaled_gradient(MAX_FIXED_LOSS_SCALE) == 0.5
    assert unscaled_gradient(MIN_FIXED_LOSS_SCALE) == 0.5
    assert unscaled_gradient(MAX_FIXED_LOSS_SCALE * 2) == 0.0


def test_jit_compile_on_hpu_is_refused_up_front():
    with pytest.raises(ConfigError, match="jit_compile.*XLA.*Gaudi.*--jit_compile"):
        TrainConfig(device="hpu", jit_compile=True)
    TrainConfig(device="cpu", jit_compile=True)  # XLA exists on the CPU and GPU.


# The allowed values live in trainer/config.py (flags parse before TensorFlow is imported);
# the modules that implement them must agree, so a name is never accepted by one and refused
# by the other.
def test_policies_match_precision():
    from trainer.config import POLICIES
    from trainer.core import precision

    assert tuple(precision.POLICY_COMPUTE_DTYPES) == POLICIES


def test_optimizers_and_schedules_match_optimizers_module():
    from trainer.config import OPTIMIZERS, SCHEDULES
    from trainer.core import optimizers

    for name in OPTIMIZERS:
        built = optimizers.build(name, 0.01)
        assert float(built.learning_rate.numpy()) == pytest.approx(0.01), name
    with pytest.raises(ConfigError) as info:
        optimizers.build("lamb", 0.01)
    assert f"choose one of: {', '.join(OPTIMIZERS)}" in str(info.value)
    for name in SCHEDULES:
        lr = optimizers.schedule(name, 0.5, total_steps=10, warmup_steps=0)
        assert float(lr(0) if callable(lr) else lr) == pytest.approx(0.5), name
    with pytest.raises(ConfigError):
        optimizers.schedule("linear", 0.5, total_steps=10)


def test_datasets_come_from_the_data_module():
    from trainer import data
    from trainer.config import dataset_names

    assert dataset_names() == tuple(data.DATASET_SHAPES)
    for name in data.DATASET_SHAPES:
        assert TrainConfig(dataset=name).dataset == name
    assert TrainConfig(dataset="tfds:mnist/3.0.1").dataset == "tfds:mnist/3.0.1"
    for bad in ("cifar10", "tfds:", "Synthetic"):
        with pytest.raises(ConfigError, match="--dataset"):
            TrainConfig(dataset=bad)
