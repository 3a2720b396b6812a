"""LossScaler: scaled loss = loss x scale, unscaled gradients, skips, growth, and 'none'."""

import numpy as np
import pytest
from conftest import small_config

from trainer import compat
from trainer.compat import keras, mixed_precision, tf
from trainer.core.loss_scale import LossScaler, all_finite
from trainer.core.steps import Trainer


def _scaler(mode, **kwargs):
    return LossScaler(keras.optimizers.SGD(0.1), mode=mode, **kwargs)


def test_dynamic_scaled_loss_is_loss_times_scale():
    scaler = _scaler("dynamic")
    assert isinstance(scaler.optimizer, mixed_precision.LossScaleOptimizer)
    assert float(scaler.scale) == 2.0 ** 15
    loss = tf.constant(0.731)
    assert float(scaler.scale_loss(loss)) == pytest.approx(0.731 * 2 ** 15, rel=1e-6)
    # Also inside a compiled function, where the Trainer uses it.
    scaled = tf.function(scaler.scale_loss)(loss)
    assert float(scaled) == pytest.approx(0.731 * float(scaler.scale), rel=1e-6)


def test_fixed_scaled_loss_and_unscaled_gradients():
    scaler = _scaler(64.0)
    # A fixed scale has no state to keep: the optimizer is not wrapped (under Keras 3 the
    # wrapper is always dynamic).
    assert scaler.optimizer is scaler.inner_optimizer
    assert not scaler.dynamic and float(scaler.scale) == 64.0
    assert float(scaler.scale_loss(tf.constant(2.5))) == 160.0
    grads = scaler.unscale_gradients([tf.constant([64.0, -128.0]), tf.constant(6.4)])
    np.testing.assert_allclose(grads[0].numpy(), [1.0, -2.0])
    assert float(grads[1]) == pytest.approx(0.1)
    assert int(scaler.good_steps) == 0


def test_none_uses_no_wrapper():
    inner = keras.optimizers.SGD(0.1)
    scaler = LossScaler(inner, mode="none")
    assert scaler.optimizer is inner
    assert not isinstance(scaler.optimizer, mixed_precision.LossScaleOptimizer)
    assert float(scaler.scale) == 1.0
    loss = tf.constant(3.0)
    assert scaler.scale_loss(loss) is loss  # Passed through: nothing added to the graph.
    grads = [tf.constant(1.0)]
    assert scaler.unscale_gradients(grads) is grads


@pytest.mark.parametrize("mode", ["static", 0.0, -2.0, 8])
def test_invalid_mode_refused(mode):
    with pytest.raises(ValueError, match="mode"):
        _scaler(mode)


def test_dynamic_skip_halves_scale_and_keeps_weights():
    scaler = _scaler("dynamic")
    var = tf.Variable([1.0, 2.0])
    scaler.build([var])
    skipped = scaler.apply_gradients([tf.constant([np.inf, 1.0])], [var])
    assert bool(skipped)
    np.testing.assert_array_equal(var.numpy(), [1.0, 2.0])
    assert float(scaler.scale) == 2.0 ** 14
    skipped = scaler.apply_gradients([tf.constant([np.nan, 1.0])], [var])
    assert bool(skipped) and float(scaler.scale) == 2.0 ** 13
    skipped = scaler.apply_gradients([tf.constant([1.0, 1.0])], [var])
    assert not bool(skipped)
    np.testing.assert_allclose(var.numpy(), [0.9, 1.9])
    assert float(scaler.scale) == 2.0 ** 13 and int(scaler.good_steps) == 1


def test_dynamic_scale_grows_after_growth_steps():
    scaler = _scaler("dynamic", growth_steps=3)
    var = tf.Variable([1.0])
    scaler.build([var])
    for expected_good in (1, 2):
        scaler.apply_gradients([tf.constant([0.5])], [var])
        assert int(scaler.good_steps) == expected_good and float(scaler.scale) == 2.0 ** 15
    scaler.apply_gradients([tf.constant([0.5])], [var])
    assert float(scaler.scale) == 2.0 ** 16 and int(scaler.good_steps) == 0


