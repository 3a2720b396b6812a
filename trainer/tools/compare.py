"""Policy comparison (``run.py --compare_policies=float32,mixed_bfloat16``).

Trains the same model under each policy from identical initial weights (built once under
float32, then copied into each policy's model with ``set_weights``, as the tutorial does) and
the same data order (same seed), and writes a side-by-side table as comparison.json,
comparison.csv and comparison.png into ``--model_dir``.
"""

from __future__ import annotations

import csv
import os
import threading
from typing import List, Type

from trainer import registry
from trainer.compat import keras, tf
from trainer.config import POLICIES, TrainConfig, unsupported_reason
from trainer.core import precision
from trainer.core.steps import Trainer
from trainer.errors import ConfigError, UserError
from trainer.loop import fit_loop
from trainer.loop.actions import PeriodicAction
from trainer.outputs import console, files, layout
from trainer.runtime import devices

CSV_FIELDS = ("policy", "status", "note", "ms_per_step", "examples_per_sec", "speedup_vs_float32",
              "peak_memory_mib", "val_accuracy", "test_accuracy", "test_accuracy_delta_points",
              "test_loss", "skipped_steps", "loss_scale", "initial_weights_checksum",
              "final_weights_checksum")


def parse_policies(text: str) -> List[str]:
    """'float32, mixed_bfloat16' -> ['float32', 'mixed_bfloat16'] (known, no duplicates)."""
    policies = [p.strip() for p in text.split(",") if p.strip()]
    for policy in policies:
        if policy not in POLICIES:
            raise ConfigError(
                f"unknown policy {policy!r} in compare_policies; choose from {', '.join(POLICIES)} "
                "(--compare_policies)")
    if len(set(policies)) != len(policies):
        raise ConfigError(f"compare_policies lists a policy twice: {text!r} (--compare_policies)")
    if not policies:
        raise ConfigError("compare_policies is empty; e.g. --compare_policies=float32,mixed_bfloat16")
    return policies


class PeakMemory:
    """Peak memory while a block runs: the GPU allocator's peak, else the process RSS increase.

    On CPU, the resident set size is sampled every few milliseconds by a thread and the peak
    above the value at entry is kept (``getrusage``'s max RSS never goes down, so it cannot
    tell the second of two sequential runs apart).
    """

    def __init__(self, device: devices.DeviceInfo, interval_s: float = 0.005):
        self.device, self.interval_s, self.peak_mib = device, interval_s, 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._rss_bytes())

    def __enter__(self):
        if self.device.kind == "gpu":
            tf.config.experimental.reset_memory_stats("GPU:0")
        else:
            self._start = self._peak = self._rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.kind == "gpu":
            self.peak_mib = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss_bytes())
            self.peak_mib = (self._peak - self._start) / 2**20
        return False


def _loss_curve_action(trainer: Trainer, curve: List[tuple]) -> PeriodicAction:
    """Records the mean training loss of every compiled step loop, for a smoother curve.

    It runs after each loop and before the periodic evaluation resets the metrics, so the
    loop's mean is the change in the loss metric's running total over the change in its count;
    step loops never cross a log boundary, where the metric restarts from zero.
    """
    loss_metric = trainer.train_metrics["loss"]
    interval = fit_loop.log_interval(trainer)
    state = {"period": -1, "total": 0.0, "count": 0.0}

    def record(step: int, now: float) -> None:
        del now
        period = (step - 1) // interval
        if period != state["period"]:
            state.update(period=period, total=0.0, count=0.0)
        total, count = float(loss_metric.total.numpy()), float(loss_metric.count.numpy())
        if count > state["count"]:
            curve.append((step, (total - state["total"]) / (count - state["count"])))
        state.update(total=total, count=count)

    return PeriodicAction(record, name="loss_curve")


