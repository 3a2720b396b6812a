"""LossScaler: scaled loss = loss x scale, unscaled gradients, skips, growth, and 'none'."""

import numpy as np
import pytest

from conftest import small_config
from trainer.compat import keras, mixed_precision, tf
from trainer.loss_scale import LossScaler, all_finite
from trainer.trainer import Trainer


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
    assert isinstance(scaler.optimizer, mixed_precision.LossScaleOptimizer)
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
    scaler.optimizer.build([var])
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
    scaler.optimizer.build([var])
    for expected_good in (1, 2):
        scaler.apply_gradients([tf.constant([0.5])], [var])
        assert int(scaler.good_steps) == expected_good and float(scaler.scale) == 2.0 ** 15
    scaler.apply_gradients([tf.constant([0.5])], [var])
    assert float(scaler.scale) == 2.0 ** 16 and int(scaler.good_steps) == 0


def test_all_finite():
    assert bool(all_finite([tf.ones(3), None, tf.zeros((2, 2))]))
    assert not bool(all_finite([tf.ones(3), tf.constant([1.0, np.inf])]))
    assert not bool(all_finite([tf.constant(np.nan)]))


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
    ("float32", "512", True, 512.0),
])
def test_trainer_loss_scale_defaults(policy, loss_scale, wrapped, scale):
    trainer = Trainer(small_config(policy=policy, loss_scale=loss_scale))
    assert isinstance(trainer.optimizer, mixed_precision.LossScaleOptimizer) == wrapped
    assert trainer.loss_scale == scale


def test_trainer_scaled_loss_matches_current_scale():
    trainer = Trainer(small_config(policy="mixed_bfloat16"))
    trainer.train_steps(2)
    features, labels = next(iter(trainer.datasets.train))

    @tf.function
    def losses():
        outputs = trainer._forward(features, training=False)
        loss = tf.reduce_mean(trainer.compute_loss(labels, outputs))
        return loss, trainer.loss_scaler.scale_loss(loss), trainer.loss_scaler.scale

    loss, scaled, scale = (float(t) for t in losses())
    assert scale == trainer.loss_scale == 2.0 ** 15
    assert scaled == pytest.approx(loss * scale, rel=1e-6)
