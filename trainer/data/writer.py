"""Writes image-classification TFRecord shards (``python -m trainer.data.write_shards``) in the ImageNet / TF-models layout.

Each record is a ``tf.train.Example`` with ``image/encoded`` (the JPEG or PNG bytes),
``image/format``, ``image/height``, ``image/width`` and ``image/class/label`` (int64, from 0
here; ImageNet's TF-models shards count from 1: train those with ``--label_offset=1``). Files
are named ``PREFIX-00000-of-00008``; a ``labels.txt`` beside them lists the class names, one
per line, which is where ``--dataset=tfrecord:...`` reads the class count from.

From a folder of images, one sub-folder per class (the class ids follow the sorted folder
names; JPEG and PNG files are copied as they are, not re-encoded; 10% held out as
``shards/validation-*``)::

    python -m trainer.data.write_shards --images=photos/ --out=shards --shards=8

From a built-in dataset's arrays (both splits: ``OUT/train-*`` and ``OUT/test-*``, PNG)::

    python -m trainer.data.write_shards --dataset=fashion_mnist --out=shards --shards=4

From Python: :func:`write_arrays` and :func:`write_image_folder`.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np

from trainer.compat import tf
from trainer.errors import UserError

IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
IMAGE_SUFFIXES = {".jpg": b"jpeg", ".jpeg": b"jpeg", ".png": b"png"}


def shard_names(prefix: str, num_shards: int) -> List[str]:
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def _example(encoded: bytes, image_format: bytes, height: int, width: int, label: int):
    feature = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        IMAGE_KEY: feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/format": feature(bytes_list=tf.train.BytesList(value=[image_format])),
        "image/height": feature(int64_list=tf.train.Int64List(value=[height])),
        "image/width": feature(int64_list=tf.train.Int64List(value=[width])),
        LABEL_KEY: feature(int64_list=tf.train.Int64List(value=[int(label)])),
    })).SerializeToString()


def _check_out(prefix: str, num_shards: int) -> List[str]:
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise UserError(f"--shards must be a positive integer, got {num_shards!r}")
    paths = shard_names(prefix, num_shards)
    existing = [p for p in paths if os.path.exists(p)]
    if existing:  # Never overwrite what is on disk.
        raise UserError(f"{existing[0]} exists already; choose another --out or delete it")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    return paths


def _write(records, paths: Sequence[str]) -> List[str]:
    """Writes records round-robin over ``paths`` (each shard a mix of the whole order)."""
    writers = [tf.io.TFRecordWriter(p + ".tmp") for p in paths]
    try:
        for i, record in enumerate(records):
            writers[i % len(writers)].write(record)
    finally:
        for w in writers:
            w.close()
    for p in paths:  # Complete files appear only once every record is written.
        os.replace(p + ".tmp", p)
    return list(paths)


def _write_labels(folder: str, names: Sequence[str]) -> None:
    path = os.path.join(folder, "labels.txt")
    text = "".join(f"{n}\n" for n in names)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != text:
                raise UserError(f"{path} lists other classes; write to another folder")
        return
    with open(path, "w") as f:
        f.write(text)


def write_arrays(images: np.ndarray, labels: np.ndarray, prefix: str, *, num_shards: int,
                 class_names: Optional[Sequence[str]] = None, image_format: str = "png"
                 ) -> List[str]:
    """Writes uint8 images ``(N, H, W, C)`` (C 1 or 3) and class ids as PNG or JPEG records.

    Records go round-robin over the shards in the arrays' order. Returns the shard paths.

    Raises:
      UserError: for arrays that are not uint8 images with one label each, or shards that
        exist already.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
        raise UserError(f"write_arrays needs uint8 images (N, H, W[, C]) and one label each; got "
                        f"{images.dtype} {images.shape} and {len(labels)} labels")
    if images.ndim == 3:
        images = images[..., None]
    if image_format not in ("png", "jpeg"):
        raise UserError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    paths = _check_out(prefix, num_shards)
    encode = tf.io.encode_png if image_format == "png" else tf.io.encode_jpeg
    _, height, width, _ = images.shape

    def records():
        for image, label in zip(images, labels):
            yield _example(encode(image).numpy(), image_format.encode(), height, width, label)

    written = _write(records(), paths)
    classes = class_names or [str(i) for i in range(int(labels.max()) + 1)]
    _write_labels(os.path.dirname(os.path.abspath(prefix)), classes)
    return written


def write_image_folder(folder: str, out: str, *, num_shards: int, validation: float = 0.1,
                       seed: int = 0) -> List[str]:
    """Writes ``folder/CLASS/*.jpg|.jpeg|.png`` as ``out/train-*`` and ``out/validation-*``.

    The images go in a seeded random order; the last ``validation`` fraction of it becomes
    the validation shards (``max(1, round(num_shards * validation))`` files), which
    ``--dataset=tfrecord:'OUT/train-*'`` finds by their name. Class ids follow the sorted
    class folder names (``out/labels.txt``). The files' bytes are stored as they are.

    Raises:
      UserError: for a folder without class sub-folders or images, an image that is not JPEG
        or PNG inside, or shards that exist already.
    """
    if not os.path.isdir(folder):
        raise UserError(f"--images: {folder} is not a folder")
    if not isinstance(validation, (int, float)) or not 0 <= validation < 1:
        raise UserError(f"--validation must be in [0, 1), got {validation!r}")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    files = [(os.path.join(folder, c, f), label) for label, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(folder, c)))
             if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"--images: {folder} holds no class folders with .jpg/.jpeg/.png images "
                        "(expected FOLDER/CLASS/IMAGE.jpg)")
    order = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    held = int(len(order) * validation)
    splits = [("train", order[:len(order) - held], num_shards)]
    if held:
        splits.append(("validation", order[len(order) - held:],
                       max(1, round(num_shards * validation))))
    targets = [(_check_out(os.path.join(out, name), shards), part) for name, part, shards in splits]

    def records(part):
        for path, label in part:
            with open(path, "rb") as f:
                encoded = f.read()
            try:
                shape = tf.io.extract_jpeg_shape(encoded) if encoded[:2] == b"\xff\xd8" else \
                    tf.shape(tf.io.decode_png(encoded))
            except tf.errors.InvalidArgumentError:
                raise UserError(f"{path} is not a readable JPEG or PNG image; remove it or "
                                "convert it") from None
            kind = IMAGE_SUFFIXES[os.path.splitext(path)[1].lower()]
            yield _example(encoded, kind, int(shape[0]), int(shape[1]), label)

    written = []
    for paths, part in targets:
        written += _write(records(part), paths)
    _write_labels(out, classes)
    return written