def _record_step_losses(trainer: Trainer, total_steps: int):
    """Records each training step's mean loss, for the plot; returns a reader of ``[(step, loss)]``.

    The step loop only feeds the loss metric, so this wraps the Trainer's metric update (on
    this instance, before the first trace) to also add each step's loss sum and example count
    into two float32 buffers indexed by the step. That adds one small scatter per step to
    every policy alike; the numbers the metric reports are unchanged.
    """
    sums = tf.Variable(tf.zeros([total_steps]), trainable=False, name="step_loss_sums")
    counts = tf.Variable(tf.zeros([total_steps]), trainable=False, name="step_loss_counts")
    update = trainer._update_train_metrics

    def update_and_record(labels, outputs, per_example):
        update(labels, outputs, per_example)
        index = tf.minimum(tf.cast(trainer.global_step, tf.int32), total_steps - 1)[None, None]
        sums.scatter_nd_add(index, tf.reduce_sum(tf.cast(per_example, tf.float32))[None])
        counts.scatter_nd_add(index, tf.cast(tf.size(per_example), tf.float32)[None])

    trainer._update_train_metrics = update_and_record

    def read() -> List[tuple]:
        return [(step + 1, float(total / count)) for step, (total, count)
                in enumerate(zip(sums.numpy(), counts.numpy())) if count > 0]

    return read


def _train_one(trainer: Trainer, initial_weights, device: devices.DeviceInfo) -> dict:
    config = trainer.config
    trainer.model.set_weights(initial_weights)
    initial_checksum = trainer.weights_checksum()
    curve: List[tuple] = []
    step_losses = _record_step_losses(trainer, config.epochs * trainer.datasets.steps_per_epoch)
    # Memory is measured over training and testing; the dataset and weights load before.
    with PeakMemory(device) as memory:
        result = fit_loop.fit(trainer, epochs=config.epochs, steps_per_loop=config.steps_per_loop,
                          on_log=console.print_epoch if config.verbose else None,
                          extra_actions=[_loss_curve_action(trainer, curve)])
        test = trainer.evaluate(trainer.datasets.test)
    last = result.history[-1] if result.history else None
    return {
        "policy": config.policy,
        "status": "ok",
        "note": "",
        "ms_per_step": result.step_time_ms,
        "examples_per_sec": result.examples_per_sec,
        "peak_memory_mib": memory.peak_mib,
        "val_accuracy": last.validation.get("accuracy") if last else None,
        "test_accuracy": test.get("accuracy"),
        "test_loss": test["loss"],
        "skipped_steps": int(trainer.skipped_steps.numpy()),
        "loss_scale": trainer.loss_scale,
        "initial_weights_checksum": initial_checksum,
        "final_weights_checksum": trainer.weights_checksum(),
        "loss_curve": curve,
        "loss_per_step": step_losses(),
        "epochs": files.history_rows(result.history),
    }


def reference_weights(trainer: Trainer) -> list:
    """The initial weights every policy starts from: the model built once under float32.

    Uses ``trainer.build_model`` so that a Trainer subclass's own model is respected. Mixed
    policies keep float32 variables, so these weights load into every policy's model.
    """
    keras.utils.set_random_seed(trainer.config.seed)
    with precision.policy_scope("float32"):
        model = trainer.build_model()
    weights = model.get_weights()
    # Reseed: building the reference model drew from the RNG; what runs next starts from the
    # seed, as it would without this call.
    keras.utils.set_random_seed(trainer.config.seed)
    return weights


def _add_relative(rows: List[dict]) -> None:
    base = next((r for r in rows if r["policy"] == "float32" and r["status"] == "ok"), None)
    for row in rows:
        ok = row["status"] == "ok" and base is not None
        row["speedup_vs_float32"] = base["ms_per_step"] / row["ms_per_step"] if (
            ok and row["ms_per_step"]) else None
        row["test_accuracy_delta_points"] = 100 * (row["test_accuracy"] - base["test_accuracy"]) if (
            ok and row["test_accuracy"] is not None) else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: List[dict]) -> str:
    """The side-by-side comparison as fixed-width text."""
    header = ("policy", "ms/step", "examples/s", "speedup", "peak MiB", "val acc", "test acc",
              "delta (pts)", "skipped", "status")
    body = [(r["policy"], _fmt(r.get("ms_per_step"), ".2f"), _fmt(r.get("examples_per_sec"), ",.0f"),
             _fmt(r.get("speedup_vs_float32"), ".2f") + ("x" if r.get("speedup_vs_float32") else ""),
             _fmt(r.get("peak_memory_mib"), ".0f"), _fmt(r.get("val_accuracy"), ".4f"),
             _fmt(r.get("test_accuracy"), ".4f"), _fmt(r.get("test_accuracy_delta_points"), "+.2f"),
             _fmt(r.get("skipped_steps"), "d"),
             r["status"] + (f" ({r['note']})" if r.get("note") else "")) for r in rows]
    return console.format_table(header, body, right=range(1, 9))


