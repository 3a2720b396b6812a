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
import os
import statistics
import sys
import time
from typing import Dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import flops, footprint, profile_ops  # noqa: E402
from benchmarks.suite import (BENCHES, EXPERIMENT_MODELS, EXPERIMENTS, INPUT_BASELINE,  # noqa: E402
                              LEVERS, POLICIES, Bench, OursRunner, train_config)
from trainer import compat, registry  # noqa: E402
from trainer.compat import keras, mixed_precision, tf  # noqa: E402
from trainer.core import optimizers, precision  # noqa: E402
from trainer.outputs import files  # noqa: E402
from trainer.runtime import devices  # noqa: E402


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):  # Keras has synced the step's logs by now.
        self.seconds = time.perf_counter() - self.start


class FitRunner:
    """Keras ``Model.fit`` on the same model, policy, optimizer, loss scaling and pipeline.

    ``fused_update=False`` is what a Keras user gets (Keras 2 leaves the optimizer's
    ``jit_compile`` off without a GPU, Keras 3 never compiles the update); ``True`` fuses it
    as our Trainer does (``compat.prepare_optimizer``) before ``compile``, like for like with
    our default. ``compile(jit_compile=False)`` under both (Keras 3 would default to XLA).
    Only the epoch itself is timed (``fit``'s own set-up before the epoch is excluded, which
    favours Keras slightly).
    """

    def __init__(self, bench: Bench, policy: str, data: tf.data.Dataset, *,
                 fused_update: bool = False):
        self.bench, self.policy, self.data = bench, policy, data
        self.kind = "fit+fused_update" if fused_update else "fit"
        config = train_config(bench, policy)
        keras.utils.set_random_seed(config.seed)
        with precision.policy_scope(policy):
            self.model = registry.build_model(bench.model, input_shape=(28, 28, 1),
                                              num_classes=10, model_args=bench.model_args)
        optimizer = optimizers.build(config.optimizer, config.learning_rate)
        if fused_update:
            compat.prepare_optimizer(optimizer, fuse=True)
        if config.resolved_loss_scale == "dynamic":  # What our Trainer does for mixed policies.
            optimizer = mixed_precision.LossScaleOptimizer(optimizer)
        self.model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(),
                           metrics=["accuracy"], steps_per_execution=bench.steps_per_loop,
                           jit_compile=False)  # Keras 3's default, "auto", would use XLA.

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
        runners += [ours, *(OursRunner(bench, policy, lever) for lever in LEVERS),
                    FitRunner(bench, policy, data),
                    FitRunner(bench, policy, data, fused_update=True)]
    if bench.experiments:  # Performance experiments on the configurations that need them.
        runners += [OursRunner(bench, policy, variant)
                    for variant, policies in EXPERIMENTS.items() for policy in policies
                    if bench.model in EXPERIMENT_MODELS.get(variant, (bench.model,))]
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
    profiled = ("ours", "ours+unfused_update", "ours+cast_once", "ours+fused_ops") \
        if bench.experiments else ("ours",)
    for runner in runners:
        if runner.policy == "mixed_bfloat16" and runner.kind in profiled:
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


def _eps(r: dict, key: str) -> float:
    return r[key]["examples_per_sec"]


def _speedup(r: dict, kind: str) -> float:
    return r[f"{kind}/float32"]["ms_per_step"] / r[f"{kind}/mixed_bfloat16"]["ms_per_step"]


def _mfu(r: dict, kind: str, policy: str, peaks: Dict[str, float]) -> float:
    dtype = "float32" if policy == "float32" else "bfloat16"
    return r[f"{kind}/{policy}"]["flops_per_sec"] / peaks[dtype]


