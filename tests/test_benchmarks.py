"""The benchmark's experiments compute what the default path computes, and its targets table."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_config

from trainer import compat, registry
from trainer.compat import keras, tf
from trainer.core import precision
from trainer.core.steps import Trainer

pytest.importorskip("tf_keras")  # benchmarks/cast_once.py reaches into tf_keras (TF >= 2.16).

from benchmarks import cast_once, run, suite  # noqa: E402


def _weights(trainer):
    return [w.numpy() for w in trainer.model.weights]


@pytest.mark.skipif(compat.KERAS_MAJOR == 3, reason=(
    "cast_once patches Keras 2's AutoCastVariable; Keras 3 casts variables in its own way "
    "(the Keras 2 lane, KERAS2_TESTS, runs it)"))
def test_cast_once_trains_the_same_weights_and_skips_the_weight_casts():
    config = small_config(policy="mixed_bfloat16", batch_size=48, deterministic=True)
    plain, shadowed = Trainer(config), cast_once.CastOnceTrainer(config)
    for trainer in (plain, shadowed):
        trainer.train_steps(3)
        trainer.train_steps(4)
        assert int(trainer.global_step.numpy()) == 7
    for a, b in zip(_weights(plain), _weights(shadowed)):
        np.testing.assert_array_equal(a, b)
    # The forward pass reads the bf16 shadows: no float32 -> bf16 cast of a weight is left.
    graph = shadowed._train_loop.get_concrete_function(
        None, tf.constant(1), tf.constant(1, tf.int64)).graph.as_graph_def()
    def weight_casts(function_name_part):
        return [n for f in graph.library.function if function_name_part in f.signature.name
                for n in f.node_def if n.op == "Cast" and n.attr["DstT"].type == tf.bfloat16
                and "ReadVariableOp" in "".join(n.input)]

    # The step (the loop body) casts no weight; the refresh before the loop casts each once.
    assert not weight_casts("while_body")
    plain_graph = plain._train_loop.get_concrete_function(
        None, tf.constant(1), tf.constant(1, tf.int64)).graph.as_graph_def()
    assert any("ReadVariableOp" in "".join(n.input) and n.op == "Cast"
               for f in plain_graph.library.function if "while_body" in f.signature.name
               for n in f.node_def)  # ... where the default step casts every weight.
    # A weight changed between calls (a restore) reaches the shadows at the next call.
    kernel = shadowed.model.trainable_variables[0]
    kernel.assign(tf.zeros_like(kernel))
    plain.model.trainable_variables[0].assign(tf.zeros_like(kernel))
    plain.train_steps(1)
    shadowed.train_steps(1)
    for a, b in zip(_weights(plain), _weights(shadowed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_whole_step_update_trains_the_same_weights(policy):
    config = small_config(policy=policy, optimizer="adamw", lr_schedule="cosine",
                          warmup_steps=2, deterministic=True)
    default, whole = Trainer(config), Trainer(config)
    suite.whole_step_update(whole)
    for trainer in (default, whole):
        trainer.train_steps(3)
        trainer.train_steps(4)
    for a, b in zip(_weights(default), _weights(whole)):  # Both compiled by XLA.
        np.testing.assert_array_equal(a, b)
    assert whole.loss_scale == default.loss_scale and int(whole.global_step.numpy()) == 7


@pytest.mark.skipif(compat.KERAS_MAJOR == 3, reason=(
    "Keras 2's LayerNormalization has a fused kernel path (`_fused`); Keras 3's has none (the "
    "Keras 2 lane, KERAS2_TESTS, runs this)"))
def test_transformer_fused_ops_uses_the_fused_layer_norm():
    def build(fused_ops):
        keras.utils.set_random_seed(1)
        with precision.policy_scope("mixed_bfloat16"):
            return registry.build_model("transformer", input_shape=(28, 28, 1), num_classes=10,
                                        model_args={"fused_ops": fused_ops})

    plain, fused = build(False), build(True)
    norms = [layer for layer in fused.layers
             if isinstance(layer, keras.layers.LayerNormalization)]
    assert len(norms) == 5 and all(layer._fused for layer in norms)
    assert not any(getattr(layer, "_fused", False) for layer in plain.layers)
    assert plain.count_params() == fused.count_params()
    images = tf.random.uniform((4, 28, 28, 1), seed=3)
    # The same weights: only epsilon and the GELU form differ, so outputs stay close.
    np.testing.assert_allclose(plain(images).numpy(), fused(images).numpy(), atol=2e-2)


def _result(ms_per_step, flops=1e9):
    return {"ms_per_step": ms_per_step, "examples_per_sec": 128 / (ms_per_step / 1000),
            "flops_per_sec": flops / (ms_per_step / 1000), "train_flops_per_step": flops}


def test_targets_table_reads_this_runs_ratios():
    kinds = ("ours", *suite.LEVERS, "fit", "fit+fused_update")
    seed = {f"{kind}/{policy}": _result(ms) for kind in kinds
            for policy, ms in (("float32", 1.0), ("mixed_bfloat16", 1.2))}
    seed["ours/float32"] = _result(0.8)  # ours / fit+fused = 1.25 in float32
    seed["ours/mixed_bfloat16"] = _result(1.1)  # 1.09 in bf16: missed
    rows = run.targets({"mlp (seed, units 256)": seed}, {"float32": 1e12, "bfloat16": 2e12})
    table = {target: (measured, verdict) for target, measured, verdict in rows}
    assert table["mlp (seed, units 256), float32: ours / fit+fused >= 1.15"] == ("1.25", "met")
    assert table["mlp (seed, units 256), mixed_bfloat16: ours / fit+fused >= 1.15"] == (
        "1.09", "**missed**")
    assert table["seed MLP: bf16 / float32 >= 1.00x"] == ("0.73x", "**missed**")
    report = run.report({"mlp (seed, units 256)": seed}, {"float32": 1e12, "bfloat16": 2e12})
    assert "| mlp (seed, units 256) | float32 | 160,000 | 128,000 | 128,000 | **1.25** | " \
           "**1.25** |" in report
    assert "| mlp (seed, units 256) | float32 | 0.80 | 1.00 | 1.00 | **1.25x** | **1.25x** |" \
        in report
