"""Datasets: IDX/npz loading, clear errors for missing or corrupt files, the tf.data pipeline."""

import gzip
import os

import numpy as np
import pytest

from trainer import data
from trainer.compat import keras, tf
from trainer.errors import UserError

SYSTEM_FILE = os.path.join(data.SYSTEM_FASHION_MNIST, "train-images-idx3-ubyte.gz")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder, n_train=40, n_test=12, seed=0, gz=True):
    """Writes a small Fashion-MNIST-shaped IDX dataset; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    os.makedirs(folder, exist_ok=True)
    for key, stem in data.IDX_FILES.items():
        raw = _idx_bytes(arrays[key])
        if gz:
            with gzip.open(os.path.join(folder, stem + ".gz"), "wb") as f:
                f.write(raw)
        else:
            with open(os.path.join(folder, stem), "wb") as f:
                f.write(raw)
    return arrays


def _check_same(loaded, written):
    assert loaded.x_train.shape == written["x_train"].shape + (1,)
    assert loaded.x_train.dtype == np.uint8 and loaded.y_train.dtype == np.int32
    np.testing.assert_array_equal(loaded.x_train[..., 0], written["x_train"])
    np.testing.assert_array_equal(loaded.y_train, written["y_train"])
    np.testing.assert_array_equal(loaded.x_test[..., 0], written["x_test"])
    np.testing.assert_array_equal(loaded.y_test, written["y_test"])
    assert loaded.num_classes == 10 and loaded.input_shape == (28, 28, 1)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_data_dir(tmp_path, gz):
    written = write_idx_folder(tmp_path, gz=gz)
    loaded = data.load_arrays("fashion_mnist", data_dir=str(tmp_path))
    _check_same(loaded, written)
    assert loaded.source == str(tmp_path)


def test_fashion_mnist_prefers_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "system"
    written = write_idx_folder(system, seed=1)
    write_idx_folder(tmp_path / "home" / "datasets" / "fashion-mnist", seed=2)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(system))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    loaded = data.load_arrays("fashion_mnist")
    _check_same(loaded, written)
    assert loaded.source == str(system)


def test_fashion_mnist_falls_back_to_keras_cache(tmp_path, monkeypatch):
    written = write_idx_folder(tmp_path / "home" / "datasets" / "fashion-mnist", seed=2)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(tmp_path / "absent"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    _check_same(data.load_arrays("fashion_mnist"), written)


@pytest.mark.skipif(not os.path.exists(SYSTEM_FILE),
                    reason="Debian's dataset-fashion-mnist is not installed (make setup does it)")
def test_real_system_fashion_mnist():
    loaded = data.load_arrays("fashion_mnist")
    assert loaded.source == data.SYSTEM_FASHION_MNIST
    assert loaded.x_train.shape == (60000, 28, 28, 1) and loaded.x_test.shape == (10000, 28, 28, 1)
    assert sorted(np.unique(loaded.y_train)) == list(range(10))
    assert np.bincount(loaded.y_test).tolist() == [1000] * 10


def test_missing_file_names_path(tmp_path):
    write_idx_folder(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(UserError) as info:
        data.load_arrays("fashion_mnist", data_dir=str(tmp_path))
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in str(info.value)
    assert "missing" in str(info.value)


def test_truncated_file_names_path(tmp_path):
    write_idx_folder(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path) as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-100])  # A valid gzip stream holding too few bytes.
    with pytest.raises(UserError) as info:
        data.load_arrays("fashion_mnist", data_dir=str(tmp_path))
    assert str(path) in str(info.value) and "truncated" in str(info.value)


def test_cut_gzip_stream_names_path(tmp_path):
    write_idx_folder(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])  # The download stopped half-way.
    with pytest.raises(UserError) as info:
        data.load_arrays("fashion_mnist", data_dir=str(tmp_path))
    assert str(path) in str(info.value)


def test_bad_header_names_path(tmp_path):
    write_idx_folder(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"<html>not found</html>")
    with pytest.raises(UserError, match="bad header") as info:
        data.load_arrays("fashion_mnist", data_dir=str(tmp_path))
    assert str(path) in str(info.value)


def test_images_and_labels_count_mismatch(tmp_path):
    write_idx_folder(tmp_path)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(np.zeros(39, np.uint8)))
    with pytest.raises(UserError, match="40 images but .* 39 labels"):
        data.load_arrays("fashion_mnist", data_dir=str(tmp_path))


def _write_npz(path, n_train=30, n_test=10):
    rng = np.random.default_rng(5)
    arrays = dict(x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                  y_train=rng.integers(0, 10, n_train, dtype=np.uint8),
                  x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                  y_test=rng.integers(0, 10, n_test, dtype=np.uint8))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def test_mnist_from_data_dir_npz(tmp_path):
    written = _write_npz(str(tmp_path / "mnist.npz"))
    loaded = data.load_arrays("mnist", data_dir=str(tmp_path))
    _check_same(loaded, written)
    assert loaded.source == str(tmp_path / "mnist.npz")


def test_mnist_from_data_dir_idx(tmp_path):
    written = write_idx_folder(tmp_path, seed=3)
    _check_same(data.load_arrays("mnist", data_dir=str(tmp_path)), written)


def test_mnist_from_keras_cache(tmp_path, monkeypatch):
    written = _write_npz(str(tmp_path / "datasets" / "mnist.npz"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    _check_same(data.load_arrays("mnist"), written)


def test_corrupt_npz_names_path(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError) as info:
        data.load_arrays("mnist", data_dir=str(tmp_path))
    assert str(tmp_path / "mnist.npz") in str(info.value)


def test_failed_download_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline():
        raise ConnectionError("no network")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(UserError, match="--data_dir"):
        data.load_arrays("mnist")


def test_synthetic_shapes_dtypes_and_determinism():
    a = data.load_arrays("synthetic", seed=3, synthetic_examples=200)
    assert a.x_train.shape == (200, 28, 28, 1) and a.x_train.dtype == np.uint8
    assert a.x_test.shape == (50, 28, 28, 1) and a.y_train.dtype == np.int32
    assert a.y_train.min() >= 0 and a.y_train.max() <= 9
    assert np.bincount(a.y_train, minlength=10).min() >= 5  # Every class present.
    b = data.load_arrays("synthetic", seed=3, synthetic_examples=200)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    c = data.load_arrays("synthetic", seed=4, synthetic_examples=200)
    assert not np.array_equal(a.x_train, c.x_train)


def test_pipeline_float32_static_batches_and_splits():
    arrays = data.load_arrays("synthetic", seed=0, synthetic_examples=100)
    ds = data.make_datasets(arrays, batch_size=16, validation_split=0.2, seed=0)
    assert (ds.num_train, ds.num_validation, ds.num_test) == (80, 20, 25)
    assert ds.steps_per_epoch == 5
    spec_x, spec_y = ds.train.element_spec
    assert spec_x.shape.as_list() == [16, 28, 28, 1] and spec_x.dtype == tf.float32
    assert spec_y.shape.as_list() == [16]
    seen = []
    for x, y in ds.train.take(10):  # Two epochs: the stream repeats past the end.
        assert x.dtype == tf.float32
        assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 1.0
        seen.append(y.numpy())
    # The first epoch covers the training split exactly once (80 = 5 x 16), never validation.
    first_epoch = np.concatenate(seen[:5])
    assert sorted(first_epoch.tolist()) == sorted(arrays.y_train[:80].tolist())
    val = list(ds.validation)
    assert [len(y) for _, y in val] == [16, 4]
    np.testing.assert_allclose(np.concatenate([x.numpy() for x, _ in val]),
                               arrays.x_train[80:] / 255.0, rtol=1e-6)
    assert sum(len(y) for _, y in ds.test) == 25


def test_no_validation_split():
    arrays = data.load_arrays("synthetic", seed=0, synthetic_examples=64)
    ds = data.make_datasets(arrays, batch_size=32, validation_split=0.0, seed=0)
    assert ds.validation is None and ds.num_train == 64 and ds.steps_per_epoch == 2


def test_batch_larger_than_training_split():
    arrays = data.load_arrays("synthetic", seed=0, synthetic_examples=64)
    with pytest.raises(UserError, match="--batch_size"):
        data.make_datasets(arrays, batch_size=128, validation_split=0.0, seed=0)
