"""Peak memory and time to the first finished step of one configuration, in a fresh process.

    .venv/bin/python -m benchmarks.footprint --bench=0 --policy=mixed_bfloat16 --variant=ours
    .venv/bin/python -m benchmarks.footprint --before=/tmp/before   # make run + first step, vs a checkout

Prints one JSON line: ``peak_rss_mb`` (the process's peak resident set, TensorFlow itself
included, after ``--steps`` steps), ``first_step_s`` (building the Trainer, then its first
``train_steps(1)``: tracing, graph optimisation and XLA compilation of the update included)
and ``import_s``. A fresh process per measurement, because peak RSS only ever grows.
``benchmarks/run.py --footprint`` runs it for every configuration. It uses only the public
Trainer API, so ``PYTHONPATH=<an older checkout>`` measures that version's code ("before"),
read through that checkout's ``benchmarks/suite.py`` (BENCHES, OursRunner): a checkout from
before suite.py existed (they were in its benchmarks/run.py) fails with ModuleNotFoundError.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_STARTED = time.perf_counter()


def measure(bench_index: int, policy: str, variant: str, steps: int) -> Dict[str, float]:
    # Here, not at the top: this imports TensorFlow and the trainer, and ``import_s`` times that
    # import from the process's start; ``run`` and ``--before`` (the parent side) need neither.
    from benchmarks.suite import BENCHES, OursRunner

    imported = time.perf_counter()
    bench = BENCHES[bench_index]
    start = time.perf_counter()
    runner = OursRunner(bench, policy, variant)
    runner.trainer.train_steps(1)
    int(runner.trainer.global_step.numpy())
    first_step = time.perf_counter() - start
    done = 1
    while done < steps:
        runner.trainer.train_steps(min(bench.steps_per_loop, steps - done))
        done += min(bench.steps_per_loop, steps - done)
    int(runner.trainer.global_step.numpy())
    return {"peak_rss_mb": _peak_rss_kb() / 1024,
            "first_step_s": first_step, "import_s": imported - _STARTED}


def _peak_rss_kb() -> int:
    # VmHWM, not getrusage's ru_maxrss: a child started by fork + exec inherits its parent's
    # ru_maxrss (here the benchmark process's, gigabytes), while exec starts a fresh VmHWM.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def run(bench_index: int, policy: str, variant: str, *, steps: int = 50,
        pythonpath: str = "") -> Dict[str, float]:
    """Runs :func:`measure` in a fresh Python process; returns its result."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, root) if p))
    # The script, not `-m`: with PYTHONPATH=<older checkout> first, `benchmarks.suite` and
    # `trainer` come from that checkout (which may have no footprint.py of its own).
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--bench={bench_index}",
         f"--policy={policy}", f"--variant={variant}", f"--steps={steps}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode:
        raise RuntimeError(f"footprint of bench {bench_index} {policy} {variant} failed:\n"
                           f"{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def end_to_end(trees: Dict[str, str], *, rounds: int = 3,
               args: tuple = ("--policy=mixed_bfloat16",)) -> Dict[str, float]:
    """Best wall time of ``python run.py ARGS`` (what ``make run`` runs) in each checkout.

    ``trees`` maps a label to a checkout's root (e.g. {"before": an older worktree, "after":
    this one}); the runs alternate between them, so a busy phase of the machine hits both.
    """
    best = {label: float("inf") for label in trees}
    for _ in range(rounds):
        for label, root in trees.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(root, "run.py"), *args], cwd=root,
                           capture_output=True, check=True, timeout=900)
            best[label] = min(best[label], time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", type=int, default=0, help="Index into suite.BENCHES.")
    parser.add_argument("--policy", default="mixed_bfloat16")
    parser.add_argument("--variant", default="ours")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--before", default="",
                        help="An older checkout: compare `python run.py --policy=mixed_bfloat16` "
                             "(make run) wall time and the first step with it instead.")
    args = parser.parse_args()
    if not args.before:
        print(json.dumps(measure(args.bench, args.policy, args.variant, args.steps)))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = {label: min((run(args.bench, args.policy, "ours", pythonpath=path)["first_step_s"]
                         for _ in range(3)))
             for label, path in (("before", args.before), ("after", root))}
    wall = end_to_end({"before": args.before, "after": root})
    print(json.dumps({"make_run_wall_s": wall, "first_step_s": first}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
