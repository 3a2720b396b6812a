"""Benchmarks, in one run on one machine, reported as ratios (see BENCHMARKS.md).

    .venv/bin/python benchmarks/run.py [--quick] [--models=mlp,cnn] [--json=PATH]

(a) this framework's loop (Trainer.train_steps, ``steps_per_loop`` steps per compiled call) vs
    Keras ``Model.fit`` (same model, policy, optimizer, loss scaling, batch size and tf.data
    pipeline, ``steps_per_execution == steps_per_loop``), under float32 and mixed_bfloat16,
    both as Keras sets it up by default and with the optimizer update XLA-fused as ours is;
(b) mixed_bfloat16 / float32 speedup of each model, for both;
(c) model FLOP/s vs the dense-matmul peak this script measures in each dtype (MFU);
plus an op-type profile of the bf16 step of the compute-bound configurations.

The machine is shared: every configuration's runners are timed round-robin, several short
rounds, in a different order each round, and the best time of each is used (other jobs only
ever slow a measurement down), so slow phases of the machine hit all runners alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import flops, profile_ops  # noqa: E402
from trainer import devices, optimizers, precision, registry  # noqa: E402
from trainer.compat import keras, mixed_precision, tf  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.trainer import Trainer  # noqa: E402

POLICIES = ("float32", "mixed_bfloat16")
EXPERIMENTS = ("ours+unfused_update", "ours+jit")  # Only on the compute-bound configurations.


@dataclasses.dataclass(frozen=True)
class Bench:
    """One benchmarked configuration."""

    name: str
    model: str
    model_args: dict
    batch_size: int
    steps_per_loop: int
    compute_bound: bool = False


BENCHES = (
    Bench("mlp (seed, units 256)", "mlp", {"units": 256}, 128, 100),
    Bench("mlp wide (units 2048)", "mlp", {"units": 2048}, 256, 10, compute_bound=True),
    Bench("cnn", "cnn", {}, 128, 10),
    Bench("resnet", "resnet", {}, 128, 10),
    Bench("transformer", "transformer", {}, 128, 10),
    Bench("transformer wide (dim 128, mlp x4)", "transformer",
          {"dim": 128, "heads": 4, "mlp_ratio": 4}, 128, 5, compute_bound=True),
)


def _config(bench: Bench, policy: str, **overrides) -> TrainConfig:
    return TrainConfig(model=bench.model, model_args=bench.model_args, policy=policy,
                       dataset="synthetic", synthetic_examples=8192, validation_split=0.0,
                       batch_size=bench.batch_size, steps_per_loop=bench.steps_per_loop,
                       optimizer="adam", verbose=False, **overrides)


class OursRunner:
    """Our Trainer: ``loops`` compiled calls of ``steps_per_loop`` steps each.

    ``variant``: 'ours' (defaults: the optimizer update XLA-fused, ``optimizers.fuse_updates``),
    'ours+jit' (``--jit_compile``: XLA forward/backward too) or 'ours+unfused_update' (the
    update as Keras 2 runs it on a CPU, to show what fusing it buys).
    """

    def __init__(self, bench: Bench, policy: str, variant: str = "ours"):
        self.bench, self.policy, self.kind = bench, policy, variant
        self.trainer = Trainer(_config(bench, policy, jit_compile=variant == "ours+jit"))
        if variant == "ours+unfused_update":  # Before the first call traces the step.
            self.trainer.loss_scaler.inner_optimizer.jit_compile = False
        self.model = self.trainer.model

    def seconds_per_step(self, loops: int) -> float:
        start = time.perf_counter()
        for _ in range(loops):
            self.trainer.train_steps(self.bench.steps_per_loop)
        int(self.trainer.global_step.numpy())  # Wait for the last step.
        return (time.perf_counter() - start) / (loops * self.bench.steps_per_loop)


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):  # Keras has synced the step's logs by now.
        self.seconds = time.perf_counter() - self.start


class FitRunner:
    """Keras ``Model.fit`` on the same model, policy, optimizer, loss scaling and pipeline.

    ``fused_update=False`` is what a Keras user gets (Keras 2 leaves the optimizer's
    ``jit_compile`` off without a GPU); ``True`` sets it on the inner optimizer before
    ``compile``, like for like with our default. Only the epoch itself is timed (``fit``'s own
    set-up before the epoch is excluded, which favours Keras slightly).
    """

    def __init__(self, bench: Bench, policy: str, data: tf.data.Dataset, *,
                 fused_update: bool = False):
        self.bench, self.policy, self.data = bench, policy, data
        self.kind = "fit+fused_update" if fused_update else "fit"
        config = _config(bench, policy)
        keras.utils.set_random_seed(config.seed)
        with precision.policy_scope(policy):
            self.model = registry.build_model(bench.model, input_shape=(28, 28, 1),
                                              num_classes=10, model_args=bench.model_args)
        optimizer = optimizers.build(config.optimizer, config.learning_rate)
        if fused_update:
            optimizer.jit_compile = True
        if config.resolved_loss_scale == "dynamic":  # What our Trainer does for mixed policies.
            optimizer = mixed_precision.LossScaleOptimizer(optimizer)
        self.model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(),
                           metrics=["accuracy"], steps_per_execution=bench.steps_per_loop)

    def seconds_per_step(self, loops: int) -> float:
        timer = _EpochTimer()
        steps = loops * self.bench.steps_per_loop
        self.model.fit(self.data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
        return timer.seconds / steps


def measure_bench(bench: Bench, *, rounds: int, target_s: float) -> Dict[str, dict]:
    """Times ours/fit/fit+fused x float32/bf16 round-robin; returns each runner's best s/step.

    Other jobs on a shared machine only ever slow a measurement down, so the best of several
    short interleaved measurements estimates each runner's own speed (the median is kept too).
    """
    runners = []
    for policy in POLICIES:
        ours = OursRunner(bench, policy)
        data = ours.trainer.datasets.train
        runners += [ours, FitRunner(bench, policy, data),
                    FitRunner(bench, policy, data, fused_update=True)]
    if bench.compute_bound:  # Performance experiments on the configurations that need them.
        runners += [OursRunner(bench, policy, variant) for variant in EXPERIMENTS
                    for policy in POLICIES]
    loops = {}
    for runner in list(runners):
        try:
            runner.seconds_per_step(1)  # Trace and warm up.
        except tf.errors.OpError as error:
            if runner.kind not in EXPERIMENTS:
                raise
            print(f"  {runner.kind}/{runner.policy} failed: {error.message[:200]}", flush=True)
            runners.remove(runner)
            continue
        per_step = runner.seconds_per_step(1)
        loops[runner] = max(1, round(target_s / (per_step * bench.steps_per_loop)))
    samples = {runner: [] for runner in runners}
    for r in range(rounds):
        order = runners[r % len(runners):] + runners[:r % len(runners)]
        for runner in order:
            samples[runner].append(runner.seconds_per_step(loops[runner]))
    step_flops = flops.train_flops_per_step(runners[0].model, bench.batch_size)
    results = {}
    for runner in runners:
        best = min(samples[runner])
        results[f"{runner.kind}/{runner.policy}"] = {
            "ms_per_step": 1000 * best, "examples_per_sec": bench.batch_size / best,
            "median_ms_per_step": 1000 * statistics.median(samples[runner]),
            "samples_ms": [1000 * s for s in samples[runner]], "flops_per_sec": step_flops / best,
            "train_flops_per_step": step_flops}
    if bench.compute_bound:
        for runner in runners:
            if runner.policy == "mixed_bfloat16" and runner.kind in ("ours", "ours+unfused_update"):
                results[f"profile/{runner.kind}/mixed_bfloat16"] = profile_ops.profile_ops(
                    lambda runner=runner: runner.seconds_per_step(1))
    return results


def measure_peaks(rounds: int) -> Dict[str, float]:
    """Best dense-matmul FLOP/s per dtype, float32 and bfloat16 measured alternately."""
    best = {"float32": 0.0, "bfloat16": 0.0}
    for _ in range(rounds):
        for dtype in best:
            best[dtype] = max(best[dtype], flops.matmul_peak(tf.as_dtype(dtype)))
    return best


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(results: Dict[str, dict], peaks: Dict[str, float]) -> str:
    """The three tables (and profiles) as Markdown."""
    a_rows, b_rows, c_rows, d_rows, profiles = [], [], [], [], []
    for name, r in results.items():
        for policy in POLICIES:
            ours, fit, fused = (r[f"{kind}/{policy}"]["examples_per_sec"]
                                for kind in ("ours", "fit", "fit+fused_update"))
            a_rows.append((name, policy, f"{ours:,.0f}", f"{fit:,.0f}", f"{fused:,.0f}",
                           f"**{ours / fit:.2f}**", f"**{ours / fused:.2f}**"))
        ms = {key: value["ms_per_step"] for key, value in r.items() if "ms_per_step" in value}
        speedup = {kind: ms[f"{kind}/float32"] / ms[f"{kind}/mixed_bfloat16"]
                   for kind in ("ours", "fit", "fit+fused_update")}
        b_rows.append((name, f"{r['ours/float32']['ms_per_step']:.2f}",
                       f"{r['ours/mixed_bfloat16']['ms_per_step']:.2f}",
                       f"**{speedup['ours']:.2f}x**", f"{speedup['fit']:.2f}x",
                       f"{speedup['fit+fused_update']:.2f}x"))
        for policy, dtype in (("float32", "float32"), ("mixed_bfloat16", "bfloat16")):
            achieved = r[f"ours/{policy}"]["flops_per_sec"]
            c_rows.append((name, policy, f"{r[f'ours/{policy}']['train_flops_per_step'] / 1e9:.2f}",
                           f"{achieved / 1e9:.1f}", f"{peaks[dtype] / 1e9:.1f}",
                           f"**{100 * achieved / peaks[dtype]:.1f}%**"))
        for variant in ("ours",) + EXPERIMENTS:
            if f"{variant}/float32" in r and f"{variant}/mixed_bfloat16" in r and any(
                    f"{e}/float32" in r for e in EXPERIMENTS):
                f32, bf16 = r[f"{variant}/float32"], r[f"{variant}/mixed_bfloat16"]
                d_rows.append((name, variant, f"{f32['ms_per_step']:.2f}",
                               f"{bf16['ms_per_step']:.2f}",
                               f"{f32['ms_per_step'] / bf16['ms_per_step']:.2f}x",
                               f"{ms['ours/mixed_bfloat16'] / bf16['ms_per_step']:.2f}x",
                               f"{100 * bf16['flops_per_sec'] / peaks['bfloat16']:.1f}%"))
        for variant in ("ours", "ours+unfused_update"):
            profile = r.get(f"profile/{variant}/mixed_bfloat16")
            if profile:
                shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in profile.items())
                profiles.append(f"- {name}, {variant}, mixed_bfloat16 step: {shares}")
    parts = [
        f"Matmul peak (2048x2048, best of alternating runs): float32 {peaks['float32'] / 1e9:.1f} "
        f"GFLOP/s, bfloat16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s "
        f"(bf16/f32 ceiling {peaks['bfloat16'] / peaks['float32']:.2f}x).",
        "", "(a) Framework loop vs Keras Model.fit (examples/s, ratio > 1: ours faster)", "",
        _table(("config", "policy", "ours", "Model.fit", "fit + fused update", "ours / fit",
                "ours / fit+fused"), a_rows),
        "", "(b) mixed_bfloat16 vs float32 (ms/step of our loop; Model.fit's for reference)", "",
        _table(("config", "float32 ms/step", "bf16 ms/step", "speedup (ours)", "speedup (fit)",
                "speedup (fit+fused)"), b_rows),
        "", "(c) Model-FLOP utilisation of our loop vs the measured matmul peak", "",
        _table(("config", "policy", "GFLOP/step", "achieved GFLOP/s", "peak GFLOP/s", "MFU"),
               c_rows),
        "", "(d) Experiments on the compute-bound configurations (our loop)", "",
        _table(("config", "variant", "float32 ms/step", "bf16 ms/step", "bf16 speedup",
                "bf16 vs default", "bf16 MFU"), d_rows),
        "", "Profile (share of summed op time by op type, our loop):", "", *profiles,
    ]
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 6.")
    parser.add_argument("--models", default="", help="Only these zoo models, e.g. mlp,transformer.")
    parser.add_argument("--json", default="", help="Also write the raw results here.")
    args = parser.parse_args(argv)
    rounds, target_s = (2, 0.3) if args.quick else (6, 0.35)
    device = devices.select_device("cpu", policy="float32")
    print(f"device: {device.description}; TF {tf.__version__}; "
          f"{os.cpu_count()} CPUs; rounds {rounds} x ~{target_s}s per runner", flush=True)
    wanted = {m.strip() for m in args.models.split(",") if m.strip()}
    benches = [b for b in BENCHES if not wanted or b.model in wanted]
    started = time.perf_counter()
    peaks = measure_peaks(rounds)
    results = {}
    for bench in benches:
        results[bench.name] = measure_bench(bench, rounds=rounds, target_s=target_s)
        keras.backend.clear_session()
        print(f"  {bench.name}: done ({time.perf_counter() - started:.0f}s)", flush=True)
    # A second peak measurement after the models: a busy machine shows as a lower first one.
    later = measure_peaks(rounds)
    peaks = {k: max(peaks[k], later[k]) for k in peaks}
    print(report(results, peaks))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.description, "peaks": peaks, "results": results}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
