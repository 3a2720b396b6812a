"""The Trainer's numbers: bf16 vs float32 gradients, skipped steps, step loops, learning."""

import dataclasses

import numpy as np
import pytest
from conftest import small_config

from trainer import job
from trainer.compat import keras, tf
from trainer.core import precision
from trainer.core.steps import Trainer
from trainer.errors import TrainingStopped, UserError
from trainer.loop import fit_loop


def _weights(trainer):
    return [w.numpy() for w in trainer.model.weights]


def _reference_gradients(model, features, labels):
    """Float32 gradients of the mean cross-entropy, by a plain tape: no Trainer code involved."""
    with tf.GradientTape() as tape:
        probs = model(features, training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, probs))
    return tape.gradient(loss, model.trainable_variables)


def _step_gradients(trainer, lr):
    """The gradient the Trainer's own step applied: one real SGD step, w1 = w0 - lr * grad."""
    before = [v.numpy() for v in trainer.model.trainable_variables]
    trainer.train_steps(1)
    return [(b - v.numpy()) / lr for b, v in zip(before, trainer.model.trainable_variables)]


def test_bf16_step_gradients_match_float32():
    lr = 1.0
    common = dict(model_args={"units": 64}, optimizer="sgd", learning_rate=lr)
    f32 = Trainer(small_config(policy="float32", **common))
    bf16 = Trainer(small_config(policy="mixed_bfloat16", **common))
    assert bf16.loss_scale == 2.0 ** 15  # The bf16 step scales its loss and unscales after.
    # Same seed, same initial (float32) weights under both policies.
    for a, b in zip(_weights(f32), _weights(bf16)):
        np.testing.assert_array_equal(a, b)
    # The independent reference: a float32 copy of the model, the batch the first step reads.
    with precision.policy_scope("float32"):
        reference_model = keras.models.clone_model(f32.model)
    reference_model.set_weights(f32.model.get_weights())
    features, labels = next(iter(f32.datasets.train))
    reference = [g.numpy() for g in _reference_gradients(reference_model, features, labels)]
    got_f32, got_bf16 = _step_gradients(f32, lr), _step_gradients(bf16, lr)
    assert bf16.loss_scale == 2.0 ** 15 and int(bf16.skipped_steps.numpy()) == 0
    for var, ref, a, b in zip(f32.model.trainable_variables, reference, got_f32, got_bf16):
        norm = np.linalg.norm(ref)
        assert norm > 0, var.name
        # float32: the same math up to rounding (and w - lr*g rounds at |w| * 6e-8).
        assert np.linalg.norm(a - ref) / norm < 1e-4, var.name
        # bf16 keeps 8 mantissa bits (eps 2**-8 = 0.4%); through three bf16 matmuls and
        # their backward passes the gradients differ by about 0.5% (logits layer) to 6%
        # (first layer) in norm, cosine similarity >= 0.998. A missing unscale would be
        # 32768x off, a missing division by the batch 32x, a wrong dtype path less aligned.
        assert np.linalg.norm(b - ref) / norm < 0.12, var.name
        assert np.dot(b.ravel(), ref.ravel()) / (norm * np.linalg.norm(b)) > 0.995, var.name
    # And bf16 really computed in bf16: its gradients are not float32's.
    assert any(not np.allclose(a, b, rtol=1e-4, atol=0) for a, b in zip(got_f32, got_bf16))


def test_deterministic_turns_op_determinism_on():
    # Process-wide TensorFlow state; conftest._restore_determinism turns it off after the test.
    from tensorflow.python.framework import config as tf_config

    assert not tf_config.is_op_determinism_enabled()
    Trainer(small_config(deterministic=True))
    assert tf_config.is_op_determinism_enabled()
    switch = getattr(keras.backend, "experimental", None)  # Keras 2 only: Keras 3 always is.
    assert switch is None or switch.is_tf_random_generator_enabled()


def test_op_determinism_does_not_leak_into_the_next_test():
    # Runs after the test above in this file: a default Trainer gets TensorFlow's defaults.
    from tensorflow.python.framework import config as tf_config

    Trainer(small_config())
    assert not tf_config.is_op_determinism_enabled()
    switch = getattr(keras.backend, "experimental", None)
    assert switch is None or not switch.is_tf_random_generator_enabled()