def write_csv(path: str, rows: List[dict]) -> None:
    """One row per policy with the table's numbers (empty cells where a policy did not run)."""
    with files.atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})


# One colour per policy, the same in both panels and in every comparison plot.
POLICY_COLOURS = {"float32": "tab:blue", "mixed_bfloat16": "tab:orange",
                  "mixed_float16": "tab:green"}


def smooth(values: List[float], window: int) -> List[float]:
    """Trailing moving average: point i is the mean of the last ``window`` values up to i."""
    totals, out = [0.0], []
    for i, value in enumerate(values):
        totals.append(totals[-1] + value)
        start = max(0, i + 1 - window)
        out.append((totals[i + 1] - totals[start]) / (i + 1 - start))
    return out


def draw_plot(rows: List[dict], title: str):
    """The comparison figure: loss per step (left) and ms/step (right); returns the Figure.

    Left: each policy's training loss at every step (thin) and its moving average (thick),
    in the policy's colour. Right: the table's ms/step (steady state: the first, tracing, step
    loop excluded) as bars in the same colours, with each epoch line's ms/step as markers; the
    first epoch's includes the tracing loop, which a note on the plot says. Every label stays
    inside its frame.
    """
    import matplotlib  # Here: only --compare_policies draws, and matplotlib is slow to import.
    matplotlib.use("Agg")  # Files only: no display needed.
    from matplotlib.figure import Figure  # After use("Agg").

    figure = Figure(figsize=(12, 4.5))
    curves, bars = figure.subplots(1, 2)
    colours = [POLICY_COLOURS.get(r["policy"], f"C{i + 3}") for i, r in enumerate(rows)]
    longest = max((len(r.get("loss_per_step") or ()) for r in rows), default=0)
    window = max(1, longest // 25)
    for row, colour in zip(rows, colours):
        points = row.get("loss_per_step") or []
        if row["status"] != "ok" or not points:
            continue
        steps, losses = zip(*points)
        curves.plot(steps, losses, color=colour, linewidth=0.6, alpha=0.3)
        curves.plot(steps, smooth(list(losses), window), color=colour, linewidth=2,
                    label=row["policy"])
    curves.set(title="training loss per step", xlabel="step",
               ylabel=f"loss (thin: each step; thick: mean of last {window})")
    if curves.lines:
        curves.legend(loc="upper right")
    _draw_step_times(bars, rows, colours)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _draw_step_times(axes, rows: List[dict], colours: List[str]) -> None:
    names = [r["policy"] for r in rows]
    heights = [r.get("ms_per_step") or 0.0 for r in rows]
    ran = [r["status"] == "ok" for r in rows]
    axes.bar(names, heights, color=[c if ok else "none" for c, ok in zip(colours, ran)],
             edgecolor=colours, linewidth=1.5)
    epoch_times = [[e["ms_per_step"] for e in r.get("epochs") or [] if e.get("ms_per_step")]
                   for r in rows]
    for i, times in enumerate(epoch_times):
        if times:
            axes.plot([i] * len(times), times, linestyle="none", marker="x", color="black",
                      label="each epoch line" if not axes.lines else None)
    top = max(heights + [t for times in epoch_times for t in times] + [1e-9])
    log = top > 4 * max(max(heights), 1e-9)  # Epoch 1's tracing would squash the bars.
    if log:
        axes.set_yscale("log")
        low = min([h for h in heights if h > 0] + [top]) / 3
        axes.set_ylim(low, top * 4)
    else:
        axes.set_ylim(0, top * 1.45)
    for i, (row, height) in enumerate(zip(rows, heights)):
        speedup = row.get("speedup_vs_float32")
        label = (f"{height:.2f} ms" + (f"\n{speedup:.2f}x" if speedup else "")) if ran[i] \
            else "not run"
        y = height if ran[i] else axes.get_ylim()[0] * (1.5 if log else 1)
        axes.annotate(label, (i, y), ha="center", va="bottom", xytext=(0, 3),
                      textcoords="offset points")
    axes.set(title="step time (lower is faster)", ylabel="ms per step")
    # The table and the epoch lines measure different spans: say which is which.
    axes.set_xlabel("bars: the table's ms/step, after warm-up: every step but the first step "
                    "loop's,\nwhich traces and compiles; x: each epoch line's ms/step, over that "
                    "epoch's steps\n(the first epoch's include that loop)", fontsize=8)
    if axes.lines:
        axes.legend(loc="upper right")


def write_plot(path: str, rows: List[dict], title: str) -> None:
    """:func:`draw_plot` as a PNG at ``path`` (written atomically)."""
    figure = draw_plot(rows, title)
    with files.atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)


