"""Datasets: Fashion-MNIST, MNIST, a synthetic stand-in, prepared TensorFlow Datasets
(``tfds:NAME``), image TFRecord shards (``tfrecord:GLOB``, streamed, never held whole) and
your own arrays, record files or pipelines, as `tf.data` pipelines.

The image contract: ``uint8`` images are scaled to float32 in [0, 1]; floating-point images
are used as given (only cast to float32), so images a user normalised already are not
divided by 255 again. Any other dtype is refused. Images stay in memory as given; the
pipeline gathers a shuffled batch of indices and converts it to float32 on the host (the
tutorial's advice: preprocess in float32 and let the model's first layer cast to the compute
dtype). Shuffling indices rather than images keeps the shuffle buffer, and so a checkpointed
iterator, small.

Every dataset is checked when it is loaded (as many targets as images, the same image shape in
both splits; integer targets are class ids in ``[0, num_classes)``, float targets must be
finite), so a bad file or array stops the run before training.

Your own data: :func:`from_arrays` (numpy arrays in memory, any target: class ids, regression
values, images) gives the same pipelines as the built-in datasets, exact resume included;
:func:`from_datasets` takes ready ``tf.data`` pipelines.

Evaluation batches have static shapes too: ``(features, labels, weights)``, always exactly
``batch_size`` examples. The last partial batch is padded with copies of its last example
that weigh 0 (real examples weigh 1); the Trainer weighs the loss and every metric by them.

Where each part lives: this package's ``__init__`` holds the entry points (:func:`load_arrays`
by dataset name, :func:`from_arrays`, :func:`from_datasets`, :func:`dataset_shapes`) and
re-exports the rest; ``arrays`` the in-memory dataset and its checks, ``sources`` the built-in
datasets' files, ``tfds_source`` TensorFlow Datasets, ``pipelines`` the ``tf.data`` pipelines,
``in_graph`` the input gathered inside the compiled step loop; ``records`` the TFRecord
format (index, checks), ``sharded`` the streamed pipelines of record files (:func:`from_files`,
:func:`from_tfrecord`), ``writer`` the shard writer (``python -m trainer.data.write_shards``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Tuple

import numpy as np

from trainer.compat import keras, tf
from trainer.config import DATASET_SHAPES
from trainer.data import records, sharded, sources, tfds_source
from trainer.data.arrays import Arrays, check_arrays, target_kind
from trainer.data.pipelines import Datasets, InMemoryTrain, full_batches, make_datasets, to_float
from trainer.data.sharded import from_files, from_tfrecord, image_parser
from trainer.data.sources import IDX_FILES, read_idx
from trainer.data.writer import write_arrays, write_image_folder
from trainer.errors import UserError

__all__ = [
    "Arrays", "DATASET_SHAPES", "Datasets", "IDX_FILES", "InMemoryTrain", "SYSTEM_FASHION_MNIST",
    "check_arrays", "dataset_shapes", "load", "from_arrays", "from_datasets", "from_files",
    "from_tfrecord", "full_batches", "image_parser", "load_arrays", "make_datasets", "read_idx",
    "records", "to_float", "write_arrays", "write_image_folder",
]

SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def load(config, *, input_context: Optional[tf.distribute.InputContext] = None) -> Datasets:
    """The datasets ``config`` (a TrainConfig) names: streamed record files
    (``tfrecord:GLOB``; a ``tfds:`` set too big for memory), else arrays in memory.

    Args:
      input_context: this worker's place in the job; streamed files are sharded by it.
    """
    name = config.dataset
    if name.startswith("tfrecord:"):
        return from_tfrecord(
            name[len("tfrecord:"):], batch_size=config.batch_size, eval_data=config.eval_data,
            image_size=config.image_size, num_classes=config.num_classes,
            label_offset=config.label_offset, augment=config.augment,
            validation_split=config.validation_split, seed=config.seed,
            input_context=input_context, parallel_calls=config.parallel_calls,
            deterministic=config.deterministic)
    if name.startswith("tfds:") and tfds_source.streams(name, config.data_dir):
        return tfds_source.stream_tfds(name, config.data_dir, batch_size=config.batch_size,
                                       seed=config.seed, input_context=input_context,
                                       deterministic=config.deterministic)
    arrays = load_arrays(name, data_dir=config.data_dir, seed=config.seed,
                         synthetic_examples=config.synthetic_examples)
    return make_datasets(arrays, batch_size=config.batch_size,
                         validation_split=config.validation_split, seed=config.seed)


def load_arrays(name: str, *, data_dir: Optional[str] = None, seed: int = 0,
                synthetic_examples: int = 4096) -> Arrays:
    """Loads ``name`` ('fashion_mnist', 'mnist', 'synthetic', 'tfds:NAME[/CONFIG]') and checks it.

    Fashion-MNIST: ``data_dir``, else Debian's copy, else the Keras cache, else a download.
    MNIST: ``data_dir`` (IDX files or mnist.npz), else the Keras cache, else a download.
    tfds:NAME: its 'train' and 'test' splits, already prepared in ``data_dir`` (else tfds's
    default folder); never downloads.

    Raises:
      UserError: naming the missing or corrupt file (see :func:`check_arrays`) and the fix.
    """
    return check_arrays(_load(name, data_dir=data_dir, seed=seed,
                              synthetic_examples=synthetic_examples))


def _load(name: str, *, data_dir: Optional[str], seed: int, synthetic_examples: int) -> Arrays:
    if name == "synthetic":
        return sources.synthetic(synthetic_examples, seed)
    if name.startswith("tfds:"):
        return tfds_source.load_tfds(name, data_dir)
    if name == "fashion_mnist":
        if data_dir:
            return sources.load_idx_folder(data_dir)
        for folder in (SYSTEM_FASHION_MNIST, sources.keras_cache("fashion-mnist")):
            if sources.find_idx(folder, IDX_FILES["x_train"]):
                return sources.load_idx_folder(folder)
        return sources.download("Fashion-MNIST", keras.datasets.fashion_mnist.load_data)
    if name == "mnist":
        if data_dir:
            npz = os.path.join(data_dir, "mnist.npz")
            if os.path.exists(npz):
                return sources.load_npz(npz)
            return sources.load_idx_folder(data_dir)
        if os.path.exists(sources.keras_cache("mnist.npz")):
            return sources.load_npz(sources.keras_cache("mnist.npz"))
        return sources.download("MNIST", keras.datasets.mnist.load_data)
    raise UserError(f"unknown dataset {name!r}; choose fashion_mnist, mnist, synthetic, "
                    "tfds:NAME or tfrecord:GLOB (--dataset)")


# ---------------------------------------------------------------------------- your own data


def from_arrays(x_train, y_train, x_test, y_test, *, batch_size: int,
                validation_split: float = 0.0, seed: int = 0, num_classes: Optional[int] = None,
                source: str = "arrays") -> Datasets:
    """The pipelines of :func:`make_datasets` for numpy arrays you hold in memory.

    Images (``x_*``, shape ``(N, ...)``) follow the image contract: uint8 is scaled to
    [0, 1], floating point is used as given. Targets (``y_*``) may be:

    - integer class ids (sparse labels): ``num_classes`` is then required and every id must
      be in ``[0, num_classes)``; they become int32;
    - floating-point values of any shape (regression values, images for an autoencoder):
      they only need one per image and finite values; they become float32 (a float64 value
      beyond float32's range is refused as not finite).

    The result is what the built-in datasets give: full, shuffled training batches in an
    order that is a pure function of (``seed``, epoch), so ``train_from`` resumes exactly; the
    training split in memory (``in_memory``); padded evaluation batches. Under a
    distribution strategy the pipelines are sharded like the built-in ones.

    Args:
      x_train, y_train, x_test, y_test: the splits, as numpy arrays (or array-likes).
      batch_size: the global batch size (``config.batch_size`` in a ``build_datasets``).
      validation_split: the last fraction of the training arrays held out for validation.
      seed: the data-order seed (``config.seed``).
      num_classes: the class count for integer targets; for float targets it is only
        passed on to ``build_model`` (default 0).
      source: what the banner and metrics file call the data.

    Raises:
      UserError: one line naming the array and the first bad index (see
        :func:`check_arrays`), or a bad ``batch_size``/``validation_split``/``num_classes``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"from_arrays: batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(validation_split, (int, float)) or not 0 <= validation_split < 1:
        raise UserError(
            f"from_arrays: validation_split must be in [0, 1), got {validation_split!r}")
    x_train, x_test = np.asarray(x_train), np.asarray(x_test)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    for key, x in (("x_train", x_train), ("x_test", x_test)):
        if x.ndim < 2:
            raise UserError(f"{key} of {source} has shape {x.shape}; give the examples along the "
                            "first axis and at least one feature axis, e.g. (N, 28, 28, 1)")
    if target_kind(y_train) == "class":
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(
                f"y_train of {source} holds integer class ids, so from_arrays needs num_classes "
                f"(a positive integer), got {num_classes!r}; pass num_classes=..., or float "
                "targets (e.g. images / 255.0) for regression")
    else:
        # float32 is what the loss compares with the float32 outputs; overflow shows as inf.
        with np.errstate(over="ignore"):
            y_train, y_test = (y.astype(np.float32) if target_kind(y) == "float" else y
                               for y in (y_train, y_test))
        num_classes = num_classes or 0
    arrays = check_arrays(Arrays(x_train, y_train, x_test, y_test, num_classes, source))
    if target_kind(y_train) == "class":  # Checked in range first: a cast cannot wrap now.
        arrays = dataclasses.replace(arrays, y_train=y_train.astype(np.int32),
                                     y_test=y_test.astype(np.int32))
    return make_datasets(arrays, batch_size=batch_size, validation_split=validation_split,
                         seed=seed)


def from_datasets(*, train, test: tf.data.Dataset, steps_per_epoch: int,
                  validation: Optional[tf.data.Dataset] = None, num_classes: int = 0,
                  source: str = "tf.data pipelines") -> Datasets:
    """Datasets from ready ``tf.data`` pipelines (files, generators, your own preprocessing).

    The training pipeline yields ``(features, targets)`` batches of the global batch size with
    a static batch dimension (``batch(B, drop_remainder=True)``) and repeats forever; the batch
    size is read from it. ``validation`` and ``test`` are finite, batched any way; they are
    re-batched to full, padded batches (:func:`full_batches`) and read once here to count
    their examples.

    Exact resume: where the Trainer's iterator over ``train`` is a plain ``tf.data`` one (one
    worker, one replica) and its state can be saved (no ``py_function`` or generator inside),
    each checkpoint saves it and a resumed run continues from it, reading nothing twice.
    Elsewhere (a ``tf.distribute`` iterator, which is not trackable; a state that cannot be
    saved, which is said once) it depends on what ``train`` is:

    - a function that builds the pipeline (``train=lambda: make_train(seed)``): a resumed run
      builds it afresh and skips the batches already trained on, reading and discarding them
      (a long run resumes slowly; a ``note:`` line says so). That is exact only when every
      build yields the same stream, which is checked here: two builds must start with the
      same batch (an unseeded ``shuffle`` fails this; give it ``seed=``).
    - a ``tf.data.Dataset``: it cannot be rebuilt, so a resume (a ``--model_dir`` holding a
      checkpoint past step 0) is refused with one line instead of silently restarting or
      reordering the stream.

    Raises:
      UserError: one line for a pipeline that breaks these rules.
    """
    build = train if callable(train) else None
    train = build() if build else train
    spec = train.element_spec
    if not isinstance(spec, tuple) or len(spec) != 2:
        raise UserError(f"from_datasets: train must yield (features, targets) batches; it yields "
                        f"{spec}")
    batch_dims = {s.shape[0] if s.shape.rank else None for s in tf.nest.flatten(spec)}
    batch = batch_dims.pop() if len(batch_dims) == 1 else None
    if batch is None:
        raise UserError("from_datasets: train's batches need a static batch dimension; batch it "
                        "with .batch(batch_size, drop_remainder=True)")
    if train.cardinality() >= 0:
        raise UserError(f"from_datasets: train holds {int(train.cardinality())} batches; it must "
                        "repeat forever (add .repeat()): the loop runs epochs x steps_per_epoch "
                        "steps")
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or \
            steps_per_epoch < 1:
        raise UserError(f"from_datasets: steps_per_epoch must be a positive integer, got "
                        f"{steps_per_epoch!r}")
    features = tf.nest.flatten(spec[0])[0]
    if not features.shape[1:].is_fully_defined():
        raise UserError(f"from_datasets: train's features have shape {features.shape}; every "
                        "dimension but the batch must be known")

    def finite(name, dataset):
        try:
            full = full_batches(dataset, batch)
        except ValueError as error:
            raise UserError(f"from_datasets: {name}: {error}") from None
        count = int(full.reduce(tf.constant(0.0), lambda n, b: n + tf.reduce_sum(b[2])))
        return full, count

    test, num_test = finite("test", test)
    validation, num_validation = finite("validation", validation) if validation is not None \
        else (None, 0)
    if build:
        _check_repeatable(build)
    return Datasets(
        train=train, validation=validation, test=test, steps_per_epoch=steps_per_epoch,
        input_shape=tuple(features.shape[1:].as_list()), num_classes=num_classes,
        num_train=steps_per_epoch * batch, num_validation=num_validation, num_test=num_test,
        source=source, train_from=_pipeline_from(train, build, batch), checkpoint_iterator=True)


def _check_repeatable(build: Callable[[], tf.data.Dataset]) -> None:
    first, second = (next(iter(build())) for _ in range(2))
    same = all(bool(tf.reduce_all(a == b)) for a, b in
               zip(tf.nest.flatten(first), tf.nest.flatten(second)))
    if not same:
        raise UserError(
            "from_datasets: two builds of train start with different batches (an unseeded "
            "shuffle?), so skipping batches would not resume it exactly; give its shuffle a seed "
            "(shuffle(n, seed=S))")


def _pipeline_from(train: tf.data.Dataset, build, batch: int):
    """``train_from`` of :func:`from_datasets`: rebuild and skip, or refuse a resume."""
    def train_from(seen: int) -> tf.data.Dataset:
        if not seen:
            return train
        if build is None:
            raise UserError(
                f"cannot resume at example {seen}: from_datasets got a tf.data.Dataset, which "
                "cannot be rebuilt to continue exactly; pass train as a function that builds the "
                "pipeline (train=lambda: ...), or start afresh in a new --model_dir")
        if seen % batch:
            raise UserError(f"cannot resume a from_datasets pipeline at example {seen}: not a "
                            f"multiple of its batch of {batch}")
        print(f"note: resuming the training pipeline by reading and skipping {seen // batch} "
              "batches", flush=True)
        return build().skip(seen // batch)
    return train_from


def dataset_shapes(name: str, data_dir: Optional[str] = None, *, image_size: int = 0,
                   num_classes: int = 0, label_offset: int = 0) -> Tuple[Tuple[int, ...], int]:
    """(input shape, classes) of a dataset without loading its data (for the audit).

    Raises:
      UserError: for a tfds dataset that cannot be found (see
        :func:`trainer.data.tfds_source.tfds_builder`).
    """
    if name in DATASET_SHAPES:
        return DATASET_SHAPES[name]
    if name.startswith("tfrecord:"):
        return sharded.image_shape(name[len("tfrecord:"):], image_size, num_classes, label_offset)
    if not name.startswith("tfds:"):
        raise UserError(f"unknown dataset {name!r}; choose fashion_mnist, mnist, synthetic, "
                        "tfds:NAME or tfrecord:GLOB (--dataset)")
    return tfds_source.tfds_shapes(name, data_dir)
