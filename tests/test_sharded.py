"""Record files streamed as a dataset (trainer/data/sharded.py): training from shards, exact
resume from each worker's saved iterator state (SIGKILL, 1 and 2 workers, bytes read
measured), input wait, file sharding across workers and the bad-input lines."""

from __future__ import annotations

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
from trainer.errors import UserError

ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
BASE = ["--model=mlp", "--model_args=units=16", "--batch_size=64", "--validation_split=0",
        "--policy=float32", "--device=cpu", "--deterministic", "--steps_per_loop=1",
        "--checkpoint_every=10", "--progress=none"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Synthetic data as 2 training shards (2048 records each) and 1 test shard, PNG."""
    folder = tmp_path_factory.mktemp("shards")
    arrays = data.load_arrays("synthetic", synthetic_examples=4096, seed=3)
    data.write_arrays(arrays.x_train, arrays.y_train, str(folder / "train"), num_shards=2)
    data.write_arrays(arrays.x_test, arrays.y_test, str(folder / "test"), num_shards=1)
    return folder


def _train(shards, model_dir, *extra, env=None):
    return run_cli(f"--dataset=tfrecord:{shards}/train-*", *BASE, f"--model_dir={model_dir}",
                   f"--metrics_file={model_dir}.json", *extra, env=env,
                   timeout=300)


def _metrics(model_dir):
    with open(f"{model_dir}.json") as f:
        return json.load(f)


def _shard_bytes(shards) -> int:
    return os.path.getsize(next(iter(sorted(shards.glob("train-*")))))


def test_sigkill_mid_epoch_resumes_bit_identically_reading_no_record_twice(shards, tmp_path):
    straight = _train(shards, tmp_path / "straight", "--epochs=3")
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = _metrics(tmp_path / "straight")
    assert reference["global_step"] == 3 * 4096 // 64
    shard = _shard_bytes(shards)

    read = {}
    for kill_at in (25, 155):  # Step 20 (epoch 1) and step 150 (epoch 3): mid-epoch.
        run = tmp_path / f"killed{kill_at}"
        killed = _train(shards, run, "--epochs=3",
                        env={"TRAINER_FAULT_AT": f"w0:train steps:{kill_at}"})
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert sorted(os.listdir(run / "input" / "worker-0"))  # Each checkpoint's input state.
        if kill_at == 155:
            shutil.copytree(run, tmp_path / "replayed")  # The same kill, resumed without it.
        resumed = _train(shards, run, "--epochs=3")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"at step {kill_at - 5}" in resumed.stdout
        assert "reading and skipping" not in resumed.stdout
        after = _metrics(run)
        assert after["global_step"] == reference["global_step"]
        assert after["weights_checksum"] == reference["weights_checksum"]  # Bit-identical.
        assert after["test_loss"] == reference["test_loss"]
        read[kill_at] = after["first_loop_read_bytes"]
        assert 0 < after["input_state_bytes"] < 16 * shard  # Stated per worker in the docs.
    # Continuing reads less than one shard, and no more at step 150 than at step 20.
    assert max(read.values()) < shard, (read, shard)
    assert abs(read[155] - read[25]) < shard / 4, read

    # Without the saved state (input/ lost) the position is replayed by reading the epoch's
    # records so far: still exact, and it reads what the saved state spares.
    shutil.rmtree(tmp_path / "replayed" / "input")
    replayed = _train(shards, tmp_path / "replayed", "--epochs=3")
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert "reading and skipping 1408 records" in replayed.stdout  # 22 steps x 64.
    after = _metrics(tmp_path / "replayed")
    assert after["weights_checksum"] == reference["weights_checksum"]
    assert after["first_loop_read_bytes"] > read[155] + 1408 * 500


def _launch(shards, model_dir, *extra, env=None):
    return subprocess.run(
        [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--grace_s=5", "--",
         "run.py", f"--dataset=tfrecord:{shards}/train-*", *BASE, f"--model_dir={model_dir}",
         f"--metrics_file={model_dir}.json", "--distribution=multi_worker", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, **ENV, **(env or {})))


def _worker_checksums(stdout):
    return {line.split("]")[0]: line.split("weights_checksum ")[-1].split()[0]
            for line in stdout.splitlines() if "weights_checksum" in line}


def test_two_workers_read_their_own_files_and_resume_exactly_after_sigkill(shards, tmp_path):
    straight = _launch(shards, tmp_path / "straight", "--epochs=2")
    assert straight.returncode == 0, straight.stdout[-3000:]
    reference = _metrics(tmp_path / "straight")
    # Each worker reads one of the 2 files (2048 records, 32 per step): 64 steps per epoch.
    assert reference["global_step"] == 2 * 64
    checksums = _worker_checksums(straight.stdout)
    assert len(checksums) == 2 and len(set(checksums.values())) == 1, straight.stdout[-2000:]

    run = tmp_path / "killed"
    killed = _launch(shards, run, "--epochs=2", env={"TRAINER_FAULT_AT": "w1:train steps:85"})
    assert killed.returncode != 0
    assert sorted(os.listdir(run / "input")) == ["worker-0", "worker-1"]  # Each its own.
    resumed = _launch(shards, run, "--epochs=2")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "at step 80" in resumed.stdout and "reading and skipping" not in resumed.stdout
    after = _metrics(run)
    assert after["weights_checksum"] == reference["weights_checksum"]  # Bit-identical.
    assert set(_worker_checksums(resumed.stdout).values()) == set(checksums.values())
    assert after["first_loop_read_bytes"] < _shard_bytes(shards)


def test_fewer_files_than_workers_is_one_line(shards):
    context = tf.distribute.InputContext(3, 0, 3)
    with pytest.raises(UserError, match=r"^2 training files for 3 workers: each worker reads its "
                       r"own files; write at least as many shards as workers"):
        data.from_tfrecord(f"{shards}/train-*", batch_size=63, input_context=context)


def test_workers_run_equal_steps_from_unequal_files(tmp_path):
    # 3 files of 100, 100 and 60 records for 2 workers: worker 0 holds 160, worker 1 100;
    # both run the steps of the smaller share (lockstep), 100 // 25 = 4.
    images = np.zeros((260, 8, 8, 1), np.uint8)
    labels = np.arange(260) % 2
    data.write_arrays(images[:100], labels[:100], str(tmp_path / "a"), num_shards=1)
    data.write_arrays(images[100:200], labels[100:200], str(tmp_path / "b"), num_shards=1)
    data.write_arrays(images[200:], labels[200:], str(tmp_path / "c"), num_shards=1)
    steps = set()
    for worker in (0, 1):
        datasets = data.from_tfrecord(
            f"{tmp_path}/*-of-*", eval_data=f"{tmp_path}/c-*", batch_size=50, augment=False,
            input_context=tf.distribute.InputContext(2, worker, 2))
        batches = list(datasets.train.take(datasets.steps_per_epoch + 1))
        assert all(b[0].shape == (25, 8, 8, 1) for b in batches)  # The worker's share.
        steps.add(datasets.steps_per_epoch)
    assert steps == {4}


def test_every_epoch_reads_each_record_of_the_share_once_in_a_new_order(shards):
    datasets = data.from_tfrecord(f"{shards}/train-*", batch_size=512, augment=False, seed=5)
    arrays = data.load_arrays("synthetic", synthetic_examples=4096, seed=3)
    epochs = [next(iter(datasets.train_from(e * 4096).batch(8))) for e in (0, 1)]
    first = [np.concatenate(list(e[0].numpy())) for e in epochs]
    assert not np.array_equal(first[0], first[1])  # Another order each epoch.
    seen = np.concatenate([b[0].numpy() for b in datasets.train.take(8)])  # Epoch 0 whole.
    expected = arrays.x_train.astype(np.float32) / 255
    # Every record once: the sorted per-image sums of both sets agree.
    np.testing.assert_allclose(np.sort(seen.reshape(4096, -1).sum(1)),
                               np.sort(expected.reshape(4096, -1).sum(1)), rtol=1e-5)


def test_input_wait_is_reported_per_epoch_and_in_the_metrics_file(shards, tmp_path):
    result = run_cli(f"--dataset=tfrecord:{shards}/train-*", "--model=mlp",
                     "--model_args=units=16", "--batch_size=64", "--validation_split=0",
                     "--epochs=2", "--device=cpu", "--progress=log", "--parallel_calls=1",
                     f"--metrics_file={tmp_path}/m.json", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and all(" - input wait " in line for line in lines), lines
    history = json.loads((tmp_path / "m.json").read_text())["history"]
    waits = [row["input_wait"] for row in history]
    assert all(0 <= w <= 1 for w in waits)
    # A 16-unit MLP is far faster than decoding PNGs in one call: input-bound, said once.
    assert waits[-1] > 0.2, waits
    warnings = [line for line in user_stderr_lines(result.stderr) if "input-bound" in line]
    assert len(warnings) == 1 and "--parallel_calls" in warnings[0]


def test_peak_memory_does_not_grow_with_the_data(tmp_path):
    # The property of BENCHMARKS.md's 2 GB vs 50 MB measurement, smaller: one epoch over
    # 120 MB of 64x64 JPEG shards peaks within 40 MB of one over 12 MB (a set held whole
    # would add its decoded size, several times the 108 MB of files). Both sets are larger
    # than the shuffle window (1024 records), which is the memory that does grow, with the
    # record size.
    from benchmarks.records import peak_rss
    small = peak_rss(str(tmp_path / "small"), 12, size=64, per_shard=1536)
    large = peak_rss(str(tmp_path / "large"), 120, size=64, per_shard=1536)
    assert large["data_mb"] > 8 * small["data_mb"]
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 40, (small, large)