def targets(results: Dict[str, dict], peaks: Dict[str, float]) -> list:
    """Issue 10's targets, each as (target, measured, met), from this run's numbers only."""
    ceiling = peaks["bfloat16"] / peaks["float32"]
    rows = []

    def check(text, value, goal, shown):
        rows.append((text, shown, "met" if value >= goal else "**missed**"))

    for name, r in results.items():
        strict = name.startswith("mlp (seed") or name.startswith("mlp wide")
        for policy in POLICIES:
            goal = 1.15 if strict and (name.startswith("mlp (seed") or policy != "float32") \
                else 1.0
            ratio = _eps(r, f"ours/{policy}") / _eps(r, f"fit+fused_update/{policy}")
            check(f"{name}, {policy}: ours / fit+fused >= {goal:.2f}", ratio, goal,
                  f"{ratio:.2f}")
    seed = results.get("mlp (seed, units 256)")
    if seed:
        check("seed MLP: bf16 / float32 >= 1.00x", _speedup(seed, "ours"), 1.0,
              f"{_speedup(seed, 'ours'):.2f}x")
    for name, share in (("mlp wide (units 2048)", 0.9), ("cnn", 0.85)):
        if name in results:
            value = _speedup(results[name], "ours")
            check(f"{name}: bf16 / float32 >= {share} x ceiling ({share * ceiling:.2f}x)",
                  value, share * ceiling, f"{value:.2f}x")
    for name, goal in (("transformer", 0.20), ("transformer wide (dim 128, mlp x4)", 0.35)):
        if name in results:
            value = _mfu(results[name], "ours", "mixed_bfloat16", peaks)
            check(f"{name}: bf16 MFU >= {100 * goal:.0f}%", value, goal, f"{100 * value:.1f}%")
    return rows


def report(results: Dict[str, dict], peaks: Dict[str, float]) -> str:
    """The tables (and profiles) as Markdown."""
    a_rows, lever_rows, b_rows, c_rows, d_rows, profiles = [], [], [], [], [], []
    for name, r in results.items():
        for policy in POLICIES:
            ours, fit, fused = (_eps(r, f"{kind}/{policy}")
                                for kind in ("ours", "fit", "fit+fused_update"))
            a_rows.append((name, policy, f"{ours:,.0f}", f"{fit:,.0f}", f"{fused:,.0f}",
                           f"**{ours / fit:.2f}**", f"**{ours / fused:.2f}**"))
            ms = [r[f"{kind}/{policy}"]["ms_per_step"] for kind in ("ours", *LEVERS)]
            lever_rows.append((name, policy, *(f"{m:.2f}" for m in ms),
                               *(f"**{m / ms[0]:.2f}x**" for m in ms[1:])))
        b_rows.append((name, f"{r['ours/float32']['ms_per_step']:.2f}",
                       f"{r['ours/mixed_bfloat16']['ms_per_step']:.2f}",
                       f"**{_speedup(r, 'ours'):.2f}x**", f"{_speedup(r, 'fit'):.2f}x",
                       f"{_speedup(r, 'fit+fused_update'):.2f}x"))
        for policy in POLICIES:
            dtype = "float32" if policy == "float32" else "bfloat16"
            ours = r[f"ours/{policy}"]
            c_rows.append((name, policy, f"{ours['train_flops_per_step'] / 1e9:.2f}",
                           f"{ours['flops_per_sec'] / 1e9:.1f}", f"{peaks[dtype] / 1e9:.1f}",
                           f"**{100 * _mfu(r, 'ours', policy, peaks):.1f}%**"))
        if any(key.split("/")[0] in EXPERIMENTS for key in r):
            default_bf16 = r["ours/mixed_bfloat16"]["ms_per_step"]
            for variant in ("ours", *LEVERS, *EXPERIMENTS):
                bf16 = r.get(f"{variant}/mixed_bfloat16")
                if bf16 is None:
                    continue
                f32 = r.get(f"{variant}/float32")
                d_rows.append((name, variant, f"{f32['ms_per_step']:.2f}" if f32 else "-",
                               f"{bf16['ms_per_step']:.2f}",
                               f"{f32['ms_per_step'] / bf16['ms_per_step']:.2f}x" if f32 else "-",
                               f"{default_bf16 / bf16['ms_per_step']:.2f}x",
                               f"{100 * bf16['flops_per_sec'] / peaks['bfloat16']:.1f}%"))
        for key, profile in r.items():
            if key.startswith("profile/"):
                shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in profile.items())
                profiles.append(f"- {name}, {key.split('/')[1]}, mixed_bfloat16 step: {shares}")
    parts = [
        f"Matmul peak (2048x2048, best of alternating runs): float32 {peaks['float32'] / 1e9:.1f} "
        f"GFLOP/s, bfloat16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s "
        f"(bf16/f32 ceiling {peaks['bfloat16'] / peaks['float32']:.2f}x).",
        "", "(a) Framework loop vs Keras Model.fit (examples/s, ratio > 1: ours faster)", "",
        _table(("config", "policy", "ours", "Model.fit", "fit + fused update", "ours / fit",
                "ours / fit+fused"), a_rows),
        "", "(a2) Levers: our loop with in-graph input replaced by tf.data, and with the whole "
        "update as one XLA computation (ms/step; ratio = that / ours, > 1: ours faster)", "",
        _table(("config", "policy", "ours", "tf.data input", "whole-step XLA update",
                "in-graph input gain", "whole-step / ours"), lever_rows),
        "", "(b) mixed_bfloat16 vs float32 (ms/step of our loop; Model.fit's for reference)", "",
        _table(("config", "float32 ms/step", "bf16 ms/step", "speedup (ours)", "speedup (fit)",
                "speedup (fit+fused)"), b_rows),
        "", "(c) Model-FLOP utilisation of our loop vs the measured matmul peak", "",
        _table(("config", "policy", "GFLOP/step", "achieved GFLOP/s", "peak GFLOP/s", "MFU"),
               c_rows),
        "", "(d) Levers and experiments (our loop; the compute-bound configurations and the "
        "default transformer)", "",
        _table(("config", "variant", "float32 ms/step", "bf16 ms/step", "bf16 speedup",
                "bf16 vs default", "bf16 MFU"), d_rows),
        "", "Profile (share of summed op time by op type, our loop):", "", *profiles,
        "", "Targets (issue 10), from this run:", "",
        _table(("target", "measured", ""), targets(results, peaks)),
    ]
    return "\n".join(parts)


