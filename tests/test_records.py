"""TFRecord files (trainer/data/records.py) and the shard writer (trainer/data/writer.py,
``python -m trainer.data.write_shards``): record counts from headers, shards written by
TensorFlow's own writer, an image folder, the accuracy of shards against the same arrays, and
one line for each kind of bad file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli, user_stderr_lines
from trainer import data
from trainer.compat import tf
from trainer.data import records
from trainer.errors import UserError

SMALL = ["--model=mlp", "--model_args=units=16", "--batch_size=32", "--validation_split=0",
         "--policy=float32", "--device=cpu", "--epochs=1", "--progress=none"]


def _example(image: bytes, label: int, key: str = "image/encoded") -> bytes:
    feature = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        key: feature(bytes_list=tf.train.BytesList(value=[image])),
        "image/class/label": feature(int64_list=tf.train.Int64List(value=[label])),
    })).SerializeToString()


def _write_with_tf(path, count: int, *, bad_at: int = -1, bad=None, labels=None):
    """A shard written by tf.io.TFRecordWriter (not by our writer): 8x8 grey PNGs."""
    rng = np.random.default_rng(count)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(count):
            label = int(labels[i]) if labels is not None else i % 4
            image = np.full((8, 8, 1), 60 * label, np.uint8) + rng.integers(0, 20, (8, 8, 1),
                                                                          dtype=np.uint8)
            record = _example(tf.io.encode_png(image).numpy(), label)
            writer.write(bad(record, label) if i == bad_at else record)


def test_scan_counts_records_from_headers_of_tensorflows_own_files(tmp_path):
    _write_with_tf(tmp_path / "a", 37)
    shard = records.scan(str(tmp_path / "a"))
    assert (shard.records, shard.size) == (37, os.path.getsize(tmp_path / "a"))
    assert int(tf.data.TFRecordDataset(str(tmp_path / "a")).reduce(0, lambda n, _: n + 1)) == 37
    assert records.crc32c(b"123456789") == 0xE3069283  # CRC-32C's check value.


def test_shards_from_tensorflows_writer_train(tmp_path):
    for i in range(2):
        _write_with_tf(tmp_path / f"train-{i}", 96)
    _write_with_tf(tmp_path / "test-0", 64)
    result = run_cli(f"--dataset=tfrecord:{tmp_path}/train-*", *SMALL, "--num_classes=4",
                     "--augment=false", "--epochs=10", "--learning_rate=0.02",
                     "--model_args=units=64", f"--metrics_file={tmp_path}/m.json")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["global_step"] == 10 * 192 // 32
    # Four brightness levels. After 24 steps a run gave 0.5 now and then (threads make runs
    # differ); after 60 steps, 11 of 12 runs (seeds 0-5, float32 and mixed_bfloat16) gave 1.0
    # and one 0.75.
    assert metrics["test_accuracy"] > 0.6
    assert f"from {tmp_path}: 192 train / 0 validation / 64 test" in result.stdout


def _epoch(dataset, steps):
    """One epoch of batches as (images, labels), sorted by the bytes of each example."""
    x, y = zip(*((np.asarray(b[0]), np.asarray(b[1])) for b in dataset.take(steps)))
    x, y = np.concatenate(x), np.concatenate(y)
    order = sorted(range(len(x)), key=lambda i: x[i].tobytes() + y[i].tobytes())
    return x[order], y[order]


def test_shards_hold_the_same_examples_as_the_arrays_and_train_as_well(tmp_path):
    # Fashion-MNIST (8000 train / 2000 test of the real set) as PNG shards. One epoch of the
    # record pipeline is exactly the epoch from_arrays gives for the same arrays (pixels,
    # scaling, shape, dtype, labels), in another order.
    arrays = data.load_arrays("fashion_mnist")
    x_train, y_train = arrays.x_train[:8000], arrays.y_train[:8000]
    x_test, y_test = arrays.x_test[:2000], arrays.y_test[:2000]
    data.write_arrays(x_train, y_train, str(tmp_path / "train"), num_shards=4)
    data.write_arrays(x_test, y_test, str(tmp_path / "test"), num_shards=1)
    shards = data.from_tfrecord(f"{tmp_path}/train-*", batch_size=64, augment=False)
    memory = data.from_arrays(x_train, y_train, x_test, y_test, batch_size=64, num_classes=10)
    assert (shards.steps_per_epoch, shards.num_classes, shards.input_shape) == (
        memory.steps_per_epoch, memory.num_classes, memory.input_shape) == (125, 10, (28, 28, 1))
    x_shards, y_shards = _epoch(shards.train, 125)
    x_memory, y_memory = _epoch(memory.train, 125)
    assert x_shards.dtype == x_memory.dtype == np.float32 and y_shards.dtype == y_memory.dtype
    np.testing.assert_array_equal(x_shards, x_memory)
    np.testing.assert_array_equal(y_shards, y_memory)
    # The same model trained 2 epochs from each reaches the same accuracy within noise. Only
    # the order differs (window permutation vs a full shuffle), and the order alone moves the
    # accuracy: over 6 seeds on a 2-core EPYC, 0.80-0.85 from each, the two 0.003-0.034 apart
    # (a 0.04 gap failed CI once). The band is 0.08.
    np.savez(tmp_path / "arrays.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test)
    flags = ["--model=mlp", "--batch_size=64", "--validation_split=0", "--policy=float32",
             "--device=cpu", "--epochs=2", "--progress=none"]
    result = run_cli(f"--dataset=tfrecord:{tmp_path}/train-*", *flags, "--augment=false",
                     f"--metrics_file={tmp_path}/m.json")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    script = (
        "import sys, numpy as np, trainer\n"
        "from trainer.config import TrainConfig\n"
        "f = np.load(sys.argv[1])\n"
        "class T(trainer.Trainer):\n"
        "    def build_datasets(self):\n"
        "        return trainer.data.from_arrays(f['x_train'], f['y_train'], f['x_test'],\n"
        "            f['y_test'], batch_size=64, num_classes=10, seed=self.config.seed)\n"
        "s = trainer.run(TrainConfig(model='mlp', batch_size=64, validation_split=0,\n"
        "    policy='float32', device='cpu', epochs=2, verbose=False), trainer_cls=T)\n"
        "print(s['test_accuracy'])\n")
    in_memory = subprocess.run([sys.executable, "-c", script, str(tmp_path / "arrays.npz")],
                               cwd=ROOT, capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert in_memory.returncode == 0, in_memory.stderr[-2000:]
    from_arrays, from_shards = float(in_memory.stdout.split()[-1]), metrics["test_accuracy"]
    assert metrics["global_step"] == 250
    assert min(from_shards, from_arrays) > 0.77 and abs(from_shards - from_arrays) < 0.08, (
        from_shards, from_arrays)


def test_an_image_folder_becomes_shards_that_train(tmp_path):
    # FOLDER/CLASS/*.jpg and *.png, as photos are kept (the README's quick path runs in
    # tests/test_docs.py).
    rng = np.random.default_rng(0)
    for label, name in enumerate(["cat", "dog", "fox"]):
        os.makedirs(tmp_path / "photos" / name)
        for i in range(24):
            image = np.clip(rng.normal(80 * label + 20, 10, (20, 24, 3)), 0, 255).astype(np.uint8)
            encode, suffix = (tf.io.encode_jpeg, "jpg") if i % 2 else (tf.io.encode_png, "png")
            (tmp_path / "photos" / name / f"{i}.{suffix}").write_bytes(encode(image).numpy())
    command = [sys.executable, "-m", "trainer.data.write_shards", f"--images={tmp_path}/photos",
               f"--out={tmp_path}/shards", "--shards=2", "--validation=0.25"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    write = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert write.returncode == 0, write.stderr[-2000:]
    assert "wrote 3 files" in write.stdout
    shards = tmp_path / "shards"
    assert (shards / "labels.txt").read_text() == "cat\ndog\nfox\n"
    count = {split: sum(records.scan(str(p)).records for p in shards.glob(f"{split}-*"))
             for split in ("train", "validation")}
    assert count == {"train": 54, "validation": 18}
    # Never overwrites: the same command again is one line, the shards unchanged.
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 1
    assert user_stderr_lines(again.stderr) == [
        f"error: {shards}/train-00000-of-00002 exists already; choose another --out or delete it"]
    # The validation files are found by their name; 20x24 images cropped to 16x16.
    result = run_cli(f"--dataset=tfrecord:{shards}/train-*", *SMALL, "--image_size=16",
                     "--batch_size=8", "--validation_split=0.1", "--model=cnn",
                     "--model_args=width=4", f"--metrics_file={tmp_path}/m.json")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["global_step"] == 54 // 8
    assert "54 train / 18 validation / 18 test" not in result.stdout  # Steps drop a remainder:
    assert "48 train / 18 validation / 18 test" in result.stdout  # 6 full batches of 8.
    assert "val_accuracy" in metrics["history"][-1] or "val_loss" in metrics["history"][-1]


# ------------------------------------------------------------------ bad input: one line each


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good_once(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    folder = root / "data"
    folder.mkdir()
    for i in range(2):
        _write_with_tf(folder / f"train-{i}", 64)
    _write_with_tf(folder / "test-0", 32)
    (folder / "labels.txt").write_text("a\nb\nc\nd\n")
    first = run_cli(f"--dataset=tfrecord:{folder}/train-*", *SMALL, "--augment=false",
                    f"--model_dir={root}/run")
    assert first.returncode == 0, first.stderr[-2000:]
    return root


@pytest.fixture
def good(good_once, tmp_path):
    """Two good training shards, a test shard and a model_dir with a finished epoch (a copy
    per test: each spoils its own)."""
    shutil.copytree(good_once, tmp_path, dirs_exist_ok=True)
    return tmp_path / "data"


def _fails_with(good, expected: str, *, same_run: bool = True):
    """Trains on ``good`` (after the test spoiled it): one error line, model_dir unchanged.

    A file whose size changed is found before the model_dir's own check; one whose content
    changed is another dataset to that check (its record counts and sizes), so it trains into
    a new folder, saving each step, and the checkpoints before the bad batch must survive.
    """
    run = good.parent / ("run" if same_run else "new")
    before = _hashes(run) if same_run else {}
    result = run_cli(f"--dataset=tfrecord:{good}/train-*", *SMALL, "--augment=false",
                     "--epochs=2", f"--model_dir={run}", "--checkpoint_every=1",
                     "--steps_per_loop=1")
    lines = user_stderr_lines(result.stderr)
    assert result.returncode == 1, result.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert expected in lines[-1], lines[-1]
    if same_run:
        assert _hashes(run) == before  # Nothing already written is lost or changed.
    else:
        saved = tf.train.latest_checkpoint(str(run / "checkpoints"))
        step = int(saved.rsplit("-", 1)[1]) if saved else 0
        assert (run / "run.json").exists() and step == len(list((run / "input" / "worker-0")
                                                                 .glob("input-*.index")))
    return lines[-1]


def test_empty_glob(tmp_path):
    good = tmp_path
    result = run_cli(f"--dataset=tfrecord:{good}/nothing-*", *SMALL)
    assert result.returncode == 1
    assert user_stderr_lines(result.stderr) == [
        f"error: --dataset: no file matches '{good}/nothing-*'; check the path (quote the glob "
        "so the shell does not expand it), or write shards with python -m "
        "trainer.data.write_shards"]


def test_a_shard_that_is_not_tfrecord_is_found_before_step_one(good):
    (good / "train-2").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    line = _fails_with(good, f"{good}/train-2 is not a TFRecord file (its first record's "
                             "header checksum is wrong)")
    assert line.startswith("error: ")


def test_a_truncated_last_record_is_found_before_step_one(good):
    path = good / "train-1"
    path.write_bytes(path.read_bytes()[:-30])
    _fails_with(good, f"{path}: record 63 is truncated (it needs")


def _rewrite(good, bad, at: int = 5):
    _write_with_tf(good / "train-1", 64, bad_at=at, bad=bad)


def test_a_record_without_the_image_key_names_file_and_record(good):
    _rewrite(good, lambda record, label: _example(b"", label, key="image/png"))
    _fails_with(good, f"{good}/train-1: record 5: Feature: image/encoded (data type: string) is "
                      "required but could not be found", same_run=False)


def test_an_undecodable_image_names_file_and_record(good):
    _rewrite(good, lambda record, label: _example(b"not an image at all", label), at=9)
    _fails_with(good, f"{good}/train-1: record 9: ", same_run=False)


def test_a_label_outside_the_class_count_names_file_and_record(good):
    png = tf.io.encode_png(np.zeros((8, 8, 1), np.uint8)).numpy()
    _rewrite(good, lambda record, label: _example(png, 7), at=12)
    line = _fails_with(good, f"{good}/train-1: record 12: label 7 outside [0, 4)",
                       same_run=False)
    assert "--num_classes=4" in line


def test_an_unreadable_first_image_is_found_before_step_one(good):
    _write_with_tf(good / "train-0", 64, bad_at=0,
                   bad=lambda record, label: _example(b"garbage", label))
    _fails_with(good, f"{good}/train-0: record 0: its image cannot be decoded")


def test_api_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="exists already"):
        _write_with_tf(tmp_path / "x-00000-of-00001", 2)
        data.write_arrays(np.zeros((2, 4, 4), np.uint8), np.zeros(2), str(tmp_path / "x"),
                          num_shards=1)
    with pytest.raises(UserError, match="needs uint8 images"):
        data.write_arrays(np.zeros((2, 4, 4), np.float32), np.zeros(2), str(tmp_path / "y"),
                          num_shards=1)
    with pytest.raises(UserError, match="no class folders"):
        data.write_image_folder(str(tmp_path), str(tmp_path / "z"), num_shards=1)