class PoisonedTrainer(Trainer):
    """Makes the loss (and so every gradient) non-finite on step ``POISON_STEP``."""

    POISON_STEP = 2

    def compute_loss(self, labels, outputs):
        loss = super().compute_loss(labels, outputs)
        poison = tf.where(tf.equal(self.global_step, self.POISON_STEP), np.inf, 1.0)
        return loss * tf.cast(poison, loss.dtype)


@pytest.mark.parametrize("policy, loss_scale", [
    ("mixed_bfloat16", "dynamic"), ("float32", "none"), ("float32", "64"),
    ("mixed_bfloat16", "none")])
def test_non_finite_step_is_skipped(policy, loss_scale):
    trainer = PoisonedTrainer(small_config(policy=policy, loss_scale=loss_scale))
    trainer.train_steps(2)
    before = _weights(trainer)
    scale = trainer.loss_scale
    assert int(trainer.skipped_steps.numpy()) == 0
    trainer.train_steps(1)  # Step 2: gradients are Inf/NaN.
    for a, b in zip(before, _weights(trainer)):
        np.testing.assert_array_equal(a, b)
    # Only a dynamic scale reacts; a fixed one (or none) stays, and the step is skipped anyway.
    assert trainer.loss_scale == (scale / 2 if loss_scale == "dynamic" else scale)
    assert int(trainer.skipped_steps.numpy()) == 1
    assert int(trainer.consecutive_skips.numpy()) == 1
    assert int(trainer.global_step.numpy()) == 3  # A skipped step still counts as a step.
    trainer.train_steps(1)  # Step 3 is finite again and updates the weights.
    assert any(not np.array_equal(a, b) for a, b in zip(before, _weights(trainer)))
    assert int(trainer.skipped_steps.numpy()) == 1
    assert int(trainer.consecutive_skips.numpy()) == 0
    assert trainer.weights_finite()


def test_nan_batch_is_skipped_inside_a_step_loop():
    trainer = PoisonedTrainer(small_config(policy="mixed_float16"))
    trainer.train_steps(5)  # Steps 0-4 in one compiled call; step 2 is poisoned.
    assert int(trainer.skipped_steps.numpy()) == 1
    assert trainer.loss_scale == 2.0 ** 14
    assert int(trainer.global_step.numpy()) == 5
    assert all(np.all(np.isfinite(w)) for w in _weights(trainer))


class TraceCountingTrainer(Trainer):
    """Counts how often ``compute_loss`` runs in Python: once per trace of a compiled loop
    (a compiled call that reuses a trace runs the graph, not this code)."""

    def __init__(self, config, **kwargs):
        self.traces = 0
        super().__init__(config, **kwargs)

    def compute_loss(self, labels, outputs):
        self.traces += 1
        return super().compute_loss(labels, outputs)


def test_steps_per_loop_matches_single_steps():
    looped = TraceCountingTrainer(small_config(policy="mixed_bfloat16"))
    single = TraceCountingTrainer(small_config(policy="mixed_bfloat16"))
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
    assert looped.traces == single.traces == 1
    looped.train_steps(3)
    assert int(looped.global_step.numpy()) == 7
    assert looped.traces == 1


def test_variables_exist_before_first_trace():
    trainer = Trainer(small_config(policy="mixed_bfloat16", optimizer="adam"))
    names = lambda: sorted(v.name for v in trainer.optimizer.variables)  # noqa: E731
    before = names()
    # Adam: two slots per trainable variable, created at construction.
    assert len(before) >= 2 * len(trainer.model.trainable_variables)
    trainer.train_steps(1)
    assert names() == before