def footprint_report(rows: list) -> str:
    """Peak RSS and time to the first finished step per configuration (fresh processes)."""
    table = []
    for name, policy, ours, piped in rows:
        growth = ours["peak_rss_mb"] / piped["peak_rss_mb"] - 1
        table.append((name, policy, f"{ours['peak_rss_mb']:.0f}", f"{piped['peak_rss_mb']:.0f}",
                      f"{100 * growth:+.1f}%", f"{ours['first_step_s']:.2f}",
                      f"{piped['first_step_s']:.2f}"))
    return "\n".join([
        "(f) Peak memory and time to the first finished step (fresh process per cell; the "
        "first step includes building the Trainer, tracing and compiling)", "",
        _table(("config", "policy", "peak RSS MB (ours)", "peak RSS MB (tf.data input)",
                "in-graph input RSS change", "first step s (ours)",
                "first step s (tf.data input)"), table)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 6.")
    parser.add_argument("--models", default="", help="Only these zoo models, e.g. mlp,transformer.")
    parser.add_argument("--json", default="", help="Also write the raw results here.")
    parser.add_argument("--footprint", action="store_true",
                        help="Also measure peak RSS and time to the first step per configuration "
                             "(benchmarks/footprint.py, fresh processes).")
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
    footprints = []
    if args.footprint:
        for bench in benches:
            index = BENCHES.index(bench)
            for policy in POLICIES:
                footprints.append((bench.name, policy, footprint.run(index, policy, "ours"),
                                   footprint.run(index, policy, INPUT_BASELINE)))
        print("\n" + footprint_report(footprints))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    if args.json:
        files.write_json(args.json, {"device": device.description, "peaks": peaks,
                                     "results": results, "footprint": footprints})
    return 0


if __name__ == "__main__":
    sys.exit(main())
