"""Datasets: Fashion-MNIST, MNIST and a synthetic stand-in, as `tf.data` pipelines.

The image contract: ``uint8`` images are scaled to float32 in [0, 1]; floating-point images
are used as given (only cast to float32), so images a user normalised already are not
divided by 255 again. Any other dtype is refused. Images stay in memory as given; the
pipeline gathers a shuffled batch of indices and converts it to float32 on the host (the
tutorial's advice: preprocess in float32 and let the model's first layer cast to the compute
dtype). Shuffling indices rather than images keeps the shuffle buffer, and so a checkpointed
iterator, small.

Every dataset is checked when it is loaded (labels in ``[0, num_classes)``, as many labels as
images, the same image shape in both splits), so a bad file stops the run before training.

Evaluation batches have static shapes too: ``(features, labels, weights)``, always exactly
``batch_size`` examples. The last partial batch is padded with copies of its last example
that weigh 0 (real examples weigh 1); the Trainer weighs the loss and every metric by them.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zipfile
from typing import Callable, Mapping, Optional, Tuple

import numpy as np

from trainer.compat import keras, tf
from trainer.errors import UserError

# (image shape, classes) of each dataset, known without loading it (the audit needs no data).
DATASET_SHAPES = {
    "fashion_mnist": ((28, 28, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "synthetic": ((28, 28, 1), 10),
}
SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True)
class Arrays:
    """A dataset in memory: images (N, H, W, C) and int labels in ``[0, num_classes)``.

    Images are ``uint8`` (the pipeline scales them to [0, 1]) or floating point (used as
    given, cast to float32). :func:`check_arrays` enforces this and the rest of the contract.

    Attributes:
      files: optional; the file each array was read from (keys ``x_train``, ``y_train``,
        ``x_test``, ``y_test``), so that an error names the file to fix.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


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


