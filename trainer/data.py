"""Datasets: Fashion-MNIST, MNIST, a synthetic stand-in, prepared TensorFlow Datasets
(``tfds:NAME``) and your own arrays or pipelines, as `tf.data` pipelines.

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
    """A dataset in memory: images (N, ...) and targets (N, ...), one per image.

    Images are ``uint8`` (the pipeline scales them to [0, 1]) or floating point (used as
    given, cast to float32). Targets (``y_*``, called labels elsewhere) are integer class ids
    in ``[0, num_classes)`` or floating-point values of any shape (regression values, images),
    which must be finite. :func:`check_arrays` enforces this and the rest of the contract.

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
    # (train, train_from) of the Datasets built from these tensors (see in_graph_input).
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

    Each split has as many targets as images and at least one example, images are uint8 or
    floating point with the same shape in both splits, and targets are of one kind and shape
    in both splits: integer class ids, every one in ``[0, num_classes)``, or floating-point
    values, every one finite. A bad test label would otherwise surface only after the whole
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
        _check_targets(y, y_name, arrays.num_classes, fix)
    train_shape, test_shape = arrays.x_train.shape[1:], arrays.x_test.shape[1:]
    if train_shape != test_shape:
        raise UserError(
            f"{name('x_test')} holds {_describe(test_shape)} images but {name('x_train')} holds "
            f"{_describe(train_shape)} images; both splits must come from one dataset")
    y_train, y_test = arrays.y_train, arrays.y_test
    if _target_kind(y_train) != _target_kind(y_test) or y_train.shape[1:] != y_test.shape[1:]:
        raise UserError(
            f"{name('y_test')} holds {y_test.dtype} targets of shape {_describe(y_test.shape[1:])} "
            f"but {name('y_train')} holds {y_train.dtype} targets of shape "
            f"{_describe(y_train.shape[1:])}; both splits need targets of one kind and shape")
    return arrays


def _target_kind(y: np.ndarray) -> str:
    """'class' for integer class ids, 'float' for values (regression, images); else ''."""
    if np.issubdtype(y.dtype, np.integer):
        return "class"
    return "float" if np.issubdtype(y.dtype, np.floating) else ""


def _check_targets(y: np.ndarray, y_name: str, num_classes: int, fix: str) -> None:
    """Class ids in ``[0, num_classes)``, or finite floats; one line naming the first bad one."""
    kind = _target_kind(y)
    if not kind:
        raise UserError(
            f"{y_name} holds {y.dtype} targets; targets must be integer class ids or floating-"
            "point values (cast booleans to float32)")
    if kind == "float":
        bad = ~np.isfinite(y)
        if bad.any():
            index = int(np.argmax(bad.reshape(len(y), -1).any(axis=1)))
            value = y[index][bad[index]].flat[0] if y.ndim > 1 else y[index]
            fix = fix.replace(" or num_classes", "")  # The class count plays no part here.
            raise UserError(f"{y_name}: target {value} at index {index} is not finite; {fix}")
        return
    outside = (y < 0) | (y >= num_classes)
    if outside.any():
        index = int(np.argmax(outside.reshape(len(y), -1).any(axis=1)))
        raise UserError(
            f"{y_name}: label {y[index]} at index {index} is outside "
            f"[0, {num_classes}); {fix}")


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
        return _synthetic(synthetic_examples, seed)
    if name.startswith("tfds:"):
        return _load_tfds(name, data_dir)
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
    raise UserError(f"unknown dataset {name!r}; choose fashion_mnist, mnist, synthetic or "
                    "tfds:NAME (--dataset)")


# ---------------------------------------------------------------------------- pipelines


def to_float(images: tf.Tensor) -> tf.Tensor:
    """The image contract: uint8 becomes float32 in [0, 1]; floating point is only cast."""
    if images.dtype == tf.uint8:
        # A multiply, not `/ 255`: graph optimisation turns that division into this multiply
        # in a compiled step but not in a tf.data map, and the in-graph input
        # (trainer/in_graph_input.py) must give the very same floats as the pipeline.
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
    if _target_kind(y_train) == "class":
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(
                f"y_train of {source} holds integer class ids, so from_arrays needs num_classes "
                f"(a positive integer), got {num_classes!r}; pass num_classes=..., or float "
                "targets (e.g. images / 255.0) for regression")
    else:
        # float32 is what the loss compares with the float32 outputs; overflow shows as inf.
        with np.errstate(over="ignore"):
            y_train, y_test = (y.astype(np.float32) if _target_kind(y) == "float" else y
                               for y in (y_train, y_test))
        num_classes = num_classes or 0
    arrays = check_arrays(Arrays(x_train, y_train, x_test, y_test, num_classes, source))
    if _target_kind(y_train) == "class":  # Checked in range first: a cast cannot wrap now.
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

    Exact resume depends on what ``train`` is:

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
        source=source, train_from=_pipeline_from(train, build, batch))


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


