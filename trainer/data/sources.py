"""The built-in datasets' sources: IDX files, Keras's mnist.npz, a download, synthetic data.

Each loader returns unchecked :class:`~trainer.data.arrays.Arrays`; ``trainer.data.load_arrays``
picks the loader for a dataset name (and the folders searched) and checks the result.
"""

from __future__ import annotations

import gzip
import os
import zipfile
from typing import Optional

import numpy as np

from trainer.data.arrays import Arrays
from trainer.errors import UserError

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


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


def find_idx(folder: str, stem: str) -> Optional[str]:
    """The path of IDX file ``stem`` in ``folder``, gzipped or not; None when absent."""
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def load_idx_folder(folder: str, num_classes: int = 10) -> Arrays:
    """The four IDX files (:data:`IDX_FILES`) in ``folder``; each array names its file."""
    paths = {}
    for key, stem in IDX_FILES.items():
        path = find_idx(folder, stem)
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


def load_npz(path: str) -> Arrays:
    """Keras's ``mnist.npz`` (arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``)."""
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


def keras_cache(*parts: str) -> str:
    """A path in the Keras dataset cache (``$KERAS_HOME/datasets``, default ``~/.keras``)."""
    return os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "datasets", *parts)


def download(name: str, loader) -> Arrays:
    """Arrays from a Keras ``load_data`` function (which downloads); one line if it fails."""
    try:
        (x_train, y_train), (x_test, y_test) = loader()
    except Exception as error:  # Keras raises plain Exception subclasses for network errors.
        raise UserError(
            f"{name} is not on this machine and the Keras download failed ({type(error).__name__}); "
            "pass --data_dir with the IDX files, or use --dataset=fashion_mnist (installed by "
            "`make setup`)") from None
    return Arrays(x_train[..., None], y_train.astype(np.int32), x_test[..., None],
                  y_test.astype(np.int32), 10, f"keras download ({name})")


def synthetic(examples: int, seed: int) -> Arrays:
    """``examples`` training and ``examples // 4`` test images of 10 classes, from ``seed``."""
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
