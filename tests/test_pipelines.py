"""The training split's epoch order (``InMemoryTrain.order``) and the stream built on it.

Both input paths (the tf.data pipeline and the in-graph input) read ``order(epoch)``, so a
comparison between them cannot notice an order that ignores the epoch: here each epoch's
order must be a permutation of the training indices, differ from the other epochs', and be
a pure function of (seed, epoch).
"""

from __future__ import annotations

import itertools

import numpy as np

from trainer.compat import tf
from trainer.data.arrays import Arrays
from trainer.data.pipelines import InMemoryTrain, make_datasets

N = 50


def _in_memory(seed: int, n: int = N) -> InMemoryTrain:
    images = tf.constant(np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1))
    return InMemoryTrain(images=images, labels=tf.constant(np.arange(n, dtype=np.int32)),
                         seed=seed)


def _orders(source: InMemoryTrain, epochs=(0, 1, 2)):
    return [source.order(epoch).numpy() for epoch in epochs]


def test_each_epoch_order_is_a_permutation_and_epochs_differ():
    orders = _orders(_in_memory(seed=7))
    for epoch, order in enumerate(orders):
        assert order.dtype == np.int64 and order.shape == (N,), epoch
        np.testing.assert_array_equal(np.sort(order), np.arange(N), err_msg=f"epoch {epoch}")
    for (a, order_a), (b, order_b) in itertools.combinations(enumerate(orders), 2):
        assert not np.array_equal(order_a, order_b), (
            f"epochs {a} and {b} read the training split in the same order: {order_a[:10]}...")
    # Not the identity either: the data is shuffled.
    assert not any(np.array_equal(order, np.arange(N)) for order in orders)


def test_order_is_a_pure_function_of_seed_and_epoch():
    first, second = _in_memory(seed=7), _in_memory(seed=7)
    orders = _orders(first)
    # Deterministic: the same call again, another construction with the same seed, and an
    # epoch given as a tensor (as the compiled step and tf.data give it) all agree.
    for again in (_orders(first), _orders(second),
                  [first.order(tf.constant(e, tf.int64)).numpy() for e in range(3)]):
        for a, b in zip(orders, again):
            np.testing.assert_array_equal(a, b)
    # Asking for epoch 2 first changes nothing (no hidden state advances per call).
    np.testing.assert_array_equal(_in_memory(seed=7).order(2).numpy(), orders[2])
    # Another seed, another order.
    other = _orders(_in_memory(seed=8))
    assert not any(np.array_equal(a, b) for a, b in zip(orders, other))


def test_the_train_stream_reads_a_new_permutation_each_epoch():
    # Labels are the example indices, so the stream tells which example each batch holds.
    n, batch = 40, 8
    x = np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1)
    arrays = Arrays(x_train=x, y_train=np.arange(n, dtype=np.int32), x_test=x[:4],
                    y_test=np.arange(4, dtype=np.int32), num_classes=n, source="indices")
    ds = make_datasets(arrays, batch_size=batch, validation_split=0.0, seed=3)
    assert ds.steps_per_epoch == n // batch
    seen = np.concatenate([y.numpy() for _, y in ds.train.take(3 * ds.steps_per_epoch)])
    epochs = seen.reshape(3, n)
    for epoch, order in enumerate(epochs):
        np.testing.assert_array_equal(np.sort(order), np.arange(n), err_msg=f"epoch {epoch}")
        np.testing.assert_array_equal(order, ds.in_memory.order(epoch).numpy())
    for a, b in itertools.combinations(range(3), 2):
        assert not np.array_equal(epochs[a], epochs[b]), f"epochs {a} and {b} are the same"
    # A resume from the start of epoch 1 reads epoch 1's order, not epoch 0's again.
    resumed = np.concatenate([y.numpy() for _, y in ds.train_from(n).take(ds.steps_per_epoch)])
    np.testing.assert_array_equal(resumed, epochs[1])

