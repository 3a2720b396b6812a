"""The ``tf.data`` pipelines a Trainer consumes (:class:`Datasets`), built from in-memory arrays.

The image contract: ``uint8`` images are scaled to float32 in [0, 1]; floating-point images
are used as given (only cast to float32), so images a user normalised already are not
divided by 255 again. Images stay in memory as given; the pipeline gathers a shuffled batch
of indices and converts it to float32 on the host (the tutorial's advice: preprocess in
float32 and let the model's first layer cast to the compute dtype). Shuffling indices rather
than images keeps the shuffle buffer, and so a checkpointed iterator, small.

Evaluation batches have static shapes too: ``(features, labels, weights)``, always exactly
``batch_size`` examples. The last partial batch is padded with copies of its last example
that weigh 0 (real examples weigh 1); the Trainer weighs the loss and every metric by them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import numpy as np

from trainer.compat import tf
from trainer.data.arrays import Arrays, check_arrays
from trainer.errors import UserError


@dataclasses.dataclass(frozen=True)
class InMemoryTrain:
    """The training split held as tensors, for input gathered inside the compiled step loop.

    ``order(epoch)`` is the permutation of ``range(len(images))`` that epoch ``epoch`` reads:
    the very order ``Datasets.train_from`` yields, so both input paths train on the same
    batches (see ``Trainer``: in-graph input).

    Attributes:
      images: ``(N, ...)`` uint8 or float tensor, converted with :func:`to_float` per batch.
      labels: ``(N, ...)`` tensor.
      seed: the data-order seed.
    """

    images: tf.Tensor
    labels: tf.Tensor
    seed: int
    # (train, train_from) of the Datasets built from these tensors (see trainer/data/in_graph.py).
    made_for: Optional[tuple] = None

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    def order(self, epoch: tf.Tensor) -> tf.Tensor:
        return tf.random.experimental.stateless_shuffle(
            tf.range(self.size, dtype=tf.int64),
            seed=tf.stack([tf.constant(self.seed, tf.int64), tf.cast(epoch, tf.int64)]))

    def batch(self, indices: tf.Tensor):
        return to_float(tf.gather(self.images, indices)), tf.gather(self.labels, indices)


@dataclasses.dataclass(frozen=True)
class Datasets:
    """The pipelines a Trainer consumes.

    Attributes:
      train: infinite, shuffled ``(features, labels)`` batches with ``drop_remainder``
        (static shapes).
      validation: finite ``(features, labels, weights)`` batches (see :func:`full_batches`),
        or None when ``validation_split`` is 0.
      test: finite ``(features, labels, weights)`` batches.
      steps_per_epoch: full batches in one pass over the training split.
      train_from: optional; ``train_from(n)`` is ``train`` with its first ``n`` examples
        skipped. With it a resumed run rebuilds its input position from the global step,
        under any strategy, and checkpoints hold no iterator state.
      sharded: ``train`` is this worker's share of the stream (its own files, batches of
        its share of the global batch), so the Trainer does not split it across workers.
      checkpoint_iterator: save the training iterator's state with each checkpoint (each
        worker its own) where the iterator is trackable, and resume from it instead of
        ``train_from`` (which then only serves when no state was saved).
      fingerprint: what identifies the data in ``run.json`` (file names, sizes, records);
        None: the files of the ``source`` folder.
      explain: optional; ``explain(error)`` is one line naming the record behind a
        TensorFlow error raised while reading the data, or None when no record is at fault.
    """

    train: tf.data.Dataset
    validation: Optional[tf.data.Dataset]
    test: tf.data.Dataset
    steps_per_epoch: int
    input_shape: Tuple[int, ...]
    num_classes: int
    num_train: int
    num_validation: int
    num_test: int
    source: str
    train_from: Optional[Callable[[int], tf.data.Dataset]] = None
    in_memory: Optional[InMemoryTrain] = None
    sharded: bool = False
    checkpoint_iterator: bool = False
    fingerprint: Optional[dict] = None
    explain: Optional[Callable[[Exception], Optional[str]]] = None

    @property
    def in_graph_input(self) -> Optional[InMemoryTrain]:
        """``in_memory`` while ``train`` and ``train_from`` are still the ones built from it.

        A ``Datasets`` changed by ``dataclasses.replace(train=...)`` keeps ``in_memory``, but
        reading it would bypass the new ``train``: then this is None and the Trainer reads
        the tf.data pipeline.
        """
        made_for = getattr(self.in_memory, "made_for", None)
        if made_for is None or made_for[0] is not self.train or made_for[1] is not self.train_from:
            return None
        return self.in_memory

    def map_train(self, fn: Callable) -> "Datasets":
        """The same datasets with ``fn`` applied to every training batch.

        The one way to change the training stream in a ``build_datasets`` override: it maps
        ``train`` and ``train_from`` alike, so an exact resume replays the mapped stream
        (replacing ``train`` alone would leave ``train_from`` on the old data).
        """
        train_from = None if self.train_from is None else (
            lambda skip: self.train_from(skip).map(fn))
        return dataclasses.replace(self, train=self.train.map(fn), train_from=train_from,
                                   in_memory=None)


def to_float(images: tf.Tensor) -> tf.Tensor:
    """The image contract: uint8 becomes float32 in [0, 1]; floating point is only cast."""
    if images.dtype == tf.uint8:
        # A multiply, not `/ 255`: graph optimisation turns that division into this multiply
        # in a compiled step but not in a tf.data map, and the in-graph input
        # (trainer/data/in_graph.py) must give the very same floats as the pipeline.
        return tf.cast(images, tf.float32) * (1.0 / 255.0)
    return tf.cast(images, tf.float32)


def _pad_to(batch_size: int):
    """Pads one batch of ``(features, labels[, weights])`` to ``batch_size`` examples.

    Padding repeats the batch's last example (so a loss or metric never sees an input it
    could turn into NaN, and 0 x NaN never poisons a sum) with weight 0. The result has a
    static batch dimension: ``gather`` with ``batch_size`` indices.
    """
    def pad(features, labels, weights=None):
        count = tf.shape(tf.nest.flatten(labels)[0])[0]
        positions = tf.range(batch_size)
        index = tf.minimum(positions, count - 1)
        real = tf.cast(positions < count, tf.float32)
        if weights is None:
            weights = real
        else:
            weights = tf.cast(tf.gather(weights, index), tf.float32)
            weights *= tf.reshape(real, [batch_size] + [1] * (weights.shape.rank - 1))
        take = lambda t: tf.gather(t, index)  # noqa: E731
        return tf.nest.map_structure(take, features), tf.nest.map_structure(take, labels), weights
    return pad


def full_batches(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Returns a finite ``dataset`` as full batches of ``batch_size`` with example weights.

    ``dataset`` yields batches of any size of ``(features, labels)`` (each example weighs 1)
    or ``(features, labels, weights)``, Keras's convention. The result yields
    ``(features, labels, weights)`` with a static batch dimension of ``batch_size``; the last
    batch is padded with weight-0 copies of its last example. A dataset that already is in
    this form (the validation and test pipelines of :func:`make_datasets`) is returned as is.

    Full batches matter under a distribution strategy: each global batch splits into equal,
    non-empty shares for every replica and worker, every worker runs the same number of
    steps, and a compiled step (XLA, Gaudi) never sees a new shape.

    Raises:
      ValueError: when the elements are not 2- or 3-tuples of batched tensors.
    """
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise ValueError(
            "an evaluation dataset yields (features, labels) or (features, labels, weights) "
            f"batches; this one yields {spec}")
    if len(spec) == 3 and all(s.shape.rank and s.shape[0] == batch_size
                              for s in tf.nest.flatten(spec)):
        return dataset
    return (dataset.unbatch()
            .batch(batch_size)
            .map(_pad_to(batch_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def _finite(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    pad = _pad_to(batch_size)

    def prepare(images, labels):
        images, labels, weights = pad(images, labels)  # Pads the uint8 images: less to copy.
        return to_float(images), labels, weights

    return (tf.data.Dataset.from_tensor_slices((x, y))
            .batch(batch_size)
            .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def make_datasets(arrays: Arrays, *, batch_size: int, validation_split: float, seed: int) -> Datasets:
    """Builds the train/validation/test pipelines from in-memory arrays.

    The validation split is the *last* ``validation_split`` of the training data, as in
    ``Model.fit(validation_split=...)``. Training batches are full (``drop_remainder``) so
    every step has the same static shape (Gaudi recompiles on a new shape).

    Validation and test batches are full-size too, padded with weight-0 examples (see
    :func:`full_batches`).

    Raises:
      UserError: when the batch is larger than the training split, or ``arrays`` break the
        contract (see :func:`check_arrays`; arrays a user built were never checked).
    """
    check_arrays(arrays)
    n_val = int(len(arrays.x_train) * validation_split)
    n_train = len(arrays.x_train) - n_val
    if n_train < batch_size:
        raise UserError(
            f"batch_size {batch_size} is larger than the {n_train} training examples of "
            f"{arrays.source} left after --validation_split={validation_split} holds out "
            f"{n_val}; lower --batch_size or --validation_split")
    in_memory = InMemoryTrain(images=tf.constant(arrays.x_train[:n_train]),
                              labels=tf.constant(arrays.y_train[:n_train]), seed=seed)

    def epoch_order(epoch):
        # A fresh permutation per epoch from (seed, epoch): the order is a pure function of
        # the position, so a resumed run can rebuild it without saving iterator state.
        return tf.data.Dataset.from_tensor_slices(in_memory.order(epoch))

    def train_from(examples_seen: int) -> tf.data.Dataset:
        first_epoch, offset = divmod(int(examples_seen), n_train)
        return (tf.data.Dataset.range(first_epoch, 2 ** 62)
                .flat_map(epoch_order)
                .skip(offset)
                .batch(batch_size, drop_remainder=True)
                .map(in_memory.batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .prefetch(tf.data.AUTOTUNE))

    train = train_from(0)
    validation = None
    if n_val:
        validation = _finite(arrays.x_train[n_train:], arrays.y_train[n_train:], batch_size)
    return Datasets(
        train=train, train_from=train_from, validation=validation,
        in_memory=dataclasses.replace(in_memory, made_for=(train, train_from)),
        test=_finite(arrays.x_test, arrays.y_test, batch_size),
        steps_per_epoch=n_train // batch_size, input_shape=arrays.input_shape,
        num_classes=arrays.num_classes, num_train=n_train, num_validation=n_val,
        num_test=len(arrays.x_test), source=arrays.source)
