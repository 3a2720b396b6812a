"""Training input gathered inside the compiled step loop, for datasets held in memory."""

from __future__ import annotations

from typing import Optional

from trainer import data
from trainer.compat import tf
from trainer.runtime import devices


class InGraphInput:
    """Training batches gathered inside the compiled step loop from in-memory tensors.

    The tf.data pipeline of an in-memory dataset (``data.make_datasets``) costs an iterator
    call, a host-side gather and a hand-over between threads per step, which is a large share
    of a small model's step. Here the step gathers its own batch: the examples at positions
    ``[global_step * batch, (global_step + 1) * batch)`` of the stream of epoch
    permutations, exactly those ``train_from`` would yield, so results, resume and the data
    order are the same on either path (``tests/test_in_graph.py`` checks it). The two
    permutations a batch can straddle are cached in a variable and redrawn once per epoch.

    Used with one replica, off Gaudi (``maybe``); otherwise the tf.data pipeline is read.
    """

    def __init__(self, source: data.InMemoryTrain, batch_size: int):
        self.source = source
        self.batch_size = batch_size
        size = source.size
        self.orders = tf.Variable(tf.zeros([2 * size], tf.int64), trainable=False,
                                  name="in_graph_orders")
        self.first_epoch = tf.Variable(tf.constant(-1, tf.int64), trainable=False,
                                       name="in_graph_epoch")

    @classmethod
    def maybe(cls, datasets: data.Datasets, strategy,
              batch_size: int) -> Optional["InGraphInput"]:
        """The in-graph input of ``datasets``, or None where the tf.data pipeline is read."""
        source = datasets.in_graph_input
        if (source is None or strategy.num_replicas_in_sync != 1
                or devices.hpu_visible()):
            return None
        with tf.device("/cpu:0"):
            return cls(source, batch_size)

    def batch(self, global_step: tf.Tensor):
        """The ``(features, labels)`` batch of step ``global_step`` (call in the compiled loop)."""
        with tf.device("/cpu:0"):
            size = self.source.size
            start = tf.cast(global_step, tf.int64) * self.batch_size
            epoch = start // size

            def redraw():
                # A batch never spans more than two epochs: batch_size <= the split's size.
                self.orders.assign(tf.concat(
                    [self.source.order(epoch), self.source.order(epoch + 1)], axis=0))
                self.first_epoch.assign(epoch)
                return tf.constant(0)

            with tf.control_dependencies(
                    [tf.cond(tf.equal(self.first_epoch, epoch), lambda: tf.constant(0), redraw)]):
                positions = start - epoch * size + tf.range(self.batch_size, dtype=tf.int64)
                indices = tf.gather(self.orders, positions)
            return self.source.batch(indices)
