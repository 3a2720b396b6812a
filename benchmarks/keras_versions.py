"""Our loop under Keras 3 vs Keras 3's own ``Model.fit``, and vs our loop under Keras 2.

    .venv/bin/python benchmarks/keras_versions.py [--rounds=3] [--seconds=1.5] [--json=PATH]

Each Keras needs its own process (TensorFlow picks it once, from TF_USE_LEGACY_KERAS), so
this script starts child processes, alternating Keras 3 and Keras 2 (and which goes first)
round by round, each child timing all of its runners round-robin; the best time of each
runner over all rounds is kept (other jobs on a shared machine only ever slow a measurement
down). Runners, for the seed MLP and the cnn, float32 and mixed_bfloat16:

- ``ours`` under Keras 3 and under Keras 2 (Trainer.train_steps, ``steps_per_loop`` steps per
  compiled call, defaults), and ``ours unfused`` (the optimizer update not XLA-compiled, as
  Keras runs it on a CPU: what the fused update buys under each Keras);
- ``fit`` (Keras 3 only): the same model, optimizer (Adam), loss-scale wrapper (Keras 3's
  ``LossScaleOptimizer`` for mixed policies, whose ``scale_loss`` ``fit`` calls), batch size
  and tf.data pipeline, ``compile(jit_compile=False)``, with each ``steps_per_execution`` of
  ``SPE``; the best of them is the peer. (Ours reads its in-memory data in-graph, its default;
  ``fit`` the equal tf.data pipeline, the way a Keras user feeds it.)

Results go in BENCHMARKS.md ("Keras 3 vs Keras 2").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# steps_per_execution tried for Keras 3's fit: the MLP's step is short enough for the
# per-call overhead to matter; the cnn's (about 0.1 s here) is not, so 100 is not tried there.
SPE = {"mlp": (1, 10, 100), "cnn": (1, 10)}
BENCH_NAMES = ("mlp (seed, units 256)", "cnn")


def _child(seconds: float) -> dict:
    """Times every runner of this process' Keras; returns {runner: best s/step}."""
    sys.path.insert(0, ROOT)
    from benchmarks.run import FitRunner
    from benchmarks.suite import BENCHES, POLICIES, OursRunner
    from trainer import compat

    class Fit:
        """benchmarks/run.py's FitRunner with ``steps_per_execution`` = ``spe``."""

        def __init__(self, bench, policy, data, spe):
            self.spe = spe
            self.runner = FitRunner(dataclasses.replace(bench, steps_per_loop=spe), policy, data)

        def seconds_per_step(self, steps):
            return self.runner.seconds_per_step(max(1, steps // self.spe))

    class Ours:
        def __init__(self, bench, policy, variant="ours"):
            self.runner = OursRunner(bench, policy, variant)
            self.bench = bench

        def seconds_per_step(self, steps):
            loops = max(1, steps // self.bench.steps_per_loop)
            return self.runner.seconds_per_step(loops)

    runners = {}
    for bench in (b for b in BENCHES if b.name in BENCH_NAMES):
        for policy in POLICIES:
            ours = Ours(bench, policy)
            runners[f"{bench.name}|{policy}|ours"] = ours
            runners[f"{bench.name}|{policy}|ours unfused"] = Ours(bench, policy,
                                                                 "ours+unfused_update")
            if compat.KERAS_MAJOR == 3:
                data = ours.runner.trainer.datasets.train_from(0)
                for spe in SPE[bench.model]:
                    runners[f"{bench.name}|{policy}|fit spe={spe}"] = Fit(bench, policy, data,
                                                                          spe)
    steps = {}
    for name, runner in runners.items():
        start = time.perf_counter()
        runner.seconds_per_step(10)  # Trace and warm up (at least one compiled call).
        per_step = runner.seconds_per_step(10)
        steps[name] = max(10, int(seconds / per_step))
        print(f"  {compat.KERAS_NAME} {name}: {1000 * per_step:.3f} ms/step (warm-up "
              f"{time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    best = {}
    for r in range(2):
        names = list(runners)[::1 if r == 0 else -1]
        for name in names:
            value = runners[name].seconds_per_step(steps[name])
            best[name] = min(best.get(name, value), value)
    return {"keras": compat.KERAS_NAME, "major": compat.KERAS_MAJOR, "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5, help="per runner per timing")
    parser.add_argument("--json", default="")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args.seconds)), flush=True)
        return
    best = {2: {}, 3: {}}
    names = {}
    for r in range(args.rounds):
        for major in ((3, 2) if r % 2 == 0 else (2, 3)):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
            env.pop("TF_USE_LEGACY_KERAS", None)
            if major == 2:
                env["TF_USE_LEGACY_KERAS"] = "1"
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                                  f"--seconds={args.seconds}"], env=env, stdout=subprocess.PIPE,
                                 text=True, check=True)
            result = json.loads(out.stdout.split("RESULT ", 1)[1])
            assert result["major"] == major, result
            names[major] = result["keras"]
            for name, value in result["best"].items():
                best[major][name] = min(best[major].get(name, value), value)
            print(f"round {r + 1}/{args.rounds}: {result['keras']} done", flush=True)
    rows = []
    print(f"\n{'configuration':34s} {'ours K3':>9s} {'fit K3 best':>15s} {'ours/fit':>9s} "
          f"{'ours K2':>9s} {'K3/K2':>7s} {'fused K3':>9s} {'fused K2':>9s}")
    for key in sorted(k for k in best[3] if k.endswith("|ours")):
        bench, policy, _ = key.split("|")
        ours3, ours2 = best[3][key], best[2][key]
        fits = {k.split("|")[2]: v for k, v in best[3].items()
                if k.startswith(f"{bench}|{policy}|fit")}
        fit_name, fit = min(fits.items(), key=lambda kv: kv[1])
        row = {"configuration": f"{bench} {policy}", "ours_keras3_ms": 1000 * ours3,
               "fit_keras3_best_ms": 1000 * fit, "fit_best": fit_name,
               "fit_keras3_ms": {k: 1000 * v for k, v in fits.items()},
               "ours_keras2_ms": 1000 * ours2,
               "unfused_keras3_ms": 1000 * best[3][f"{bench}|{policy}|ours unfused"],
               "unfused_keras2_ms": 1000 * best[2][f"{bench}|{policy}|ours unfused"],
               "fused_gain_keras3": best[3][f"{bench}|{policy}|ours unfused"] / ours3,
               "fused_gain_keras2": best[2][f"{bench}|{policy}|ours unfused"] / ours2,
               "ours_vs_fit": fit / ours3,  # > 1: ours is faster.
               "keras3_vs_keras2": ours2 / ours3}  # > 1: ours on Keras 3 is faster.
        rows.append(row)
        print(f"{row['configuration']:34s} {row['ours_keras3_ms']:8.3f}ms "
              f"{row['fit_keras3_best_ms']:7.3f}ms {fit_name[4:]:>7s} "
              f"{row['ours_vs_fit']:8.2f}x {row['ours_keras2_ms']:8.3f}ms "
              f"{row['keras3_vs_keras2']:6.2f}x {row['fused_gain_keras3']:8.2f}x "
              f"{row['fused_gain_keras2']:8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"keras3": names.get(3), "keras2": names.get(2), "rounds": args.rounds,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
