"""Where a compiled step's time goes: the TF profiler's trace, summed by op type."""

from __future__ import annotations

import collections
import glob
import re
import shutil
import tempfile
from typing import Callable, Dict

from trainer.compat import tf

# Ops that only contain other ops; counting them would count their children twice.
_CONTAINERS = {"While", "StatelessWhile", "StatefulPartitionedCall", "PartitionedCall", "If",
               "StatelessIf", "IteratorGetNext"}
_MATMUL = ("MatMul", "Conv", "Einsum")
_OPTIMIZER = re.compile(r"/(Adam|AdamW|SGD|RMSprop|update_step)[/_]")


def category(node: str, op_type: str) -> str:
    """Which part of a train step a kernel belongs to, from its node name and op type."""
    if op_type == "Cast":
        return "casts (fp32<->16-bit)"
    if _OPTIMIZER.search(node):
        return "optimizer update (float32)"
    if any(m in op_type for m in _MATMUL):
        return "matmul/conv (fwd+bwd)"
    if op_type in ("IsFinite", "All"):
        return "loss-scale finiteness checks"
    if "fusion" in node or op_type.startswith(("_Xla", "Xla")):
        return "XLA-compiled clusters"
    if "gradient_tape/" in node:
        return "backward elementwise/reductions"
    return "forward elementwise/other"


def profile_ops(fn: Callable[[], None], *, calls: int = 2) -> Dict[str, float]:
    """Runs ``fn`` ``calls`` times under the TF profiler; returns each category's share of op time.

    Op time is summed over the executor's compute threads (ops on two threads overlap), so
    shares, not absolute times, are meaningful.
    """
    # Here, not at the top: a TensorFlow-internal module (not public API), needed only when a
    # profile is read, so importing this module (and benchmarks/run.py) does not depend on it.
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="bench-profile-")
    try:
        tf.profiler.experimental.start(logdir)
        for _ in range(calls):
            fn()
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    totals: Dict[str, float] = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # Kernels are named 'node:OpType'; executor and tf.data events use '::'.
                if ":" not in name or "::" in name:
                    continue
                node, op_type = name.rsplit(":", 1)
                if op_type not in _CONTAINERS:
                    totals[category(node, op_type.strip())] += event.duration_ps
    whole = sum(totals.values()) or 1
    return {name: value / whole for name, value in sorted(totals.items(), key=lambda kv: -kv[1])}
