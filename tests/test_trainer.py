"""The Trainer's numbers: bf16 vs float32 gradients, skipped steps, step loops, learning."""

import numpy as np
import pytest

from conftest import small_config
from trainer import app
from trainer.compat import tf
from trainer.trainer import Trainer


def _weights(trainer):
    return [w.numpy() for w in trainer.model.weights]


def _unscaled_gradients(trainer, features, labels):
    # The same sequence as the Trainer's step: scale inside the tape, unscale after it.
    variables = trainer.model.trainable_variables
    with tf.GradientTape() as tape:
        outputs = trainer._forward(features, training=True)
        loss = tf.reduce_mean(trainer.compute_loss(labels, outputs))
        scaled = trainer.loss_scaler.scale_loss(loss)
    scaled_grads = tape.gradient(scaled, variables)
    return scaled_grads, trainer.loss_scaler.unscale_gradients(scaled_grads)


def test_bf16_unscaled_gradients_match_float32():
    f32 = Trainer(small_config(policy="float32", model_args={"units": 64}))
    bf16 = Trainer(small_config(policy="mixed_bfloat16", model_args={"units": 64}))
    # Same seed, same initial (float32) weights under both policies.
    for a, b in zip(_weights(f32), _weights(bf16)):
        np.testing.assert_array_equal(a, b)
    features, labels = next(iter(f32.datasets.test))
    _, reference = _unscaled_gradients(f32, features, labels)
    scaled, unscaled = _unscaled_gradients(bf16, features, labels)
    assert bf16.loss_scale == 2.0 ** 15
    for var, ref, got, big in zip(f32.model.trainable_variables, reference, unscaled, scaled):
        assert got.dtype == tf.float32, var.name
        ref, got = ref.numpy(), got.numpy()
        norm = np.linalg.norm(ref)
        assert norm > 0, var.name
        # bf16 keeps 8 mantissa bits (eps 2**-8 = 0.4%); through three bf16 matmuls and
        # their backward passes the gradients measured here differ by about 0.5% (logits
        # layer) to 6% (first layer) in norm, with cosine similarity >= 0.998. A missing
        # unscale would be 32768x off, a wrong dtype path far less aligned.
        assert np.linalg.norm(got - ref) / norm < 0.12, var.name
        assert np.dot(got.ravel(), ref.ravel()) / (norm * np.linalg.norm(got)) > 0.995, var.name
        assert np.linalg.norm(big.numpy()) / norm == pytest.approx(2.0 ** 15, rel=0.05)
    # And bf16 really computed in bf16: the gradients are not bit-identical to float32.
    assert any(not np.array_equal(r.numpy(), u.numpy()) for r, u in zip(reference, unscaled))


class PoisonedTrainer(Trainer):
    """Makes the loss (and so every gradient) non-finite on step ``POISON_STEP``."""

    POISON_STEP = 2

    def compute_loss(self, labels, outputs):
        loss = super().compute_loss(labels, outputs)
        poison = tf.where(tf.equal(self.global_step, self.POISON_STEP), np.inf, 1.0)
        return loss * tf.cast(poison, loss.dtype)


def test_non_finite_step_is_skipped():
    trainer = PoisonedTrainer(small_config(policy="mixed_bfloat16"))
    trainer.train_steps(2)
    before = _weights(trainer)
    scale = trainer.loss_scale
    assert int(trainer.skipped_steps.numpy()) == 0 and scale == 2.0 ** 15
    trainer.train_steps(1)  # Step 2: gradients are Inf/NaN.
    for a, b in zip(before, _weights(trainer)):
        np.testing.assert_array_equal(a, b)
    assert trainer.loss_scale == scale / 2
    assert int(trainer.skipped_steps.numpy()) == 1
    assert int(trainer.global_step.numpy()) == 3  # A skipped step still counts as a step.
    trainer.train_steps(1)  # Step 3 is finite again and updates the weights.
    assert any(not np.array_equal(a, b) for a, b in zip(before, _weights(trainer)))
    assert int(trainer.skipped_steps.numpy()) == 1 and trainer.loss_scale == scale / 2


