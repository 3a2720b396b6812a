"""In-graph input (trainer/data/in_graph.py): the same batches, weights and resume as tf.data."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, small_config

from trainer.compat import tf
from trainer.core.steps import Trainer

# 256 examples, batch 48: 5 steps per epoch and every later batch straddles two epochs.
CONFIG = dict(batch_size=48, policy="float32", deterministic=True)


class PipelineTrainer(Trainer):
    """The same Trainer reading its tf.data pipeline: ``train`` replaced by an equal copy."""

    def build_datasets(self):
        datasets = super().build_datasets()
        return dataclasses.replace(datasets, train=datasets.train_from(0))


def _weights(trainer):
    return [w.numpy() for w in trainer.model.weights]


def test_in_graph_batches_are_the_pipeline_batches():
    trainer = Trainer(small_config(**CONFIG))
    assert trainer.in_graph_input is not None  # The in-memory default reads in graph.
    gather = tf.function(trainer.in_graph_input.batch)
    for step in (0, 4, 5, 11, 16):  # Epoch starts and batches across epoch ends.
        features, labels = gather(tf.constant(step, tf.int64))
        expected = next(iter(trainer.datasets.train_from(step * 48)))
        np.testing.assert_array_equal(features.numpy(), expected[0].numpy())
        np.testing.assert_array_equal(labels.numpy(), expected[1].numpy())
        assert features.dtype == tf.float32 and features.shape == (48, 28, 28, 1)


@pytest.mark.parametrize("overrides", [{}, {"grad_accum_steps": 2},
                                       {"policy": "mixed_bfloat16"}])
def test_same_weights_and_metrics_as_the_pipeline(overrides):
    config = small_config(**{**CONFIG, **overrides})
    in_graph, pipeline = Trainer(config), PipelineTrainer(config)
    assert pipeline.in_graph_input is None  # A replaced `train` is read as given.
    for trainer in (in_graph, pipeline):
        trainer.train_steps(3)
        trainer.train_steps(9)  # 12 steps: over two epoch ends, in two compiled calls.
        assert int(trainer.global_step.numpy()) == 12
    for a, b in zip(_weights(in_graph), _weights(pipeline)):
        np.testing.assert_array_equal(a, b)
    assert in_graph.train_results() == pipeline.train_results()


def test_resume_reads_from_the_restored_step(tmp_path):
    config = small_config(**CONFIG)
    straight = Trainer(config)
    straight.train_steps(12)
    first = Trainer(config)
    first.train_steps(7)
    tf.train.Checkpoint(**first.checkpoint_items()).write(str(tmp_path / "ckpt"))
    resumed = Trainer(config)
    tf.train.Checkpoint(**resumed.checkpoint_items()).read(str(tmp_path / "ckpt")).assert_consumed()
    resumed.train_steps(5)
    assert int(resumed.global_step.numpy()) == 12
    for a, b in zip(_weights(straight), _weights(resumed)):
        np.testing.assert_array_equal(a, b)


def test_map_train_goes_through_the_pipeline():
    class Doubled(Trainer):
        def build_datasets(self):
            return super().build_datasets().map_train(lambda x, y: (2.0 * x, y))

    trainer = Doubled(small_config(**CONFIG))
    assert trainer.in_graph_input is None
    trainer.train_steps(2)
    assert int(trainer.global_step.numpy()) == 2


def test_two_replicas_read_the_pipeline():
    # A fresh process: logical devices must be configured before TensorFlow starts.
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        from trainer.compat import tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from conftest import small_config
        from trainer.core.steps import Trainer
        one = Trainer(small_config(batch_size=48, policy="float32"))
        two = Trainer(small_config(batch_size=48, policy="float32"),
                      strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        two.train_steps(2)
        print(one.in_graph_input is not None, two.in_graph_input is None, int(two.global_step.numpy()))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["True", "True", "2"]
