"""Gradient accumulation and the step's update rules, on one device and on two replicas.

k micro-batches must give the update of one big batch (float32 to rounding, bf16 to its
precision); a variable without a gradient must not move; the per-replica batch must divide
by k. The two-replica checks run in a subprocess, because the two logical CPUs they need must
be configured before TensorFlow starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, small_config, user_stderr_lines

from trainer.compat import keras
from trainer.core.contracts import check_accumulation
from trainer.core.steps import Trainer
from trainer.errors import UserError

# bf16 keeps 8 mantissa bits: the same batch computed as 4 micro-batches or as one differs by
# about 0.2-0.8% in the norm of each weight update (measured). A lost micro-batch would be
# 25% off, a mean instead of a sum 4x.
BF16_RTOL = 0.03


def _deltas(trainer, steps=2):
    before = [v.numpy() for v in trainer.model.trainable_variables]
    trainer.train_steps(steps)
    return [b - v.numpy() for b, v in zip(before, trainer.model.trainable_variables)]


def _relative_errors(got, expected):
    return [float(np.linalg.norm(g - e) / np.linalg.norm(e)) for g, e in zip(got, expected)]


@pytest.mark.parametrize("policy, rtol", [("float32", 1e-5), ("mixed_bfloat16", BF16_RTOL)])
def test_micro_batches_equal_one_big_batch(policy, rtol):
    common = dict(policy=policy, optimizer="sgd", learning_rate=0.5, model_args={"units": 64})
    whole = Trainer(small_config(**common))
    micro = Trainer(small_config(grad_accum_steps=4, **common))
    expected, got = _deltas(whole), _deltas(micro)
    assert int(micro.global_step.numpy()) == 2  # Optimizer steps, not micro-batches.
    assert max(_relative_errors(got, expected)) < rtol
    # The logged loss is the per-example mean of the same 64 examples either way.
    assert micro.train_results()["loss"] == pytest.approx(whole.train_results()["loss"],
                                                          rel=10 * rtol)


class SpareLayerTrainer(Trainer):
    """A model with a trainable layer the loss never uses."""

    def build_model(self):
        model = super().build_model()
        model.spare = keras.layers.Dense(3, name="spare", kernel_initializer="ones")
        model.spare.build((None, 4))
        return model


@pytest.mark.parametrize("accum", [1, 4])
def test_variable_without_gradient_does_not_move(accum):
    # AdamW given a zero gradient would still decay the weight; the spare layer gets None.
    trainer = SpareLayerTrainer(small_config(optimizer="adamw", grad_accum_steps=accum))
    assert any(v is trainer.model.spare.kernel for v in trainer.model.trainable_variables)
    trainer.train_steps(3)
    np.testing.assert_array_equal(trainer.model.spare.kernel.numpy(), np.ones((4, 3)))
    np.testing.assert_array_equal(trainer.model.spare.bias.numpy(), np.zeros(3))
    assert int(trainer.global_step.numpy()) == 3


def test_per_replica_batch_must_divide_by_accumulation_steps():
    config = small_config(batch_size=12, grad_accum_steps=4)  # 12 % 4 == 0 globally.
    check_accumulation(config, replicas=1)
    with pytest.raises(UserError) as info:
        check_accumulation(config, replicas=2)  # 6 per replica.
    assert str(info.value) == (
        "--batch_size=12 gives 6 examples per replica on 2 replicas, which "
        "--grad_accum_steps=4 cannot split into equal micro-batches; use a --batch_size "
        "divisible by 8 (e.g. --batch_size=8 or --batch_size=16) or --grad_accum_steps=3")
    # Every value it suggests works.
    for batch, accum in ((8, 4), (16, 4), (12, 3)):
        check_accumulation(config.replace(batch_size=batch, grad_accum_steps=accum),
                            replicas=2)


TWO_REPLICAS = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from trainer.compat import tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    from conftest import small_config
    from test_accumulation import SpareLayerTrainer
    from trainer.errors import UserError
    from trainer.core.steps import Trainer

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {{"replicas": mirrored.num_replicas_in_sync}}

    def deltas(trainer):
        before = [v.numpy() for v in trainer.model.trainable_variables]
        trainer.train_steps(2)
        return [b - v.numpy() for b, v in zip(before, trainer.model.trainable_variables)]

    def errors(got, expected):
        return [float(np.linalg.norm(g - e) / np.linalg.norm(e)) for g, e in zip(got, expected)]

    for policy in ("float32", "mixed_bfloat16"):
        common = dict(policy=policy, optimizer="sgd", learning_rate=0.5, model_args={{"units": 64}})
        expected = deltas(Trainer(small_config(**common)))  # One device, one big batch.
        micro = Trainer(small_config(grad_accum_steps=4, **common), strategy=mirrored)
        out[policy] = errors(deltas(micro), expected)
        out[policy + "_step"] = int(micro.global_step.numpy())

    class Probe(SpareLayerTrainer):
        # Step 2's loss (so every gradient) is Inf on both replicas.
        def compute_loss(self, labels, outputs):
            loss = super().compute_loss(labels, outputs)
            poison = tf.where(tf.equal(self.global_step, 2), np.inf, 1.0)
            return loss * tf.cast(poison, loss.dtype)

    class Diverging(Trainer):
        def compute_loss(self, labels, outputs):
            return super().compute_loss(labels, outputs) * float("inf")

    def probe(strategy, loss_scale):
        trainer = Probe(small_config(optimizer="adamw", loss_scale=loss_scale,
                                     grad_accum_steps=2), strategy=strategy)
        with strategy.scope():
            out["merge_call"] = strategy.extended._use_merge_call()
        trainer.train_steps(2)
        before = [v.numpy() for v in trainer.model.trainable_variables]
        trainer.train_steps(1)
        unchanged = all(np.array_equal(b, v.numpy())
                        for b, v in zip(before, trainer.model.trainable_variables))
        trainer.train_steps(2)
        return {{"step": int(trainer.global_step.numpy()),
                "skipped": int(trainer.skipped_steps.numpy()),
                "skip_kept_weights": unchanged, "scale": trainer.loss_scale,
                "spare_untouched": bool(np.all(trainer.model.spare.kernel.numpy() == 1.0)),
                "finite": trainer.weights_finite()}}

    for loss_scale in ("none", "dynamic"):
        out["mirrored_" + loss_scale] = probe(mirrored, loss_scale)
    storm = Diverging(small_config(max_consecutive_skips=4, policy="float32"), strategy=mirrored)
    storm.train_steps(20)
    out["storm_step"] = int(storm.global_step.numpy())
    try:
        Trainer(small_config(batch_size=12, grad_accum_steps=4), strategy=mirrored)
    except UserError as error:
        out["uneven"] = str(error)
    out["multi_worker"] = probe(tf.distribute.MultiWorkerMirroredStrategy(), "none")
    print("RESULT " + json.dumps(out))
""")


