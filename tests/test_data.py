"""Datasets: IDX/npz loading, clear errors for missing, corrupt or inconsistent files, the
image contract, and the tf.data pipelines (static, padded evaluation batches)."""

import gzip
import os
import time

import numpy as np
import pytest
from conftest import run_cli, user_stderr_lines

from trainer import data
from trainer.compat import keras, tf
from trainer.errors import UserError

SYSTEM_FILE = os.path.join(data.SYSTEM_FASHION_MNIST, "train-images-idx3-ubyte.gz")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder, n_train=40, n_test=12, seed=0, gz=True, train_shape=(28, 28),
                     test_shape=(28, 28)):
    """Writes a small Fashion-MNIST-shaped IDX dataset; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, *train_shape), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, *test_shape), dtype=np.uint8),
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
    # Evaluation batches: always 16 (static), the last one padded with weight-0 copies of
    # its last real example.
    for split in (ds.validation, ds.test):
        assert [s.shape.as_list()[0] for s in split.element_spec] == [16, 16, 16]
    val = [tuple(t.numpy() for t in batch) for batch in ds.validation]
    assert [w.tolist() for _, _, w in val] == [[1.0] * 16, [1.0] * 4 + [0.0] * 12]
    np.testing.assert_allclose(np.concatenate([x for x, _, _ in val])[:20],
                               arrays.x_train[80:] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(val[1][0][4:], np.repeat(val[1][0][3:4], 12, axis=0))
    np.testing.assert_array_equal(val[1][1][4:], [arrays.y_train[99]] * 12)
    test = [tuple(t.numpy() for t in batch) for batch in ds.test]
    assert [len(y) for _, y, _ in test] == [16, 16] and sum(w.sum() for _, _, w in test) == 25
    np.testing.assert_array_equal(np.concatenate([y for _, y, _ in test])[:25], arrays.y_test)


def test_no_validation_split():
    arrays = data.load_arrays("synthetic", seed=0, synthetic_examples=64)
    ds = data.make_datasets(arrays, batch_size=32, validation_split=0.0, seed=0)
    assert ds.validation is None and ds.num_train == 64 and ds.steps_per_epoch == 2


def test_batch_larger_than_training_split():
    arrays = data.load_arrays("synthetic", seed=0, synthetic_examples=64)
    with pytest.raises(UserError, match="--batch_size"):
        data.make_datasets(arrays, batch_size=128, validation_split=0.0, seed=0)


# ---------------------------------------------------------------- the image contract


def _arrays(x_train, x_test, y_train=None, y_test=None, num_classes=10):
    y_train = np.arange(len(x_train)) % num_classes if y_train is None else y_train
    y_test = np.arange(len(x_test)) % num_classes if y_test is None else y_test
    return data.Arrays(x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32),
                       num_classes, "user arrays")


def _first_batch(arrays, batch_size=4):
    ds = data.make_datasets(arrays, batch_size=batch_size, validation_split=0.0, seed=0)
    x, y = next(iter(ds.train))
    return ds, x.numpy(), y.numpy()


def test_uint8_images_are_scaled_to_unit_range():
    x = np.full((8, 4, 4, 1), 255, np.uint8)
    x[:, 0, 0, 0] = np.arange(8)  # Pixel (0, 0) tells the example.
    ds, batch, labels = _first_batch(_arrays(x, x[:3]))
    assert batch.dtype == np.float32 and batch.max() == 1.0
    np.testing.assert_allclose(batch[:, 0, 0, 0], labels / 255.0, rtol=1e-7)
    x_test = np.concatenate([b[0].numpy() for b in ds.test])[:3]
    np.testing.assert_allclose(x_test[:, 0, 0, 0], np.arange(3) / 255.0, rtol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_float_images_are_used_as_given(dtype):
    # Already normalised (and even negative) values: dividing by 255 again was the old bug.
    x = np.linspace(-1.0, 1.0, 8 * 16).reshape(8, 4, 4, 1).astype(dtype)
    ds, batch, labels = _first_batch(_arrays(x, x[:3]))
    assert batch.dtype == np.float32
    np.testing.assert_array_equal(batch, x[labels].astype(np.float32))
    x_test = np.concatenate([b[0].numpy() for b in ds.test])[:3]
    np.testing.assert_array_equal(x_test, x[:3].astype(np.float32))


def test_other_image_dtypes_are_refused():
    x = np.zeros((8, 4, 4, 1), np.int64)
    with pytest.raises(UserError, match="x_train of user arrays holds int64 images; images must "
                                        r"be uint8 \(scaled to \[0, 1\]\) or floating point"):
        data.make_datasets(_arrays(x, x[:3].astype(np.uint8)), batch_size=4,
                           validation_split=0.0, seed=0)


# ---------------------------------------------------------------- consistency, at load


def _set_labels(folder, stem, labels):
    with gzip.open(os.path.join(folder, stem + ".gz"), "wb") as f:
        f.write(_idx_bytes(np.asarray(labels, np.uint8)))


@pytest.mark.parametrize("split, stem", [("test", "t10k-labels-idx1-ubyte"),
                                         ("train", "train-labels-idx1-ubyte")])
def test_label_outside_classes_names_file_and_index(tmp_path, split, stem):
    written = write_idx_folder(tmp_path)
    labels = written[f"y_{split}"].copy()
    labels[17 if split == "train" else 9] = 200
    labels[-1] = 10  # Only the first bad index is reported.
    _set_labels(tmp_path, stem, labels)
    with pytest.raises(UserError) as info:
        data.load_arrays("fashion_mnist", data_dir=str(tmp_path))
    index = 17 if split == "train" else 9
    assert str(info.value).startswith(
        f"{tmp_path / stem}.gz: label 200 at index {index} is outside [0, 10); ")
    assert "\n" not in str(info.value)


def test_label_outside_classes_in_npz(tmp_path):
    written = _write_npz(str(tmp_path / "mnist.npz"))
    written["y_test"][4] = 12
    np.savez(tmp_path / "mnist.npz", **written)
    with pytest.raises(UserError, match=r"mnist.npz\[y_test\]: label 12 at index 4 is outside"):
        data.load_arrays("mnist", data_dir=str(tmp_path))


def test_user_arrays_are_checked_by_make_datasets():
    x = np.zeros((8, 4, 4, 1), np.uint8)
    bad = _arrays(x, x[:3], y_test=np.array([0, -1, 3]))
    with pytest.raises(UserError, match=r"^y_test of user arrays: label -1 at index 1 is outside "
                                        r"\[0, 10\); fix the arrays or num_classes$"):
        data.make_datasets(bad, batch_size=4, validation_split=0.0, seed=0)
    with pytest.raises(UserError, match="x_test of user arrays holds no examples"):
        data.make_datasets(_arrays(x, x[:0]), batch_size=4, validation_split=0.0, seed=0)


def test_train_and_test_image_shapes_must_agree(tmp_path):
    # Both files are valid IDX files; only together are they wrong.
    write_idx_folder(tmp_path, train_shape=(14, 56))
    with pytest.raises(UserError) as info:
        data.load_arrays("fashion_mnist", data_dir=str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path / 't10k-images-idx3-ubyte.gz'} holds 28x28x1 images but "
        f"{tmp_path / 'train-images-idx3-ubyte.gz'} holds 14x56x1 images; both splits must "
        "come from one dataset")


def test_test_images_and_labels_count_mismatch(tmp_path):
    write_idx_folder(tmp_path)
    _set_labels(tmp_path, "t10k-labels-idx1-ubyte", np.zeros(13))
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz holds 12 images but .*"
                                        "t10k-labels-idx1-ubyte.gz holds 13 labels"):
        data.load_arrays("fashion_mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("problem", ["test_label", "shapes"])
def test_cli_bad_data_stops_before_training(tmp_path, problem):
    folder = tmp_path / "data"
    written = write_idx_folder(folder, n_train=64, n_test=40,
                               train_shape=(14, 56) if problem == "shapes" else (28, 28))
    if problem == "test_label":
        labels = written["y_test"].copy()
        labels[17] = 200
        _set_labels(folder, "t10k-labels-idx1-ubyte", labels)
    metrics = tmp_path / "metrics.json"
    start = time.monotonic()
    result = run_cli("--dataset=fashion_mnist", f"--data_dir={folder}", "--epochs=50",
                     "--batch_size=8", "--model_args=units=16", "--policy=float32",
                     "--device=cpu", "--validation_split=0", f"--metrics_file={metrics}",
                     timeout=120)
    elapsed = time.monotonic() - start
    lines = user_stderr_lines(result.stderr)
    assert result.returncode != 0, result.stdout + result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    expected = (f"error: {folder / 't10k-labels-idx1-ubyte.gz'}: label 200 at index 17 is "
                "outside [0, 10); " if problem == "test_label" else
                f"error: {folder / 't10k-images-idx3-ubyte.gz'} holds 28x28x1 images but ")
    assert lines[0].startswith(expected), lines[0]
    # Nothing trained: no epoch line, no metrics file (50 epochs would take far longer).
    assert "epoch" not in result.stdout and not metrics.exists(), result.stdout
    print(f"{problem}: error after {elapsed:.1f} s")  # Seen with pytest -s.


# ---------------------------------------------------------------- full evaluation batches


def test_full_batches_pads_any_batching():
    x = np.arange(25 * 2, dtype=np.float32).reshape(25, 2)
    y = np.arange(25, dtype=np.int32)
    uneven = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)  # 7, 7, 7, 4
    full = data.full_batches(uneven, 8)
    assert [s.shape.as_list()[0] for s in full.element_spec] == [8, 8, 8]
    batches = [tuple(t.numpy() for t in b) for b in full]
    assert len(batches) == 4
    xs, ys, ws = (np.concatenate(parts) for parts in zip(*batches))
    np.testing.assert_array_equal(xs[:25], x)
    np.testing.assert_array_equal(ys, list(range(25)) + [24] * 7)  # Copies of the last one.
    np.testing.assert_array_equal(ws, [1.0] * 25 + [0.0] * 7)
    # Keras-style weights are kept (padding weighs 0); a full dataset is returned as is.
    weighted = tf.data.Dataset.from_tensor_slices((x, y, y / 10)).batch(5)
    ws = np.concatenate([b[2].numpy() for b in data.full_batches(weighted, 8)])
    np.testing.assert_allclose(ws, np.concatenate([y / 10, np.zeros(7)]), rtol=1e-6)
    assert data.full_batches(full, 8) is full
    with pytest.raises(ValueError, match=r"\(features, labels\) or"):
        data.full_batches(tf.data.Dataset.from_tensor_slices({"x": x}).batch(8), 8)


def test_map_train_changes_train_and_train_from_alike():
    from trainer import data as data_module

    arrays = data_module.load_arrays("synthetic", seed=1, synthetic_examples=64)
    base = data_module.make_datasets(arrays, batch_size=8, validation_split=0.0, seed=1)
    mapped = base.map_train(lambda x, y: (x, 9 - y))
    _, y_base = next(iter(base.train_from(16)))
    _, y_from = next(iter(mapped.train_from(16)))
    _, y_train = next(iter(mapped.train.skip(2)))
    np.testing.assert_array_equal(y_from.numpy(), 9 - y_base.numpy())
    np.testing.assert_array_equal(y_train.numpy(), y_from.numpy())


# ---------------------------------------------------------------- your own data: from_arrays


def _images(n, seed=0, shape=(6, 6, 1)):
    return np.random.default_rng(seed).random((n,) + shape, dtype=np.float32)


def test_from_arrays_class_ids_match_the_built_in_pipeline():
    arrays = data.load_arrays("synthetic", seed=2, synthetic_examples=96)
    built_in = data.make_datasets(arrays, batch_size=16, validation_split=0.25, seed=5)
    mine = data.from_arrays(arrays.x_train, arrays.y_train.astype(np.int64), arrays.x_test,
                            arrays.y_test.astype(np.uint8), num_classes=10, batch_size=16,
                            validation_split=0.25, seed=5, source="my arrays")
    assert (mine.num_train, mine.num_validation, mine.num_test, mine.source) == (
        72, 24, 24, "my arrays")
    assert mine.train.element_spec[1].dtype == tf.int32  # int64/uint8 ids become int32.
    for (xa, ya), (xb, yb) in zip(built_in.train_from(40).take(3), mine.train_from(40).take(3)):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())


def test_from_arrays_float_image_targets_exact_resume_and_in_memory_order():
    x = (_images(40, seed=1) * 255).astype(np.uint8)
    targets = _images(40, seed=2, shape=(6, 6, 2)).astype(np.float64)  # Any shape; -> float32.
    ds = data.from_arrays(x, targets, x[:5], targets[:5], batch_size=8, validation_split=0.2,
                          seed=3)
    assert ds.num_classes == 0 and (ds.num_train, ds.num_validation) == (32, 8)
    assert ds.train.element_spec[1].dtype == tf.float32
    assert ds.train.element_spec[1].shape.as_list() == [8, 6, 6, 2]
    stream = [(a.numpy(), b.numpy()) for a, b in ds.train.take(9)]  # Two epochs and a bit.
    # train_from(n) is train with n examples skipped, across an epoch boundary.
    for skip in (8, 24, 32, 40):
        for (xa, ya), (xb, yb) in zip(stream[skip // 8:], ds.train_from(skip).take(3)):
            np.testing.assert_array_equal(xa, xb.numpy())
            np.testing.assert_array_equal(ya, yb.numpy())
    # The in-memory copy gathers the very same batches from its epoch order.
    for epoch in (0, 1):
        order = ds.in_memory.order(epoch).numpy()
        for i in range(4):
            images, labels = ds.in_memory.batch(tf.constant(order[8 * i: 8 * i + 8]))
            np.testing.assert_array_equal(images.numpy(), stream[4 * epoch + i][0])
            np.testing.assert_array_equal(labels.numpy(), stream[4 * epoch + i][1])
    first = ds.in_memory.order(0).numpy()[:8]
    np.testing.assert_allclose(stream[0][0], x[first] / 255.0, rtol=1e-6)  # uint8 scaled.
    np.testing.assert_array_equal(stream[0][1], targets[first].astype(np.float32))  # As given.
    # Validation: the last 8 training examples, targets as given, weights 1.
    (vx, vy, vw), = [tuple(t.numpy() for t in b) for b in ds.validation]
    np.testing.assert_array_equal(vy, targets[32:].astype(np.float32))
    np.testing.assert_array_equal(vw, np.ones(8))


@pytest.mark.parametrize("y_train, y_test, num_classes, message", [
    (np.arange(16) % 3, np.arange(4) % 3, None,
     r"^y_train of arrays holds integer class ids, so from_arrays needs num_classes"),
    (np.arange(16) % 3, np.array([0, 1, 5, 2]), 3,
     r"^y_test of arrays: label 5 at index 2 is outside \[0, 3\); fix the arrays or num_classes$"),
    (np.where(np.arange(16) == 7, np.nan, 0.5), np.zeros(4), None,
     r"^y_train of arrays: target nan at index 7 is not finite; fix the arrays$"),
    (np.zeros((16, 2)), np.full((4, 2), 1e39), None,  # float64 beyond float32: inf.
     r"^y_test of arrays: target inf at index 0 is not finite"),
    (np.zeros(16, bool), np.zeros(4, bool), None,
     r"^y_train of arrays holds bool targets; targets must be integer class ids or floating"),
    (np.zeros(16), np.zeros(4, np.int32), 2,
     r"^y_test of arrays holds int32 targets of shape scalar but y_train of arrays holds float32"),
    (np.zeros(15), np.zeros(4), None, r"^x_train of arrays holds 16 images but y_train of "),
])
def test_from_arrays_refuses_bad_targets_in_one_line(y_train, y_test, num_classes, message):
    x = _images(16)
    with pytest.raises(UserError, match=message) as info:
        data.from_arrays(x, y_train, x[:4], y_test, batch_size=4, num_classes=num_classes)
    assert "\n" not in str(info.value)


def test_from_arrays_refuses_bad_settings():
    x, y = _images(16), np.zeros(16, np.float32)
    with pytest.raises(UserError, match="batch_size must be a positive integer"):
        data.from_arrays(x, y, x, y, batch_size=0)
    with pytest.raises(UserError, match=r"validation_split must be in \[0, 1\)"):
        data.from_arrays(x, y, x, y, batch_size=4, validation_split=1.0)
    with pytest.raises(UserError, match=r"x_train of arrays has shape \(16,\)"):
        data.from_arrays(np.zeros(16, np.float32), y, x, y, batch_size=4)
    with pytest.raises(UserError, match="batch_size 32 is larger than the 16 training examples"):
        data.from_arrays(x, y, x, y, batch_size=32)


def _regression_trainer(config):
    """A Trainer on float targets of shape [3] given through from_arrays."""
    from trainer.compat import keras
    from trainer.core.steps import Trainer

    x = np.random.default_rng(0).random((64, 4, 4, 1), dtype=np.float32)
    y = x.reshape(64, -1)[:, :3] * 2.0 - 1.0

    class RegressionTrainer(Trainer):
        def build_datasets(self):
            return data.from_arrays(x, y, x[:16], y[:16], batch_size=self.config.batch_size,
                                    seed=self.config.seed, source="regression arrays")

        def build_model(self):
            inputs = keras.Input(self.datasets.input_shape)
            hidden = keras.layers.Dense(8, activation="tanh")(keras.layers.Flatten()(inputs))
            return keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(hidden))

        def compute_loss(self, targets, outputs):
            return tf.reduce_mean(tf.square(outputs - targets), axis=1)

        def build_metrics(self):
            return {}

        def update_metrics(self, metrics, labels, outputs):
            pass

    return RegressionTrainer(config)


def test_from_arrays_trainer_resumes_exactly(tmp_path):
    """4 + 2 steps with a checkpoint in between equal 6 steps straight (float targets)."""
    from conftest import small_config

    config = small_config(batch_size=16, steps_per_loop=4, epochs=2, policy="float32")
    straight = _regression_trainer(config)
    straight.train_steps(6)  # 1.5 epochs: the resume point lies inside the second epoch.
    first = _regression_trainer(config)
    first.train_steps(4)
    path = tf.train.Checkpoint(**first.checkpoint_items()).write(str(tmp_path / "ckpt"))
    resumed = _regression_trainer(config)
    tf.train.Checkpoint(**resumed.checkpoint_items()).read(path).assert_consumed()
    assert int(resumed.global_step.numpy()) == 4
    resumed.train_steps(2)
    for a, b in zip(straight.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # And the regression learned: the test MSE is below that of the initial weights.
    untrained = _regression_trainer(config).evaluate(straight.datasets.test)["loss"]
    assert straight.evaluate(straight.datasets.test)["loss"] < untrained


# ---------------------------------------------------------------- ready pipelines: from_datasets


def _pipeline(seed=7):
    x = _images(48, seed=4)
    y = (np.arange(48) % 3).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(48, seed=seed).repeat() \
        .batch(8, drop_remainder=True)


def _test_set():
    return tf.data.Dataset.from_tensor_slices((_images(13, seed=5),
                                               np.zeros(13, np.int32))).batch(5)


def test_from_datasets_rebuilds_and_skips_on_resume(capsys):
    ds = data.from_datasets(train=_pipeline, test=_test_set(), steps_per_epoch=6,
                            num_classes=3, source="my pipeline")
    assert (ds.num_train, ds.num_test, ds.num_validation, ds.input_shape) == (48, 13, 0, (6, 6, 1))
    assert ds.in_memory is None
    # Evaluation batches are full and padded: 13 real examples in two batches of 8.
    weights = np.concatenate([b[2].numpy() for b in ds.test])
    np.testing.assert_array_equal(weights, [1.0] * 13 + [0.0] * 3)
    stream = [y.numpy() for _, y in ds.train.take(10)]
    resumed = [y.numpy() for _, y in ds.train_from(56).take(3)]  # 7 batches in.
    for a, b in zip(stream[7:], resumed):
        np.testing.assert_array_equal(a, b)
    assert "note: resuming the training pipeline by reading and skipping 7 batches" in \
        capsys.readouterr().out


def test_from_datasets_refuses_what_it_cannot_resume_or_run():
    x, y = _images(16), np.zeros(16, np.int32)
    unseeded = lambda: tf.data.Dataset.from_tensor_slices((x, y)).shuffle(16).repeat() \
        .batch(4, drop_remainder=True)  # noqa: E731
    with pytest.raises(UserError, match=r"two builds of train start with different batches "
                                        r"\(an unseeded shuffle\?\)"):
        data.from_datasets(train=unseeded, test=_test_set(), steps_per_epoch=4)
    # A Dataset object cannot be rebuilt: training from step 0 is fine, a resume is refused.
    ds = data.from_datasets(train=_pipeline(), test=_test_set(), steps_per_epoch=6)
    assert ds.train_from(0) is ds.train
    with pytest.raises(UserError, match=r"^cannot resume at example 16: from_datasets got a "
                                        r"tf.data.Dataset"):
        ds.train_from(16)
    finite = tf.data.Dataset.from_tensor_slices((x, y)).batch(4, drop_remainder=True)
    with pytest.raises(UserError, match=r"train holds 4 batches; it must repeat forever"):
        data.from_datasets(train=finite, test=_test_set(), steps_per_epoch=4)
    ragged = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(4)
    with pytest.raises(UserError, match="need a static batch dimension"):
        data.from_datasets(train=ragged, test=_test_set(), steps_per_epoch=4)


def test_from_datasets_resumes_from_the_saved_iterator_without_skipping(tmp_path, capsys):
    # A tf.data.Dataset object (which cannot be rebuilt) resumes exactly where its iterator's
    # state was saved with the checkpoint: no read-and-skip, no refusal.
    from trainer import Trainer
    from trainer.config import TrainConfig
    from trainer.outputs.checkpoint import Checkpointer

    class Piped(Trainer):
        def build_datasets(self):
            return data.from_datasets(train=_pipeline(), test=_test_set(), steps_per_epoch=6,
                                      num_classes=3)

    config = TrainConfig(model="mlp", model_args={"units": 8}, batch_size=8, epochs=2,
                         validation_split=0, policy="float32", device="cpu", verbose=False)
    straight = Piped(config)
    saver = Checkpointer(straight, model_dir=str(tmp_path))
    straight.train_steps(4)
    saver.save()
    assert os.path.exists(tmp_path / "input" / "worker-0" / "input-4.index")
    straight.train_steps(5)  # Across the epoch boundary of the 48-example stream.
    resumed = Piped(config)
    assert Checkpointer(resumed, model_dir=str(tmp_path)).restore_or_initialize()
    resumed.train_steps(5)
    for a, b in zip(straight.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert "reading and skipping" not in capsys.readouterr().out