# ---------------------------------------------------------------------------- loading


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (optionally gzipped) into a uint8 array, checking its size."""
    fix = "re-download it, or reinstall Debian's dataset-fashion-mnist for Fashion-MNIST"
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise UserError(f"cannot read {path}: {error}; {fix}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an IDX uint8 file (bad header); {fix}")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise UserError(
            f"{path} is truncated or corrupt: expected {expected} bytes for shape {tuple(dims)}, "
            f"found {len(data)}; {fix}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find_idx(folder: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _load_idx_folder(folder: str, num_classes: int = 10) -> Arrays:
    paths = {}
    for key, stem in IDX_FILES.items():
        path = _find_idx(folder, stem)
        if path is None:
            raise UserError(
                f"{os.path.join(folder, stem)}.gz is missing; put the four IDX files "
                f"({', '.join(s + '.gz' for s in IDX_FILES.values())}) in {folder} or drop "
                "--data_dir")
        paths[key] = path
    arrays = {key: read_idx(path) for key, path in paths.items()}
    return Arrays(arrays["x_train"][..., None], arrays["y_train"].astype(np.int32),
                  arrays["x_test"][..., None], arrays["y_test"].astype(np.int32),
                  num_classes, folder, files=paths)


def _load_npz(path: str) -> Arrays:
    try:
        with np.load(path) as f:
            x_train, y_train, x_test, y_test = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(
            f"cannot read {path} ({error}); delete it so that Keras downloads it again, or pass "
            "--data_dir with the IDX files") from None
    return Arrays(x_train[..., None], y_train.astype(np.int32), x_test[..., None],
                  y_test.astype(np.int32), 10, path,
                  files={key: f"{path}[{key}]" for key in IDX_FILES})


def _keras_cache(*parts: str) -> str:
    return os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "datasets", *parts)


def _download(name: str, loader) -> Arrays:
    try:
        (x_train, y_train), (x_test, y_test) = loader()
    except Exception as error:  # Keras raises plain Exception subclasses for network errors.
        raise UserError(
            f"{name} is not on this machine and the Keras download failed ({type(error).__name__}); "
            "pass --data_dir with the IDX files, or use --dataset=fashion_mnist (installed by "
            "`make setup`)") from None
    return Arrays(x_train[..., None], y_train.astype(np.int32), x_test[..., None],
                  y_test.astype(np.int32), 10, f"keras download ({name})")


def _synthetic(examples: int, seed: int) -> Arrays:
    # Each class has a fixed random prototype image (7x7 blocks of 4x4 pixels, so convolutions
    # see shapes too); an example is its class's prototype mixed with uniform noise. Classes
    # are balanced and learnable within a few dozen steps, so the loss really goes down in
    # short end-to-end tests, yet no single pixel gives the label away.
    rng = np.random.default_rng(seed)
    n_test = max(examples // 4, 1)
    coarse = rng.integers(0, 256, size=(10, 7, 7, 1)).astype(np.float32)
    prototypes = coarse.repeat(4, axis=1).repeat(4, axis=2)
    y = rng.integers(0, 10, size=examples + n_test).astype(np.int32)
    noise = rng.integers(0, 256, size=(examples + n_test, 28, 28, 1)).astype(np.float32)
    x = (0.35 * prototypes[y] + 0.65 * noise).round().astype(np.uint8)
    return Arrays(x[:examples], y[:examples], x[examples:], y[examples:], 10, "synthetic")


def _describe(shape: Tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def check_arrays(arrays: Arrays) -> Arrays:
    """Checks the contract of :class:`Arrays`; returns ``arrays`` unchanged.

    Each split has as many labels as images and at least one example, images are uint8 or
    floating point with the same shape in both splits, and every label is in
    ``[0, num_classes)``. A bad test label would otherwise surface only after the whole
    training run, as a traceback from the loss (or a NaN loss on a GPU).

    Raises:
      UserError: one line naming the file (or array) and the first bad index.
    """
    files = arrays.files

    def name(key: str) -> str:
        return files.get(key) or f"{key} of {arrays.source}"

    fix = ("the file is corrupt or from another dataset; re-download it" if files else
           "fix the arrays or num_classes")
    for split in ("train", "test"):
        x, y = getattr(arrays, f"x_{split}"), getattr(arrays, f"y_{split}")
        x_name, y_name = name(f"x_{split}"), name(f"y_{split}")
        if len(x) != len(y):
            raise UserError(
                f"{x_name} holds {len(x)} images but {y_name} holds {len(y)} labels; " +
                ("the files are from different datasets or corrupt" if files else
                 "give one label per image"))
        if not len(x):
            raise UserError(f"{x_name} holds no examples; {fix}")
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise UserError(
                f"{x_name} holds {x.dtype} images; images must be uint8 (scaled to [0, 1]) or "
                "floating point (used as given)")
        outside = (y < 0) | (y >= arrays.num_classes)
        if outside.any():
            index = int(np.argmax(outside.reshape(len(y), -1).any(axis=1)))
            raise UserError(
                f"{y_name}: label {y[index]} at index {index} is outside "
                f"[0, {arrays.num_classes}); {fix}")
    train_shape, test_shape = arrays.x_train.shape[1:], arrays.x_test.shape[1:]
    if train_shape != test_shape:
        raise UserError(
            f"{name('x_test')} holds {_describe(test_shape)} images but {name('x_train')} holds "
            f"{_describe(train_shape)} images; both splits must come from one dataset")
    return arrays


def load_arrays(name: str, *, data_dir: Optional[str] = None, seed: int = 0,
                synthetic_examples: int = 4096) -> Arrays:
    """Loads ``name`` ('fashion_mnist', 'mnist', 'synthetic') into memory and checks it.

    Fashion-MNIST: ``data_dir``, else Debian's copy, else the Keras cache, else a download.
    MNIST: ``data_dir`` (IDX files or mnist.npz), else the Keras cache, else a download.

    Raises:
      UserError: naming the missing or corrupt file (see :func:`check_arrays`) and the fix.
    """
    return check_arrays(_load(name, data_dir=data_dir, seed=seed,
                              synthetic_examples=synthetic_examples))


def _load(name: str, *, data_dir: Optional[str], seed: int, synthetic_examples: int) -> Arrays:
    if name == "synthetic":
        return _synthetic(synthetic_examples, seed)
    if name == "fashion_mnist":
        if data_dir:
            return _load_idx_folder(data_dir)
        for folder in (SYSTEM_FASHION_MNIST, _keras_cache("fashion-mnist")):
            if _find_idx(folder, IDX_FILES["x_train"]):
                return _load_idx_folder(folder)
        return _download("Fashion-MNIST", keras.datasets.fashion_mnist.load_data)
    if name == "mnist":
        if data_dir:
            npz = os.path.join(data_dir, "mnist.npz")
            return _load_npz(npz) if os.path.exists(npz) else _load_idx_folder(data_dir)
        if os.path.exists(_keras_cache("mnist.npz")):
            return _load_npz(_keras_cache("mnist.npz"))
        return _download("MNIST", keras.datasets.mnist.load_data)
    raise UserError(f"unknown dataset {name!r}; choose fashion_mnist, mnist or synthetic (--dataset)")


# ---------------------------------------------------------------------------- pipelines


def to_float(images: tf.Tensor) -> tf.Tensor:
    """The image contract: uint8 becomes float32 in [0, 1]; floating point is only cast."""
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
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

    validation = None
    if n_val:
        validation = _finite(arrays.x_train[n_train:], arrays.y_train[n_train:], batch_size)
    return Datasets(
        train=train_from(0), train_from=train_from, in_memory=in_memory, validation=validation,
        test=_finite(arrays.x_test, arrays.y_test, batch_size),
        steps_per_epoch=n_train // batch_size, input_shape=arrays.input_shape,
        num_classes=arrays.num_classes, num_train=n_train, num_validation=n_val,
        num_test=len(arrays.x_test), source=arrays.source)
