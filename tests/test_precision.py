"""Dtype policies per layer, and the float32-output rule (refuse, or cast when asked)."""

import numpy as np
import pytest
from conftest import small_config

from trainer import registry
from trainer.compat import keras, mixed_precision, tf
from trainer.core import precision
from trainer.core.steps import Trainer
from trainer.errors import UserError


def _mlp(policy):
    with precision.policy_scope(policy):
        return registry.build_model("mlp", input_shape=(28, 28, 1), num_classes=10,
                                    model_args={"units": 16})


@pytest.mark.parametrize("policy, compute", [
    ("float32", "float32"), ("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")])
def test_mlp_layer_dtypes_per_policy(policy, compute):
    rows = {row["name"]: row for row in precision.layer_dtypes(_mlp(policy))}
    for name in ("dense_1", "dense_2", "dense_logits"):
        assert rows[name]["compute_dtype"] == compute, name
        assert rows[name]["variable_dtype"] == "float32", name  # Variables stay float32.
    assert rows["predictions"]["class"] == "Activation"
    assert rows["predictions"]["compute_dtype"] == "float32"
    assert rows["predictions"]["variable_dtype"] == "float32"


@pytest.mark.parametrize("policy, compute", [
    ("float32", tf.float32), ("mixed_bfloat16", tf.bfloat16), ("mixed_float16", tf.float16)])
def test_mlp_tensors_per_policy(policy, compute):
    model = _mlp(policy)
    outputs = model(tf.zeros((2, 28, 28, 1)))
    assert outputs.dtype == tf.float32
    assert all(w.dtype == tf.float32 for w in model.weights)
    logits = keras.Model(model.inputs, model.get_layer("dense_logits").output)(tf.zeros((2, 28, 28, 1)))
    assert logits.dtype == compute


def test_policy_scope_restores_global_policy():
    before = mixed_precision.global_policy().name
    with precision.policy_scope("mixed_float16"):
        assert mixed_precision.global_policy().name == "mixed_float16"
    assert mixed_precision.global_policy().name == before
    with pytest.raises(RuntimeError):
        with precision.policy_scope("mixed_bfloat16"):
            raise RuntimeError("boom")
    assert mixed_precision.global_policy().name == before


def _bf16_output_model(input_shape, num_classes):
    # The classic mistake: the softmax inherits the mixed policy and outputs bf16.
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(num_classes, name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="bad_softmax")(x)
    return keras.Model(inputs, outputs, name="bf16_out")


class Bf16OutputTrainer(Trainer):
    def build_model(self):
        return _bf16_output_model(self.datasets.input_shape, self.datasets.num_classes)


def test_check_output_dtypes_names_layer_and_fix():
    with precision.policy_scope("mixed_bfloat16"):
        model = _bf16_output_model((28, 28, 1), 10)
    outputs = model(tf.zeros((1, 28, 28, 1)))
    assert outputs.dtype == tf.bfloat16
    with pytest.raises(UserError) as info:
        precision.check_output_dtypes(model, outputs, policy="mixed_bfloat16", auto_cast=False)
    message = str(info.value)
    assert "'bad_softmax'" in message and "bfloat16" in message
    assert "dtype='float32'" in message and "--auto_cast_outputs" in message
    # The keras.applications case: their softmax is built in; take logits and add one.
    assert "classifier_activation=None" in message and "\n" not in message
    # Opting in, or a float32 policy, passes.
    precision.check_output_dtypes(model, outputs, policy="mixed_bfloat16", auto_cast=True)
    precision.check_output_dtypes(model, outputs, policy="float32", auto_cast=False)


def test_trainer_refuses_bf16_output_model():
    with pytest.raises(UserError, match="output layer 'bad_softmax' produces bfloat16"):
        Bf16OutputTrainer(small_config(policy="mixed_bfloat16"))


def test_trainer_auto_casts_outputs_when_asked(capsys):
    trainer = Bf16OutputTrainer(small_config(policy="mixed_bfloat16", auto_cast_outputs=True))
    assert trainer._forward(tf.zeros((3, 28, 28, 1)), training=False).dtype == tf.float32
    before = trainer.weights_checksum()
    trainer.train_steps(3)
    assert int(trainer.global_step.numpy()) == 3
    assert trainer.weights_checksum() != before
    results = trainer.evaluate(trainer.datasets.test)
    assert np.isfinite(results["loss"]) and 0.0 <= results["accuracy"] <= 1.0
    # One warning for the whole run (not one per trace or step), naming the cast layer.
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
    assert warnings == [
        "warning: --auto_cast_outputs: casting the 16-bit output of model 'bf16_out' layer(s) "
        "'bad_softmax' (bfloat16) to float32 under policy mixed_bfloat16; a softmax computed in "
        "16 bits stays imprecise after the cast: give that layer dtype='float32' instead"]


def test_auto_cast_is_silent_when_outputs_are_float32(capsys):
    trainer = Trainer(small_config(policy="mixed_bfloat16", auto_cast_outputs=True))
    trainer.train_steps(1)
    assert "warning:" not in capsys.readouterr().err


def test_cast_outputs_leaves_integers_alone():
    out = precision.cast_outputs({"p": tf.ones((2,), tf.bfloat16), "i": tf.ones((2,), tf.int32)})
    assert out["p"].dtype == tf.float32 and out["i"].dtype == tf.int32
