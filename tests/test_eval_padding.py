"""Evaluation with static shapes: padded last batches, masked out of the loss and every metric.

100 test examples with batch 32 make three full batches and one of 4 real examples padded
with 28 weight-0 copies. Masked results are compared with a plain computation over the 100
real examples: accuracy and top-2 accuracy are counts, so they match exactly; the loss is a
float32 sum in another order (and per-example values from a batch of 32 instead of 100), so
it matches to float32 rounding (relative 1e-6).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, small_config

from trainer import data
from trainer.compat import keras, tf
from trainer.core.steps import Trainer

LOSS_RTOL = 1e-6  # float32 round-off of a 100-term mean (values ~2.3): ~1e-7 seen.


class Top2Trainer(Trainer):
    """Like examples/custom_trainer.py: a top-2 metric, updated by a hook that knows no masks."""

    def build_metrics(self):
        metrics = super().build_metrics()
        metrics["top2_accuracy"] = keras.metrics.SparseTopKCategoricalAccuracy(
            k=2, name="top2_accuracy")
        return metrics

    def update_metrics(self, metrics, labels, outputs):
        super().update_metrics(metrics, labels, outputs)
        metrics["top2_accuracy"].update_state(labels, outputs)


def _config(**overrides):
    # 400 synthetic examples: 300 train, 100 validation (the last quarter), 100 test.
    settings = dict(synthetic_examples=400, validation_split=0.25, policy="float32", seed=11)
    settings.update(overrides)
    return small_config(**settings)


@pytest.fixture(scope="module")
def trained():
    trainer = Top2Trainer(_config())
    trainer.train_steps(6)  # Away from the initial weights, so the numbers are not trivial.
    return trainer


def _reference(trainer, x, y, weights=None):
    """Loss, accuracy, top-2 over the real examples with numpy (float64 sums)."""
    probs = trainer.model(data.to_float(tf.constant(x)), training=False).numpy().astype(np.float64)
    weights = np.ones(len(y)) if weights is None else weights
    loss = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0))
    top2 = np.argsort(-probs, axis=1)[:, :2]
    correct = (probs.argmax(axis=1) == y)
    in_top2 = (top2 == y[:, None]).any(axis=1)
    mean = lambda v: np.sum(v * weights) / np.sum(weights)  # noqa: E731
    return {"loss": mean(loss), "accuracy": mean(correct), "top2_accuracy": mean(in_top2)}


def _count_ratio(reference_value, count):
    # Keras divides two float32 sums of 0/1 values: the float32 quotient, exactly.
    return float(np.float32(round(reference_value * count)) / np.float32(count))


def test_eval_batches_are_full_and_static(trained):
    for split, count in ((trained.datasets.validation, 100), (trained.datasets.test, 100)):
        shapes = [s.shape.as_list() for s in split.element_spec]
        assert shapes == [[32, 28, 28, 1], [32], [32]]
        weights = [w.numpy() for _, _, w in split]
        assert len(weights) == 4 and float(np.sum(weights)) == count
        assert weights[-1].tolist() == [1.0] * 4 + [0.0] * 28


def test_masked_results_equal_the_real_examples(trained):
    arrays = data.load_arrays("synthetic", seed=11, synthetic_examples=400)
    assert len(arrays.y_test) == 100 and 100 % 32 == 4
    reference = _reference(trained, arrays.x_test, arrays.y_test)
    results = trained.evaluate(trained.datasets.test)
    assert set(results) == {"loss", "accuracy", "top2_accuracy"}
    assert results["loss"] == pytest.approx(reference["loss"], rel=LOSS_RTOL)
    assert results["accuracy"] == _count_ratio(reference["accuracy"], 100)
    assert results["top2_accuracy"] == _count_ratio(reference["top2_accuracy"], 100)
    assert results["accuracy"] < results["top2_accuracy"] < 1.0  # Not a degenerate model.
    # The same through Keras metrics over the unpadded batches (32, 32, 32, 4).
    loss, accuracy = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()
    top2 = keras.metrics.SparseTopKCategoricalAccuracy(k=2)
    for start in range(0, 100, 32):
        x = data.to_float(tf.constant(arrays.x_test[start:start + 32]))
        y = arrays.y_test[start:start + 32]
        probs = trained.model(x, training=False)
        loss.update_state(trained.compute_loss(y, probs))
        accuracy.update_state(y, probs)
        top2.update_state(y, probs)
    assert results["loss"] == pytest.approx(float(loss.result()), rel=LOSS_RTOL)
    assert results["accuracy"] == float(accuracy.result())
    assert results["top2_accuracy"] == float(top2.result())
    # Validation: the last 100 training examples, padded the same way.
    validation = trained.evaluate(trained.datasets.validation)
    reference = _reference(trained, arrays.x_train[300:], arrays.y_train[300:])
    assert validation["loss"] == pytest.approx(reference["loss"], rel=LOSS_RTOL)
    assert validation["accuracy"] == _count_ratio(reference["accuracy"], 100)


def test_user_datasets_any_batching_and_keras_weights(trained):
    arrays = data.load_arrays("synthetic", seed=11, synthetic_examples=400)
    # The test pipeline's own floats (data.to_float multiplies by 1/255): `/ 255.0` differs
    # from that in the last bit for half the pixel values, and whether such inputs still give
    # the same float32 loss depends on the CPU's kernels. With the very same inputs, batches
    # and compiled loop, the results must be equal exactly: padding on the fly is what differs.
    x, y = data.to_float(tf.constant(arrays.x_test)).numpy(), arrays.y_test
    # (features, labels) in uneven batches of 7: padded to full batches of 32 on the fly,
    # and compiled once (the loop sees the same static shapes as for the test pipeline).
    traces = trained._eval_loop.experimental_get_tracing_count()
    uneven = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    assert trained.evaluate(uneven) == trained.evaluate(trained.datasets.test)
    assert trained._eval_loop.experimental_get_tracing_count() == max(traces, 1)
    # (features, labels, weights): Keras's weighted mean, padding still at weight 0.
    weights = np.where(y % 3 == 0, 2.5, 1.0).astype(np.float32)
    weighted = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(10)
    results = trained.evaluate(weighted)
    reference = _reference(trained, arrays.x_test, y, weights)
    for name in ("loss", "accuracy", "top2_accuracy"):
        assert results[name] == pytest.approx(reference[name], rel=LOSS_RTOL), name


class OwnWeightsTrainer(Top2Trainer):
    """Passes its own sample_weight (positionally, like Keras allows): multiplied by the mask."""

    def update_metrics(self, metrics, labels, outputs):
        metrics["accuracy"].update_state(labels, outputs)
        metrics["top2_accuracy"].update_state(
            labels, outputs, tf.cast(labels % 2, tf.float32) + 1.0)


def test_own_sample_weight_is_combined_with_the_mask(trained):
    trainer = OwnWeightsTrainer(_config())
    trainer.model.set_weights(trained.model.get_weights())
    arrays = data.load_arrays("synthetic", seed=11, synthetic_examples=400)
    results = trainer.evaluate(trainer.datasets.test)
    reference = _reference(trainer, arrays.x_test, arrays.y_test,
                           (arrays.y_test % 2 + 1).astype(np.float64))
    assert results["top2_accuracy"] == pytest.approx(reference["top2_accuracy"], rel=LOSS_RTOL)
    assert results["accuracy"] == trained.evaluate(trained.datasets.test)["accuracy"]


class CountingMetric(keras.metrics.Metric):
    """A custom metric whose update_state cannot weigh examples."""

    def __init__(self):
        super().__init__(name="count")
        self.total = self.add_weight(name="total", initializer="zeros")

    def update_state(self, y_true, y_pred):
        self.total.assign_add(tf.cast(tf.shape(y_true)[0], tf.float32))

    def result(self):
        return self.total


class UnweightableTrainer(Trainer):
    def build_metrics(self):
        return {**super().build_metrics(), "count": CountingMetric()}

    def update_metrics(self, metrics, labels, outputs):
        super().update_metrics(metrics, labels, outputs)
        metrics["count"].update_state(labels, outputs)


def test_metric_without_sample_weight_is_refused():
    trainer = UnweightableTrainer(_config(validation_split=0.0))
    with pytest.raises(TypeError, match="metric 'count': update_state takes no sample_weight"):
        trainer.evaluate(trainer.datasets.test)


class WeightCountingMetric(CountingMetric):
    """Takes sample_weight through **kwargs only: it sums the weights it is given."""

    def update_state(self, y_true, y_pred, **kwargs):
        self.total.assign_add(tf.reduce_sum(kwargs["sample_weight"]))


class KwargsMetricTrainer(UnweightableTrainer):
    def build_metrics(self):
        return {**super().build_metrics(), "count": WeightCountingMetric()}


def test_metric_taking_kwargs_counts_only_real_examples():
    trainer = KwargsMetricTrainer(_config(validation_split=0.0))
    assert trainer.evaluate(trainer.datasets.test)["count"] == 100.0  # Not 4 x 32 = 128.


TWO_REPLICAS = r"""
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
from trainer.compat import tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from test_eval_padding import Top2Trainer, _config
single = Top2Trainer(_config())
single.train_steps(6)
mirrored = Top2Trainer(_config(), strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
mirrored.model.set_weights(single.model.get_weights())
*_, last = mirrored._distribute(mirrored.datasets.test)  # What each replica gets, last step.
print(json.dumps({{
    "replicas": mirrored.strategy.num_replicas_in_sync,
    "last_batch": [[x.shape.as_list(), float(tf.reduce_sum(w))] for x, w in zip(*(
        mirrored.strategy.experimental_local_results(t) for t in last[::2]))],
    "single": single.evaluate(single.datasets.test),
    "mirrored": mirrored.evaluate(mirrored.datasets.test)}}))
"""


def test_two_replicas_equal_one():
    # Two logical CPUs need a fresh process (they must be set before TensorFlow starts). The
    # last global batch gives replica 0 its 4 real examples and 12 padding, replica 1 only
    # padding: both still run a full, static batch of 16.
    script = TWO_REPLICAS.format(root=str(ROOT), tests=str(ROOT / "tests"))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["last_batch"] == [[[16, 28, 28, 1], 4.0], [[16, 28, 28, 1], 0.0]]
    single, mirrored = out["single"], out["mirrored"]
    assert mirrored["accuracy"] == single["accuracy"]
    assert mirrored["top2_accuracy"] == single["top2_accuracy"]
    # Two per-replica float32 sums added: another summation order, float32 round-off only.
    assert mirrored["loss"] == pytest.approx(single["loss"], rel=LOSS_RTOL)
