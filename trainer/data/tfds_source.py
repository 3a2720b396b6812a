"""``--dataset=tfds:NAME[/CONFIG]``: a prepared TensorFlow Dataset, read into memory or,
when its decoded training split would take more than a quarter of the memory available
(:func:`streams`), streamed from its prepared files like ``tfrecord:`` shards.

Runs never download: the dataset must be prepared (``tfds build``) in ``--data_dir`` or tfds's
default folder. ``tensorflow_datasets`` is imported only when such a dataset is asked for
(the TF 2.15 / Gaudi stack has none).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from trainer.compat import tf
from trainer.data import sharded
from trainer.data.arrays import Arrays, check_targets, target_kind
from trainer.data.pipelines import to_float
from trainer.errors import UserError


def tfds_builder(spec: str, data_dir: Optional[str]):
    """The tfds builder of ``spec`` ('tfds:NAME' or 'tfds:NAME/CONFIG'); nothing downloads."""
    name = spec[len("tfds:"):]
    try:
        import tensorflow_datasets as tfds  # Optional (pip install mptrain[tfds]); slow to import.
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


def load_tfds(spec: str, data_dir: Optional[str]) -> Arrays:
    """A prepared TensorFlow Dataset, read into memory (its 'train' and 'test' splits).

    The data then goes through the same in-memory pipeline as Fashion-MNIST: same image
    contract, same epoch order, exact resume. ``source`` is the prepared folder, so the
    resume check fingerprints its files. An unprepared dataset is found by ``as_dataset``
    (which ``tfds.testing.mock_data`` replaces, so tests need no prepared folder).
    """
    builder = tfds_builder(spec, data_dir)
    _, _, _, num_classes = _tfds_features(spec, builder)
    x_train, y_train = _tfds_split(spec, builder, "train")
    x_test, y_test = _tfds_split(spec, builder, "test")
    if target_kind(y_train) == "class":
        if not num_classes:
            raise UserError(f"--dataset={spec}: its labels are integers but not a ClassLabel "
                            "feature, so the class count is unknown; use from_arrays with "
                            "num_classes in a build_datasets override")
        for y, split in ((y_train, "train"), (y_test, "test")):
            check_targets(y, f"the {split} labels of {spec}", num_classes,
                           "the prepared files are corrupt; prepare them again")
        y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
    return Arrays(x_train, y_train, x_test, y_test, num_classes or 0, builder.data_dir)


def tfds_shapes(spec: str, data_dir: Optional[str]) -> Tuple[Tuple[int, ...], int]:
    """(input shape, classes or 0) of ``spec`` from its builder's info; no data is read.

    Raises:
      UserError: for a dataset that cannot be found (see :func:`tfds_builder`).
    """
    _, _, shape, num_classes = _tfds_features(spec, tfds_builder(spec, data_dir))
    return shape, num_classes or 0


# The line between loading a prepared set into memory and streaming its files: the decoded
# training split against this share of the memory available when the run starts. The
# environment variable sets the line in MB instead (0: always stream).
STREAM_SHARE = 0.25
STREAM_ABOVE_ENV = "TRAINER_TFDS_STREAM_ABOVE_MB"


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # Unknown: assume a small machine.


def streams(spec: str, data_dir: Optional[str]) -> bool:
    """Whether ``spec``'s decoded training split is too big to hold comfortably in memory."""
    builder = tfds_builder(spec, data_dir)
    _, _, shape, _ = _tfds_features(spec, builder)
    split = builder.info.splits.get("train") if hasattr(builder.info.splits, "get") else None
    examples = split.num_examples if split is not None else 0
    decoded = examples * int(np.prod(shape))  # uint8 images, as loaded.
    limit = os.environ.get(STREAM_ABOVE_ENV)
    line = float(limit) * 1e6 if limit else STREAM_SHARE * _available_bytes()
    return decoded > line


def stream_tfds(spec: str, data_dir: Optional[str], *, batch_size: int, seed: int,
                input_context=None, deterministic: bool = True):
    """The prepared set's 'train' files streamed (``trainer.data.from_files``): its
    'validation' split, when it has one, is evaluated after each epoch, 'test' at the end."""
    builder = tfds_builder(spec, data_dir)
    image_key, label_key, _, num_classes = _tfds_features(spec, builder)
    known = list(builder.info.splits.keys())

    def files(split):
        if split not in known:
            raise UserError(f"--dataset={spec} has no '{split}' split (it has: "
                            f"{', '.join(known)}); this loader reads 'train' and 'test'")
        names = builder.info.splits[split].filenames
        paths = [os.path.join(builder.data_dir, n) for n in names]
        if not paths or not all(os.path.isfile(p) for p in paths):
            raise _not_prepared(spec, builder)
        return paths

    features = builder.info.features

    def parse(record, seed_):
        del seed_  # No augmentation: the same examples as the in-memory path.
        example = features.deserialize_example(record)
        label = tf.cast(example[label_key], tf.int32)
        if num_classes:
            label = sharded.checked_label(label, num_classes, 0, "prepare the set again")
        return to_float(example[image_key]), label

    return sharded.from_files(
        files("train"), parse=parse, batch_size=batch_size, test=files("test"),
        validation=files("validation") if "validation" in known else None, seed=seed,
        num_classes=num_classes or 0, input_context=input_context,
        deterministic=deterministic, source=builder.data_dir)