def test_evaluate_is_compiled_once_and_matches_eager():
    trainer = TraceCountingTrainer(small_config(policy="float32"))
    trainer.train_steps(4)
    assert trainer.traces == 1  # The train loop's one trace.
    first = trainer.evaluate(trainer.datasets.test)
    second = trainer.evaluate(trainer.datasets.test)
    assert first == second
    assert trainer.traces == 2  # The eval loop's one trace: the second call reused it.
    # Eager reference over the same test split.
    losses, correct, count = [], 0, 0
    for features, labels, weights in trainer.datasets.test:
        real = weights.numpy() > 0  # Padding of the last batch weighs 0.
        probs = trainer.model(features, training=False)
        losses.append(trainer.compute_loss(labels, probs).numpy()[real])
        correct += int(np.sum((np.argmax(probs.numpy(), axis=1) == labels.numpy())[real]))
        count += int(real.sum())
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
    summary = job.run(config)
    history = summary["history"]
    assert len(history) == 3
    # Measured: 2.03 -> 0.21 (float32), 2.03 -> 0.26 (mixed_bfloat16).
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert summary["global_step"] == 3 * (768 // 32)
    assert summary["skipped_steps"] == 0
    assert summary["test_accuracy"] > 0.8  # 10 balanced classes: chance is about 0.1.


class DivergingTrainer(Trainer):
    """Every step's loss, and so every gradient, is Inf or NaN."""

    def compute_loss(self, labels, outputs):
        return super().compute_loss(labels, outputs) * float("inf")


@pytest.mark.parametrize("policy, loss_scale, limit, stop_step", [
    ("mixed_bfloat16", "dynamic", 5, 5),
    ("float32", "none", 7, 7),
    ("float32", "64", 3, 3),
    # No limit: the dynamic scale halves from 2**15 to its floor (1) in 15 skipped steps.
    ("mixed_bfloat16", "dynamic", 0, 15),
])
def test_storm_stops_at_the_exact_step(tmp_path, policy, loss_scale, limit, stop_step):
    trainer = DivergingTrainer(small_config(policy=policy, loss_scale=loss_scale,
                                            max_consecutive_skips=limit,
                                            model_dir=str(tmp_path)))
    before = _weights(trainer)
    trainer.train_steps(40)  # One compiled loop of up to 40 steps: it ends at the storm.
    assert int(trainer.global_step.numpy()) == stop_step
    assert int(trainer.consecutive_skips.numpy()) == int(trainer.skipped_steps.numpy()) == stop_step
    for a, b in zip(before, _weights(trainer)):
        np.testing.assert_array_equal(a, b)  # No non-finite update was applied.
    trainer.train_steps(10)  # Still in the storm: not one more step.
    assert int(trainer.global_step.numpy()) == stop_step
    with pytest.raises(TrainingStopped) as info:
        fit_loop.check_non_finite(trainer, limit)
    message = str(info.value)
    assert message.startswith(f"training stopped at step {stop_step}: ")
    assert "\n" not in message and "no checkpoint was saved" in message
    assert ("--max_consecutive_skips=" in message) == bool(limit)
    assert ("floor (1)" in message) == (not limit)
    with pytest.raises(TrainingStopped,
                       match=f"the last good checkpoint in {tmp_path} is kept"):
        fit_loop.check_non_finite(trainer, limit, has_checkpoint=True)


def test_no_storm_no_stop():
    trainer = PoisonedTrainer(small_config(policy="float32", max_consecutive_skips=2))
    trainer.train_steps(5)  # One skipped step (2) does not reach the limit of 2.
    assert int(trainer.global_step.numpy()) == 5
    fit_loop.check_non_finite(trainer, 2)
    # The limit applies to the step loop as given: with 1, the loop ends right after step 2.
    fresh = PoisonedTrainer(small_config(policy="float32"))
    fresh.train_steps(5, max_consecutive_skips=1)
    assert int(fresh.global_step.numpy()) == 3


def test_weights_finite():
    trainer = Trainer(small_config())
    assert trainer.weights_finite()
    kernel = trainer.model.trainable_variables[0]
    kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0]], [np.nan]))
    assert not trainer.weights_finite()


class PixelLossTrainer(Trainer):
    """The mistake: a loss per pixel ([B, 28, 28]) instead of per example."""

    def compute_loss(self, labels, outputs):
        per_example = super().compute_loss(labels, outputs)
        return tf.tile(per_example[:, None, None], [1, 28, 28])