class ReferenceScale:
    """The dynamic-scale rules in plain Python (Keras 2's LossScaleOptimizer's, which the
    scaler follows under both Kerases): halve on a non-finite step, never below 1; double
    after `growth` finite steps unless that overflows float32; a skipped step still counts."""

    def __init__(self, growth):
        self.scale, self.good, self.iterations, self.growth = 2.0 ** 15, 0, 0, growth

    def step(self, finite):
        self.iterations += 1
        if not finite:
            self.scale, self.good = max(self.scale / 2, 1.0), 0
        elif self.good + 1 >= self.growth:
            with np.errstate(over="ignore"):  # Overflow to inf is the case under test.
                doubled = np.float32(self.scale) * np.float32(2)
            self.scale, self.good = (float(doubled) if np.isfinite(doubled) else self.scale), 0
        else:
            self.good += 1


def test_dynamic_scale_follows_the_rules_step_by_step():
    ours = _scaler("dynamic", growth_steps=3)
    reference = ReferenceScale(3)
    var = tf.Variable([1.0, -2.0])
    ours.build([var])
    apply_ours = tf.function(lambda g: ours.apply_gradients([g], [var]))
    finite, inf, nan = [0.5, -0.25], [np.inf, 1.0], [1.0, np.nan]
    # Growth after 3 good steps, halving on Inf and NaN, a skip resets the count, 17 skips
    # in a row reach the floor of 1 and stay there, and growth starts again from the floor.
    sequence = [finite] * 4 + [inf, finite, nan] + [finite] * 3 + [nan] * 17 + [finite] * 4
    expected_var = np.array([1.0, -2.0], np.float32)
    for i, gradient in enumerate(sequence):
        is_finite = bool(np.all(np.isfinite(gradient)))
        skipped = bool(apply_ours(tf.constant(gradient)))
        reference.step(is_finite)
        if is_finite:
            expected_var -= np.float32(0.1) * np.array(gradient, np.float32)
        assert skipped == (not is_finite), i
        assert float(ours.scale) == reference.scale, i
        assert int(ours.good_steps) == reference.good, i
        assert int(ours.optimizer.iterations) == reference.iterations == i + 1, i
        np.testing.assert_allclose(var.numpy(), expected_var, rtol=1e-6)
    assert float(ours.scale) == 2.0  # The floor (1), then one growth.
    # Doubling that would overflow float32 keeps the old scale, as in Keras 2.
    ours.state.scale.assign(2.0 ** 127)
    reference.scale = 2.0 ** 127
    for _ in range(2):  # The good-step counter stood at 1: the second step doubles.
        apply_ours(tf.constant(finite))
        reference.step(True)
    assert float(ours.scale) == reference.scale == 2.0 ** 127
    assert int(ours.good_steps) == reference.good == 0


@pytest.mark.skipif(compat.KERAS_MAJOR == 3, reason=(
    "Keras 3's LossScaleOptimizer counts no iteration on a skipped step and has no floor at "
    "1; the scaler keeps Keras 2's rules under both (test above)"))
def test_dynamic_scale_follows_keras_2_loss_scale_optimizer_step_by_step():
    # Our single-check apply must move the scale, the good-step counter, the step counter
    # and the weights exactly as Keras 2's own LossScaleOptimizer.apply_gradients does.
    ours = _scaler("dynamic", growth_steps=3)
    keras_lso = mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.1),
                                                   dynamic_growth_steps=3)
    ours_var, keras_var = tf.Variable([1.0, -2.0]), tf.Variable([1.0, -2.0])
    ours.build([ours_var])
    keras_lso.build([keras_var])

    def keras_step(gradient):
        # Keras' wrapper driven as in a custom loop: gradients of the scaled loss, unscaled,
        # then its own apply_gradients (x and / by a power of two: exact).
        keras_lso.get_scaled_loss(tf.constant(0.0))
        scaled = [gradient * keras_lso.loss_scale]
        keras_lso.apply_gradients(zip(keras_lso.get_unscaled_gradients(scaled), [keras_var]))

    apply_ours = tf.function(lambda g: ours.apply_gradients([g], [ours_var]))
    apply_keras = tf.function(keras_step)
    finite, inf, nan = [0.5, -0.25], [np.inf, 1.0], [1.0, np.nan]
    sequence = [finite] * 4 + [inf, finite, nan] + [finite] * 3 + [nan] * 17 + [finite] * 4
    for i, gradient in enumerate(sequence):
        gradient = tf.constant(gradient)
        skipped = bool(apply_ours(gradient))
        apply_keras(gradient)
        assert skipped == (not np.all(np.isfinite(gradient.numpy()))), i
        assert float(ours.scale) == float(keras_lso.loss_scale), i
        assert int(ours.good_steps) == int(keras_lso.dynamic_counter), i
        assert int(ours.optimizer.iterations) == int(keras_lso.iterations) == i + 1, i
        np.testing.assert_array_equal(ours_var.numpy(), keras_var.numpy())