def run(config: TrainConfig, *, trainer_cls: Type[Trainer] = Trainer) -> dict:
    """Trains ``config.model`` under each policy of ``config.compare_policies`` and compares.

    Every policy starts from the same weights (checked: the initial weight checksums agree)
    and sees the same batches in the same order. A policy the device cannot run is reported
    with its reason instead of stopping the comparison.

    Returns:
      The payload written to comparison.json (``rows`` holds one dict per policy).

    Raises:
      UserError: bad policy list, no ``--model_dir``, or an unusable output folder.
    """
    policies = parse_policies(config.compare_policies)
    if not config.model_dir:
        raise UserError("--compare_policies writes comparison.json/.csv/.png into --model_dir; "
                        "pass --model_dir=DIR")
    paths = layout.comparison(config.model_dir)
    files.check_output_file(paths["json"])
    if trainer_cls is Trainer:
        registry.check_model_args(config.model, config.model_args)
    device = devices.select_device(config.device, policy="float32")
    base = config.replace(compare_policies="", audit=False, metrics_file=None)
    # float32 first: it is the baseline every other row is compared with.
    policies.sort(key=lambda p: p != "float32")
    rows, initial_weights = [], None
    for policy in policies:
        reason = unsupported_reason(device.kind, policy)
        if reason:
            reason = f"unsupported on {device.kind.upper()}: {reason}"
        else:
            if config.verbose:
                print(f"--- {policy}", flush=True)
            try:
                trainer = trainer_cls(base.replace(policy=policy))
                if initial_weights is None:
                    initial_weights = reference_weights(trainer)
                rows.append(_train_one(trainer, initial_weights, device))
                continue
            except (tf.errors.UnimplementedError, tf.errors.NotFoundError,
                    tf.errors.InvalidArgumentError) as error:
                # A missing kernel for this dtype on this device: report it, keep comparing.
                reason = f"failed on {device.kind}: {type(error).__name__}: " + (
                    str(error.message).strip().splitlines() or [""])[0][:160]
            finally:
                trainer = None  # Free this policy's model before the next one is built.
        rows.append({"policy": policy, "status": reason, "note": "", "loss_curve": [],
                     "loss_per_step": [],
                     "epochs": []})
    _add_relative(rows)
    for row in rows:
        if row["status"] == "ok" and devices.slower_than_float32(device, row["policy"]):
            row["note"] = f"no fast {row['policy'][6:]} math on this {device.kind}"
    table = format_table(rows)
    print(f"policy comparison: model {config.model}, {config.dataset}, {config.epochs} epochs, "
          f"batch {config.batch_size}, device {device.description}")
    print(table, flush=True)
    payload = {
        "model": config.model, "model_args": dict(config.model_args), "dataset": config.dataset,
        "epochs": config.epochs, "batch_size": config.batch_size, "optimizer": config.optimizer,
        "learning_rate": config.learning_rate, "seed": config.seed, "device": device.kind,
        "device_description": device.description, "policies": policies, "rows": rows,
    }
    files.write_json(paths["json"], payload)
    write_csv(paths["csv"], rows)
    write_plot(paths["png"], rows, f"{config.model} on {config.dataset}: {', '.join(policies)}")
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']}")
    return payload