class MeanLossTrainer(Trainer):
    """The other mistake: the batch mean (a scalar) instead of one value per example."""

    def compute_loss(self, labels, outputs):
        return tf.reduce_mean(super().compute_loss(labels, outputs))


@pytest.mark.parametrize("cls, accum, shape, expected", [
    (PixelLossTrainer, 1, "[32, 28, 28]", "shape [32] (this replica's batch)"),
    (PixelLossTrainer, 4, "[8, 28, 28]", "shape [8] (this replica's micro-batch)"),
    (MeanLossTrainer, 1, "[]", "shape [32] (this replica's batch)"),
])
def test_compute_loss_must_return_one_value_per_example(cls, accum, shape, expected):
    trainer = cls(small_config(grad_accum_steps=accum))
    with pytest.raises(UserError) as info:
        trainer.train_steps(1)
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}.compute_loss returned shape {shape}; it must "
                              f"return one loss per example, {expected}")
    assert "\n" not in message  # One line, not AutoGraph's 'in user code:' stack.
    assert int(trainer.global_step.numpy()) == 0


def _one_hot(features, labels):
    return features, tf.one_hot(labels, 10)


class OneHotTrainTrainer(Trainer):
    """Maps `train` to one-hot targets but forgets `train_from`, which the Trainer reads."""

    def build_datasets(self):
        base = super().build_datasets()
        return dataclasses.replace(base, train=base.train.map(_one_hot))


class OneHotTrainer(Trainer):
    """The same change made to both: accepted."""

    def build_datasets(self):
        base = super().build_datasets()
        return dataclasses.replace(base, train=base.train.map(_one_hot),
                                   train_from=lambda n: base.train_from(n).map(_one_hot))

    def compute_loss(self, labels, outputs):
        return keras.losses.categorical_crossentropy(labels, outputs)

    def update_metrics(self, metrics, labels, outputs):
        pass


def test_train_and_train_from_must_agree():
    with pytest.raises(UserError) as info:
        OneHotTrainTrainer(small_config())
    message = str(info.value)
    assert message.startswith(
        "OneHotTrainTrainer.build_datasets returned a `train` that yields "
        "(float32[32,28,28,1], float32[32,10]) but a `train_from` that yields "
        "(float32[32,28,28,1], int32[32]); ")
    assert "train_from=None" in message and "\n" not in message
    trainer = OneHotTrainer(small_config())
    assert next(trainer.train_iterator)[1].shape == (32, 10)  # What it trains on.
    trainer.train_steps(2)
    assert int(trainer.global_step.numpy()) == 2 and trainer.weights_finite()


class RecordingTrainer(Trainer):
    """Records, inside the compiled step, the features of every batch it trains on."""

    RECORDED_STEPS = 16

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        shape = [self.RECORDED_STEPS, config.batch_size, *self.datasets.input_shape]
        self.seen = tf.Variable(tf.zeros(shape, tf.float32), trainable=False, name="seen")

    def _replica_train_step(self, batch):
        features, _ = batch
        self.seen[self.global_step].assign(features)  # Before the update moves the step.
        return super()._replica_train_step(batch)


class PipelineRecordingTrainer(RecordingTrainer):
    """The same, reading the tf.data pipeline (``train`` replaced by an equal copy)."""

    def build_datasets(self):
        datasets = super().build_datasets()
        return dataclasses.replace(datasets, train=datasets.train_from(0))


@pytest.mark.parametrize("cls, in_graph", [(RecordingTrainer, True),
                                           (PipelineRecordingTrainer, False)])
