"""A dataset in memory (:class:`Arrays`) and the checks of its contract (:func:`check_arrays`).

Every dataset is checked when it is loaded (as many targets as images, the same image shape in
both splits; integer targets are class ids in ``[0, num_classes)``, float targets must be
finite), so a bad file or array stops the run before training. No TensorFlow here: the
loaders in ``trainer/data/sources.py`` and ``trainer/data/tfds_source.py`` build these arrays and the
pipelines in ``trainer/data/pipelines.py`` consume them.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Tuple

import numpy as np

from trainer.errors import UserError


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
        check_targets(y, y_name, arrays.num_classes, fix)
    train_shape, test_shape = arrays.x_train.shape[1:], arrays.x_test.shape[1:]
    if train_shape != test_shape:
        raise UserError(
            f"{name('x_test')} holds {_describe(test_shape)} images but {name('x_train')} holds "
            f"{_describe(train_shape)} images; both splits must come from one dataset")
    y_train, y_test = arrays.y_train, arrays.y_test
    if target_kind(y_train) != target_kind(y_test) or y_train.shape[1:] != y_test.shape[1:]:
        raise UserError(
            f"{name('y_test')} holds {y_test.dtype} targets of shape {_describe(y_test.shape[1:])} "
            f"but {name('y_train')} holds {y_train.dtype} targets of shape "
            f"{_describe(y_train.shape[1:])}; both splits need targets of one kind and shape")
    return arrays


def target_kind(y: np.ndarray) -> str:
    """'class' for integer class ids, 'float' for values (regression, images); else ''."""
    if np.issubdtype(y.dtype, np.integer):
        return "class"
    return "float" if np.issubdtype(y.dtype, np.floating) else ""


def check_targets(y: np.ndarray, y_name: str, num_classes: int, fix: str) -> None:
    """Class ids in ``[0, num_classes)``, or finite floats; one line naming the first bad one."""
    kind = target_kind(y)
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
