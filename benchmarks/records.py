"""Streaming record files: our pipeline against a hand-written one, input wait, peak memory.

    .venv/bin/python benchmarks/records.py [--rounds=5] [--json=PATH]        # (a) and (b)
    .venv/bin/python benchmarks/records.py --memory [--json=PATH]            # (c), ~2 GB on disk

(a) **Pipeline throughput**: examples/s of ``--dataset=tfrecord:``'s training stream
    (``trainer.data.from_tfrecord``: 80x80 JPEG shards, decoded, resized, randomly cropped to
    64x64, flipped, batched by 128, prefetched) against a plain ``tf.data`` pipeline written by
    hand over the same files with the same work (interleave of ``TFRecordDataset``s, shuffle,
    parse + decode + resize + crop + flip in ``map(AUTOTUNE)``, batch, prefetch), each timed
    over the same number of batches, alternately in ``rounds`` rounds; best of each.
(b) **Training on it**: ``run.py --model=cnn --image_size=64`` for one epoch of those shards
    at ``--parallel_calls=2 x cores``; the share of step time spent waiting for input (the
    epoch line's ``input wait``).
(c) **Peak memory**: peak RSS (the child's ``VmHWM``) of one epoch of ``run.py
    --model=mlp --image_size=32`` over 2 GB of 128x128 JPEG shards and over 50 MB of them
    (both more records than the 1024 of the shuffle window, whose memory grows with the
    record size, not with the set).

Results go in BENCHMARKS.md ("Streaming record files").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_noise_shards(folder: str, *, megabytes: float = 0, count: int = 0, size: int,
                       shards: int, prefix: str = "train", seed: int = 0) -> tuple:
    """JPEG images of ``size`` x ``size`` x 3 (10 classes: a class colour under noise), one
    shard at a time (``PREFIX000-00000-of-00001``, ...), ``count`` of them over ``shards``
    files or, with ``megabytes``, shards of ``count`` images until that much is written.
    Only one shard's images are in memory at a time. Returns (bytes written, images)."""
    import numpy as np

    from trainer import data
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (10, 1, 1, 3))
    per_shard = -(-count // shards)
    written, images, k = 0, 0, 0
    while (written < megabytes * 1e6) if megabytes else (images < count):
        n = per_shard if megabytes else min(per_shard, count - images)
        labels = rng.integers(0, 10, n)
        noise = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        pixels = (0.4 * colours[labels] + 0.6 * noise).astype(np.uint8)  # float64 briefly.
        paths = data.write_arrays(pixels, labels, os.path.join(folder, f"{prefix}{k:03d}"),
                                  num_shards=1, image_format="jpeg")
        written += sum(os.path.getsize(p) for p in paths)
        images, k = images + n, k + 1
    return written, images


def _hand_written(pattern: str, batch: int, size: int, seed: int):
    """The plain tf.data pipeline a user would write for the same files and work."""
    from trainer.compat import tf
    files = tf.data.Dataset.list_files(pattern, shuffle=True, seed=seed)
    feature = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
               "image/class/label": tf.io.FixedLenFeature([], tf.int64)}
    scaled = round(size * 8 / 7)

    def parse(record):
        parsed = tf.io.parse_single_example(record, feature)
        image = tf.io.decode_jpeg(parsed["image/encoded"], channels=3)
        image = tf.image.resize(image, [scaled, scaled], antialias=True)
        image = tf.image.random_crop(image, [size, size, 3])
        image = tf.image.random_flip_left_right(image) / 255.0
        return image, tf.cast(parsed["image/class/label"], tf.int32)

    return (files.interleave(tf.data.TFRecordDataset, cycle_length=4,
                             num_parallel_calls=tf.data.AUTOTUNE)
            .shuffle(1024, seed=seed).repeat()
            .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def _examples_per_sec(dataset, batches: int, batch: int) -> float:
    iterator = iter(dataset)
    for _ in range(3):  # Warm: threads started, autotuning under way.
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


def pipeline(folder: str, rounds: int, batches: int) -> dict:
    from trainer import data
    batch, size = 128, 64
    pattern = os.path.join(folder, "train*")
    runners = {
        "ours": lambda: data.from_tfrecord(pattern, batch_size=batch, image_size=size,
                                           eval_data=pattern, deterministic=False).train,
        "hand-written": lambda: _hand_written(pattern, batch, size, seed=1),
    }
    samples = {name: [] for name in runners}
    for r in range(rounds):
        names = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in names:  # A fresh pipeline each time: no warm cache from the other.
            samples[name].append(_examples_per_sec(runners[name](), batches, batch))
    best = {name: max(values) for name, values in samples.items()}
    return {"examples_per_sec": best, "samples": samples,
            "ratio": best["ours"] / best["hand-written"]}


def _high_water_mb(pid: int) -> float:
    """``VmHWM`` of process ``pid`` (its peak RSS since exec), in MB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _run(args, cwd=ROOT) -> tuple:
    """(exit code, stdout, peak RSS in MB) of ``python run.py args`` in a fresh process.

    The peak is the child's own ``VmHWM``, polled while it runs (it only grows). Not
    ``ru_maxrss`` from ``wait4``: Linux starts a forked child's maximum at its parent's RSS
    at the fork, so a child of a big parent (pytest with TensorFlow loaded) reports the parent.
    """
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    peak = [0.0]

    def poll():
        while process.poll() is None:
            peak[0] = max(peak[0], _high_water_mb(process.pid))
            time.sleep(0.05)
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out = process.stdout.read()
    process.wait()
    watcher.join()
    return process.returncode, out, peak[0]


def training(folder: str, metrics: str) -> dict:
    calls = 2 * os.cpu_count()
    code, out, _ = _run([f"--dataset=tfrecord:{folder}/train*", "--model=cnn",
                         "--image_size=64", "--epochs=1", "--batch_size=128",
                         "--validation_split=0", f"--parallel_calls={calls}",
                         f"--eval_data={folder}/train000-*", "--progress=log",
                         f"--metrics_file={metrics}"])
    if code:
        raise SystemExit(out[-3000:])
    with open(metrics) as f:
        result = json.load(f)
    return {"parallel_calls": calls, "input_wait": result["history"][-1]["input_wait"],
            "ms_per_step": result["step_time_ms"], "policy": result["policy"],
            "epoch_line": [line for line in out.splitlines() if line.startswith("epoch ")][-1]}


def peak_rss(folder: str, megabytes: float, *, size: int = 128, per_shard: int = 2048) -> dict:
    """Writes ``megabytes`` of ``size``-square JPEG shards; peak RSS of one epoch over them."""
    written, count = write_noise_shards(folder, megabytes=megabytes, count=per_shard, shards=1,
                                        size=size)
    code, out, rss = _run([f"--dataset=tfrecord:{folder}/train*", "--model=mlp",
                           "--image_size=32", "--epochs=1", "--batch_size=64",
                           "--validation_split=0", f"--eval_data={folder}/train000-*",
                           "--progress=none"])
    if code:
        raise SystemExit(out[-3000:])
    return {"data_mb": written / 1e6, "images": count, "peak_rss_mb": rss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--memory", action="store_true", help="(c): 2 GB vs 50 MB peak RSS")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.memory:
            for name, mb in (("50MB", 50), ("2GB", 2000)):
                os.makedirs(os.path.join(tmp, name))
                results[name] = peak_rss(os.path.join(tmp, name), mb)
                print(name, results[name], flush=True)
            results["growth_mb"] = results["2GB"]["peak_rss_mb"] - results["50MB"]["peak_rss_mb"]
        else:
            print("writing shards ...", flush=True)
            write_noise_shards(tmp, count=6144, size=80, shards=16)
            results["pipeline"] = pipeline(tmp, args.rounds, args.batches)
            print("pipeline", {k: v for k, v in results["pipeline"].items() if k != "samples"},
                  flush=True)
            results["training"] = training(tmp, os.path.join(tmp, "metrics.json"))
            print("training", results["training"], flush=True)
    results["cpu_count"] = os.cpu_count()
    results["max_rss_self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