def test_each_epoch_trains_on_a_new_permutation_of_the_training_split(cls, in_graph):
    # 256 examples in batches of 32: epoch 0 is steps 0-7, epoch 1 steps 8-15.
    trainer = cls(small_config(policy="float32"))
    assert (trainer.in_graph_input is not None) == in_graph
    n, steps = trainer.datasets.num_train, trainer.datasets.steps_per_epoch
    assert (n, steps) == (256, 8) and trainer.RECORDED_STEPS == 2 * steps
    # Every training example, as the step sees it, names its index in the split.
    images = trainer.datasets.in_memory.images
    as_float = (tf.cast(images, tf.float32) * (1.0 / 255.0)).numpy()  # The uint8 contract.
    index = {as_float[i].tobytes(): i for i in range(n)}
    assert len(index) == n  # The synthetic images are all different.
    trainer.train_steps(5)
    trainer.train_steps(11)  # The epoch boundary falls inside this compiled loop.
    assert int(trainer.global_step.numpy()) == 16
    seen = trainer.seen.numpy().reshape(2 * n, *as_float.shape[1:])
    order = np.array([index[example.tobytes()] for example in seen])
    epoch0, epoch1 = order[:n], order[n:]
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(n))
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
    assert not np.array_equal(epoch0, epoch1), "epoch 1 trained on epoch 0's batches again"
    # Not merely the same batches in another order: the examples are regrouped.
    batches0 = {frozenset(b) for b in epoch0.reshape(steps, -1).tolist()}
    batches1 = {frozenset(b) for b in epoch1.reshape(steps, -1).tolist()}
    assert batches0 != batches1
    # The orders are the split's epoch orders, the same on either input path.
    for epoch, got in enumerate((epoch0, epoch1)):
        np.testing.assert_array_equal(got, trainer.datasets.in_memory.order(epoch).numpy())


L2 = 0.05  # Large enough that the regularization gradient is a good share of the update.


def l2_mlp(*, input_shape, num_classes, units=16):
    """A tiny MLP whose Dense kernels carry an L2 penalty (``model.losses`` is not empty)."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(units, activation="relu", name="hidden",
                           kernel_regularizer=keras.regularizers.L2(L2))(x)
    x = keras.layers.Dense(num_classes, name="logits",
                           kernel_regularizer=keras.regularizers.L2(L2))(x)
    outputs = keras.layers.Activation("softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="l2_mlp")


def _regularized_reference(model, features, labels):
    """Gradients of mean cross-entropy + L2 * sum(kernel**2), by a plain tape, and of the
    data term alone; the penalty is written out here, not read from ``model.losses``."""
    kernels = [v for v in model.trainable_variables if "kernel" in v.name]
    assert len(kernels) == 2
    with tf.GradientTape(persistent=True) as tape:
        probs = model(features, training=True)
        data_loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, probs))
        penalty = tf.add_n([L2 * tf.reduce_sum(tf.square(k)) for k in kernels])
        total = data_loss + penalty
    # The model's own regularization losses are this same penalty.
    np.testing.assert_allclose(float(tf.add_n(model.losses)), float(penalty), rtol=1e-6)
    variables = model.trainable_variables
    return ([g.numpy() for g in tape.gradient(total, variables)],
            [g.numpy() for g in tape.gradient(data_loss, variables)])


@pytest.mark.parametrize("loss_scale", ["none", "dynamic"])
def test_step_adds_the_regularization_losses_to_the_data_loss(register_model, loss_scale):
    register_model("l2_mlp_test")(l2_mlp)
    lr = 0.5
    trainer = Trainer(small_config(model="l2_mlp_test", policy="float32", optimizer="sgd",
                                   learning_rate=lr, loss_scale=loss_scale))
    assert len(trainer.model.losses) == 2
    reference_model = keras.models.clone_model(trainer.model)
    reference_model.set_weights(trainer.model.get_weights())
    features, labels = next(iter(trainer.datasets.train))  # The batch step 0 trains on.
    expected, data_only = _regularized_reference(reference_model, features, labels)
    got = _step_gradients(trainer, lr)  # w1 = w0 - lr * g: the gradient the step applied.
    assert int(trainer.skipped_steps.numpy()) == 0
    for var, ref, data, applied in zip(trainer.model.trainable_variables, expected, data_only,
                                       got):
        norm = np.linalg.norm(ref)
        assert np.linalg.norm(applied - ref) / norm < 1e-5, var.name  # Measured: 3e-7.
        if "kernel" in var.name:
            # The penalty moves each kernel visibly: without it the step would be this far off.
            assert np.linalg.norm(data - ref) / norm > 0.05, var.name