def test_loss_scale_state_checkpoints_like_keras(tmp_path):
    ours = _scaler("dynamic", growth_steps=4)
    var = tf.Variable([1.0])
    ours.optimizer.build([var])
    for gradient in ([np.inf], [1.0], [1.0]):
        ours.apply_gradients([tf.constant(gradient)], [var])
    path = tf.train.Checkpoint(optimizer=ours.optimizer).save(str(tmp_path / "ckpt"))
    # A plain LossScaleOptimizer of the run's Keras reads what ours wrote: the same variables.
    keras_lso = mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.1),
                                                   dynamic_growth_steps=4)
    keras_lso.build([tf.Variable([0.0])])
    tf.train.Checkpoint(optimizer=keras_lso).restore(path).assert_existing_objects_matched()
    state = compat.loss_scale_state(keras_lso)
    assert float(state.scale) == 2.0 ** 14
    assert int(state.counter) == 2 and int(keras_lso.iterations) == 3


@pytest.mark.parametrize("mode", ["none", 64.0, "dynamic"])
def test_non_finite_update_is_never_applied(mode):
    scaler = _scaler(mode)
    var = tf.Variable([1.0, 2.0])
    scaler.build([var])
    apply = tf.function(lambda g: scaler.apply_gradients([g], [var]))
    for bad in ([np.inf, 1.0], [np.nan, 0.0], [-np.inf, 0.0]):
        assert bool(apply(tf.constant(bad)))
        np.testing.assert_array_equal(var.numpy(), [1.0, 2.0])
    assert int(scaler.optimizer.iterations) == 3  # Skipped steps still count.
    assert not bool(apply(tf.constant([1.0, 1.0])))
    np.testing.assert_allclose(var.numpy(), [0.9, 1.9])
    expected_scale = {"none": 1.0, 64.0: 64.0, "dynamic": 2.0 ** 12}[mode]
    assert float(scaler.scale) == expected_scale


def _count_ops(concrete, op_type):
    graph = concrete.graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return sum(node.op == op_type for node in nodes)


@pytest.mark.parametrize("mode, extra", [("none", 0), (8.0, 0), ("dynamic", 1)])
def test_one_finiteness_check_per_step(mode, extra):
    # One IsFinite per gradient, once: Keras' wrapper would add a second check of its own.
    # (The dynamic scale's one extra is Keras' rule that a doubling to Inf is not kept.)
    scaler = _scaler(mode)
    variables = [tf.Variable(tf.ones((3, 2))), tf.Variable(tf.ones(2)), tf.Variable(1.0)]
    scaler.build(variables)
    step = tf.function(lambda grads: scaler.apply_gradients(grads, variables))
    concrete = step.get_concrete_function([tf.TensorSpec(v.shape) for v in variables])
    assert _count_ops(concrete, "IsFinite") == len(variables) + extra


def test_variable_without_gradient_is_left_untouched():
    # AdamW would move a variable given a zero gradient (weight decay); None must not.
    scaler = LossScaler(keras.optimizers.AdamW(0.1, weight_decay=0.5), mode="dynamic")
    used, unused = tf.Variable([1.0, 1.0]), tf.Variable([3.0, 3.0])
    scaler.build([used, unused])
    for _ in range(2):
        assert not bool(scaler.apply_gradients([tf.constant([1.0, -1.0]), None], [used, unused]))
    np.testing.assert_array_equal(unused.numpy(), [3.0, 3.0])
    assert np.all(used.numpy() != 1.0)


def test_all_finite():
    assert bool(all_finite([tf.ones(3), None, tf.zeros((2, 2))]))
    assert not bool(all_finite([tf.ones(3), tf.constant([1.0, np.inf])]))
    assert not bool(all_finite([tf.constant(np.nan)]))
    assert bool(all_finite([None]))  # Nothing to check: nothing is non-finite.
    sparse = tf.IndexedSlices(tf.constant([[1.0, np.inf]]), tf.constant([0]), tf.constant([4, 2]))
    assert not bool(all_finite([sparse]))


# ------------------------------------------------------------------ through the Trainer


def test_trainer_none_loss_scale_has_no_wrapper():
    trainer = Trainer(small_config(policy="mixed_bfloat16", loss_scale="none"))
    assert not isinstance(trainer.optimizer, mixed_precision.LossScaleOptimizer)
    assert trainer.optimizer is trainer.loss_scaler.inner_optimizer
    assert trainer.loss_scale == 1.0
    trainer.train_steps(2)
    assert int(trainer.global_step.numpy()) == 2 and int(trainer.skipped_steps.numpy()) == 0