# ---------------------------------------------------------------------------- TensorFlow Datasets


def _tfds_builder(spec: str, data_dir: Optional[str]):
    """The tfds builder of ``spec`` ('tfds:NAME' or 'tfds:NAME/CONFIG'); nothing downloads."""
    name = spec[len("tfds:"):]
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UserError(
            f"--dataset={spec} reads TensorFlow Datasets, but tensorflow-datasets is not installed "
            "in this Python environment (the TF 2.15 / Gaudi stack has none); install it (pip "
            "install tensorflow-datasets) or use --dataset=fashion_mnist, mnist or synthetic"
        ) from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # noqa: BLE001 - tfds raises several types for a bad name.
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--dataset={spec}: {first} (see https://www.tensorflow.org/datasets/"
                        "catalog for the names)") from None
    return builder


def _not_prepared(spec: str, builder) -> UserError:
    name = spec[len("tfds:"):]
    levels = 3 if builder.builder_config is not None else 2  # NAME[/CONFIG]/VERSION
    root = builder.data_dir
    for _ in range(levels):
        root = os.path.dirname(root)
    return UserError(
        f"--dataset={spec} is not prepared in {root} ({builder.data_dir} is missing) and runs "
        f"never download; prepare it once where there is network (tfds build {name} "
        f"--data_dir={root}) and pass --data_dir={root}")


def _tfds_features(spec: str, builder):
    """(image key, label key, image shape, num_classes or None) from the builder's info."""
    keys = builder.info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
        raise UserError(
            f"--dataset={spec} has no (input, label) supervised keys (it has {keys!r}); load it "
            "yourself in a build_datasets override and use trainer.data.from_arrays")
    image_key, label_key = keys
    shape = tuple(builder.info.features[image_key].shape)
    if not shape or None in shape:
        raise UserError(
            f"--dataset={spec}: its '{image_key}' feature has shape {shape}, not one fixed "
            "shape; resize the images in a build_datasets override and use "
            "trainer.data.from_arrays")
    num_classes = getattr(builder.info.features[label_key], "num_classes", None)
    return image_key, label_key, shape, num_classes


def _tfds_split(spec: str, builder, split: str):
    known = list(builder.info.splits.keys())
    if known and split not in known:
        raise UserError(f"--dataset={spec} has no '{split}' split (it has: {', '.join(known)}); "
                        "this loader reads 'train' and 'test'")
    try:
        dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except AssertionError:  # tfds: "could not find data in DIR".
        raise _not_prepared(spec, builder) from None
    parts = list(dataset.batch(8192).as_numpy_iterator())
    if not parts:
        raise UserError(f"--dataset={spec}: the '{split}' split holds no examples")
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _load_tfds(spec: str, data_dir: Optional[str]) -> Arrays:
    """A prepared TensorFlow Dataset, read into memory (its 'train' and 'test' splits).

    The data then goes through the same in-memory pipeline as Fashion-MNIST: same image
    contract, same epoch order, exact resume. ``source`` is the prepared folder, so the
    resume check fingerprints its files. An unprepared dataset is found by ``as_dataset``
    (which ``tfds.testing.mock_data`` replaces, so tests need no prepared folder).
    """
    builder = _tfds_builder(spec, data_dir)
    _, _, _, num_classes = _tfds_features(spec, builder)
    x_train, y_train = _tfds_split(spec, builder, "train")
    x_test, y_test = _tfds_split(spec, builder, "test")
    if _target_kind(y_train) == "class":
        if not num_classes:
            raise UserError(f"--dataset={spec}: its labels are integers but not a ClassLabel "
                            "feature, so the class count is unknown; use from_arrays with "
                            "num_classes in a build_datasets override")
        for y, split in ((y_train, "train"), (y_test, "test")):
            _check_targets(y, f"the {split} labels of {spec}", num_classes,
                           "the prepared files are corrupt; prepare them again")
        y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
    return Arrays(x_train, y_train, x_test, y_test, num_classes or 0, builder.data_dir)


def dataset_shapes(name: str, data_dir: Optional[str] = None) -> Tuple[Tuple[int, ...], int]:
    """(input shape, classes) of a dataset without loading its data (for the audit).

    Raises:
      UserError: for a tfds dataset that cannot be found (see :func:`_tfds_builder`).
    """
    if name in DATASET_SHAPES:
        return DATASET_SHAPES[name]
    if not name.startswith("tfds:"):
        raise UserError(f"unknown dataset {name!r}; choose fashion_mnist, mnist, synthetic or "
                        "tfds:NAME (--dataset)")
    _, _, shape, num_classes = _tfds_features(name, _tfds_builder(name, data_dir))
    return shape, num_classes or 0