def test_nan_batch_is_skipped_inside_a_step_loop():
    trainer = PoisonedTrainer(small_config(policy="mixed_float16"))
    trainer.train_steps(5)  # Steps 0-4 in one compiled call; step 2 is poisoned.
    assert int(trainer.skipped_steps.numpy()) == 1
    assert trainer.loss_scale == 2.0 ** 14
    assert int(trainer.global_step.numpy()) == 5
    assert all(np.all(np.isfinite(w)) for w in _weights(trainer))


def test_steps_per_loop_matches_single_steps():
    looped = Trainer(small_config(policy="mixed_bfloat16"))
    single = Trainer(small_config(policy="mixed_bfloat16"))
    assert looped.weights_checksum() == single.weights_checksum()
    looped.train_steps(4)
    assert int(looped.global_step.numpy()) == 4
    for expected in range(1, 5):
        single.train_steps(1)
        assert int(single.global_step.numpy()) == expected
    for a, b in zip(_weights(looped), _weights(single)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert looped.weights_checksum() == pytest.approx(single.weights_checksum(), rel=1e-9)
    # The step count is a tensor: different counts reuse one trace.
    assert looped._train_loop.experimental_get_tracing_count() == 1
    assert single._train_loop.experimental_get_tracing_count() == 1
    looped.train_steps(3)
    assert int(looped.global_step.numpy()) == 7
    assert looped._train_loop.experimental_get_tracing_count() == 1


def test_variables_exist_before_first_trace():
    trainer = Trainer(small_config(policy="mixed_bfloat16", optimizer="adam"))
    names = lambda: sorted(v.name for v in trainer.optimizer.variables)  # noqa: E731
    before = names()
    # Adam: two slots per trainable variable, created at construction.
    assert len(before) >= 2 * len(trainer.model.trainable_variables)
    trainer.train_steps(1)
    assert names() == before


def test_evaluate_is_compiled_once_and_matches_eager():
    trainer = Trainer(small_config(policy="float32"))
    trainer.train_steps(4)
    first = trainer.evaluate(trainer.datasets.test)
    second = trainer.evaluate(trainer.datasets.test)
    assert first == second
    assert trainer._eval_loop.experimental_get_tracing_count() == 1
    # Eager reference over the same test split.
    losses, correct, count = [], 0, 0
    for features, labels in trainer.datasets.test:
        probs = trainer.model(features, training=False)
        losses.append(trainer.compute_loss(labels, probs).numpy())
        correct += int(np.sum(np.argmax(probs.numpy(), axis=1) == labels.numpy()))
        count += len(labels)
    assert first["loss"] == pytest.approx(float(np.mean(np.concatenate(losses))), rel=1e-5)
    assert first["accuracy"] == pytest.approx(correct / count, abs=1e-6)


def test_weights_checksum_is_float64_sum():
    trainer = Trainer(small_config())
    expected = sum(float(np.sum(w.astype(np.float64))) for w in _weights(trainer))
    assert trainer.weights_checksum() == pytest.approx(expected, rel=1e-12)


def test_same_seed_same_run_different_seed_differs():
    a, b = Trainer(small_config(seed=3)), Trainer(small_config(seed=3))
    a.train_steps(3)
    b.train_steps(3)
    assert a.weights_checksum() == b.weights_checksum()
    assert Trainer(small_config(seed=4)).weights_checksum() != Trainer(small_config(seed=3)).weights_checksum()
    np.testing.assert_array_equal(a.model.weights[0].numpy(), b.model.weights[0].numpy())


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_short_run_lowers_the_loss(policy):
    config = small_config(policy=policy, synthetic_examples=1024, epochs=3, batch_size=32,
                          model_args={"units": 64}, steps_per_loop=8, validation_split=0.25,
                          learning_rate=3e-3)
    summary = app.run(config)
    history = summary["history"]
    assert len(history) == 3
    # Measured: 2.03 -> 0.21 (float32), 2.03 -> 0.26 (mixed_bfloat16).
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert summary["global_step"] == 3 * (768 // 32)
    assert summary["skipped_steps"] == 0
    assert summary["test_accuracy"] > 0.8  # 10 balanced classes: chance is about 0.1.