@pytest.mark.parametrize("policy, loss_scale, wrapped, scale", [
    ("float32", "auto", False, 1.0),
    ("mixed_bfloat16", "auto", True, 2.0 ** 15),
    ("mixed_float16", "auto", True, 2.0 ** 15),
    ("float32", "512", False, 512.0),  # A fixed scale needs no wrapper (no state).
])
def test_trainer_loss_scale_defaults(policy, loss_scale, wrapped, scale):
    trainer = Trainer(small_config(policy=policy, loss_scale=loss_scale))
    assert isinstance(trainer.optimizer, mixed_precision.LossScaleOptimizer) == wrapped
    assert trainer.loss_scale == scale


@pytest.mark.parametrize("loss_scale, extra", [("none", 0), ("dynamic", 1)])
def test_trainer_step_checks_once_and_keeps_the_fused_update(loss_scale, extra):
    trainer = Trainer(small_config(policy="mixed_bfloat16", loss_scale=loss_scale))
    trainer.train_steps(1)
    # In-graph input (the in-memory default) passes no iterator.
    iterator = None if trainer.in_graph_input is not None else trainer.train_iterator
    concrete = trainer._train_loop.get_concrete_function(
        iterator, tf.constant(1), tf.constant(1, tf.int64))
    assert trainer._train_loop.experimental_get_tracing_count() == 1  # That same trace.
    n = len(trainer.model.trainable_variables)
    assert _count_ops(concrete, "IsFinite") == n + extra  # One check of the whole step.
    # optimizers.prepare: each variable's update is an XLA-compiled function (Keras 2's
    # update_step_xla, or compat's fused_update_step under Keras 3).
    library = concrete.graph.as_graph_def().library.function
    fused = [f for f in library if "update_step" in f.signature.name
             and f.attr["_XlaMustCompile"].b]
    assert len(fused) == n and all(f.attr["_XlaMustCompile"].b for f in fused)


TINY = 1e-6  # Loss factor: float16 gradients of this loss underflow unless it is scaled.


class TinyLossTrainer(Trainer):
    """The loss x 1e-6: d loss / d logit is about 1e-6 / 32 = 3e-8, under float16's smallest
    subnormal (6e-8), so an unscaled float16 backward pass rounds it to zero."""

    def compute_loss(self, labels, outputs):
        return super().compute_loss(labels, outputs) * TINY


@pytest.mark.parametrize("loss_scale", ["dynamic", "none"])
def test_trainer_step_scaling_saves_float16_gradients_from_underflow(loss_scale):
    # The real step (train_steps) under mixed_float16, against an independent float32
    # gradient of the same loss on the same batch: with SGD, (w0 - w1) / rate = gradient. The
    # rate 1e6 makes the update large enough that the weights' float32 rounding is negligible.
    lr = 1 / TINY
    trainer = TinyLossTrainer(small_config(policy="mixed_float16", loss_scale=loss_scale,
                                           optimizer="sgd", learning_rate=lr))
    # The same model built under float32 (a clone would copy the float16 layer policies).
    reference_model = Trainer(small_config(policy="float32")).model
    reference_model.set_weights(trainer.model.get_weights())
    features, labels = next(iter(trainer.datasets.train))  # What the first step reads.
    with tf.GradientTape() as tape:
        probs = reference_model(features, training=True)
        loss = TINY * tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, probs))
    reference = [g.numpy() for g in tape.gradient(loss, reference_model.trainable_variables)]
    before = [v.numpy() for v in trainer.model.trainable_variables]
    trainer.train_steps(1)
    assert int(trainer.skipped_steps.numpy()) == 0
    steps = [(b - v.numpy()) / lr for b, v in zip(before, trainer.model.trainable_variables)]
    errors = [np.linalg.norm(s - r) / np.linalg.norm(r) for s, r in zip(steps, reference)]
    if loss_scale == "dynamic":
        assert trainer.loss_scale == 2.0 ** 15
        # Scaled by 2**15 the gradients are float16 normals (10 bits: 0.05% each), and
        # unscaling is exact: measured, every variable within 0.05% of float32 in norm.
        assert max(errors) < 5e-3, errors
    else:
        # Unscaled, every float16 gradient underflowed to zero (measured): no weight moved,
        # and the step still counts as finite (zero is finite).
        assert min(errors) > 0.99, errors