def _result_of(template: str, *, timeout: float) -> dict:
    """Runs ``template`` (a script over 2 logical CPUs) in a fresh process: its RESULT line."""
    script = template.format(root=str(ROOT), tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, "\n".join(user_stderr_lines(proc.stderr)[-30:])
    return json.loads(lines[-1][len("RESULT "):])


def test_two_replicas_accumulate_skip_and_stop_like_one_device():
    out = _result_of(TWO_REPLICAS, timeout=900)
    assert out["replicas"] == 2
    # 2 replicas x 4 micro-batches of 4 == one device's batch of 32 (each step's update).
    assert max(out["float32"]) < 1e-5 and out["float32_step"] == 2
    assert max(out["mixed_bfloat16"]) < BF16_RTOL and out["mixed_bfloat16_step"] == 2
    # CPU strategies apply through merge_call: the skip's cond runs in cross-replica context.
    assert out["merge_call"] is True
    for name, scale in (("mirrored_none", 1.0), ("mirrored_dynamic", 2.0 ** 14),
                        ("multi_worker", 1.0)):
        assert out[name] == {"step": 5, "skipped": 1, "skip_kept_weights": True,
                             "scale": scale, "spare_untouched": True, "finite": True}, name
    assert out["storm_step"] == 4  # Stopped at the limit, inside a loop of 20.
    assert out["uneven"].startswith("--batch_size=12 gives 6 examples per replica on 2 "
                                    "replicas, which --grad_accum_steps=4 cannot split")


L2 = 0.05


def l2_mlp(*, input_shape, num_classes, units=16):
    """A tiny MLP with an L2 penalty on its Dense kernels (``model.losses`` is not empty)."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(units, activation="relu",
                           kernel_regularizer=keras.regularizers.L2(L2))(x)
    x = keras.layers.Dense(num_classes, kernel_regularizer=keras.regularizers.L2(L2))(x)
    outputs = keras.layers.Activation("softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="l2_mlp")


def _reference_update(model, features, labels, lr):
    """-lr * gradient of (mean cross-entropy over the whole batch + the L2 penalty, once)."""
    from trainer.compat import tf

    kernels = [v for v in model.trainable_variables if "kernel" in v.name]
    with tf.GradientTape() as tape:
        probs = model(features, training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, probs))
        loss += tf.add_n([L2 * tf.reduce_sum(tf.square(k)) for k in kernels])
    return [lr * g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


@pytest.mark.parametrize("accum", [2, 4])
def test_regularization_is_counted_once_per_update_under_accumulation(register_model, accum):
    register_model("l2_mlp_accum_test")(l2_mlp)
    lr = 0.5
    common = dict(model="l2_mlp_accum_test", policy="float32", optimizer="sgd",
                  learning_rate=lr)
    whole = Trainer(small_config(**common))
    micro = Trainer(small_config(grad_accum_steps=accum, **common))
    assert len(micro.model.losses) == 2
    reference_model = keras.models.clone_model(whole.model)
    reference_model.set_weights(whole.model.get_weights())
    features, labels = next(iter(whole.datasets.train))  # Step 0's batch of 32.
    reference = _reference_update(reference_model, features, labels, lr)
    expected, got = _deltas(whole, steps=1), _deltas(micro, steps=1)
    assert int(micro.global_step.numpy()) == 1
    # Both equal the hand-computed update (the penalty counted once, not k times)...
    assert max(_relative_errors(expected, reference)) < 1e-5
    assert max(_relative_errors(got, reference)) < 1e-5
    # ...and keep equal over later steps.
    expected, got = _deltas(whole, steps=2), _deltas(micro, steps=2)
    assert max(_relative_errors(got, expected)) < 1e-5


TWO_REPLICAS_L2 = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from trainer.compat import tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    from conftest import small_config
    from test_accumulation import l2_mlp
    from trainer import registry
    from trainer.core.steps import Trainer

    registry.register_model("l2_mlp_accum_test")(l2_mlp)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    common = dict(model="l2_mlp_accum_test", policy="float32", optimizer="sgd",
                  learning_rate=0.5)

    def deltas(trainer):
        before = [v.numpy() for v in trainer.model.trainable_variables]
        trainer.train_steps(2)
        return [b - v.numpy() for b, v in zip(before, trainer.model.trainable_variables)]

    expected = deltas(Trainer(small_config(**common)))  # One device, one big batch.
    out = {{"replicas": mirrored.num_replicas_in_sync}}
    for accum in (1, 2):
        got = deltas(Trainer(small_config(grad_accum_steps=accum, **common), strategy=mirrored))
        out[str(accum)] = [float(np.linalg.norm(g - e) / np.linalg.norm(e))
                           for g, e in zip(got, expected)]
    print("RESULT " + json.dumps(out))
""")


def test_two_replicas_count_the_regularization_once():
    # Each replica adds the penalty to its share of the loss; the strategy sums the replicas'
    # gradients, so each must add 1 / replicas of it (1 / (replicas * k) per micro-batch).
    out = _result_of(TWO_REPLICAS_L2, timeout=600)
    assert out["replicas"] == 2
    assert max(out["1"]) < 1e-5, out["1"]
    assert max(out["2"]) < 1e-5, out["2"]
