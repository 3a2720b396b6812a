"""The policy comparison: identical initial weights, same data, three files, unsupported policies."""

import csv
import json
import os

import numpy as np
import pytest

from trainer.compat import tf
from trainer.config import TrainConfig
from trainer.core.steps import Trainer
from trainer.errors import ConfigError, UserError
from trainer.runtime import devices
from trainer.tools import compare


def _config(tmp_path, **overrides):
    settings = dict(model="cnn", model_args={"width": 4, "depth": 1, "dense_units": 8},
                    dataset="synthetic", synthetic_examples=256, batch_size=32, epochs=2,
                    steps_per_loop=2, validation_split=0.25, verbose=False,
                    compare_policies="mixed_bfloat16,float32", model_dir=str(tmp_path))
    settings.update(overrides)
    return TrainConfig(**settings)


class RecordingTrainer(Trainer):
    """Records what its run really used: the weights when training starts, and the labels of
    every batch a loss was computed on, in order (training and evaluation alike)."""

    made = []

    def __init__(self, config, **kwargs):
        self.seen = []
        super().__init__(config, **kwargs)
        RecordingTrainer.made.append(self)

    def train_steps(self, num_steps, max_consecutive_skips=None):
        if not hasattr(self, "start_weights"):
            self.start_weights = [w.copy() for w in self.model.get_weights()]
        super().train_steps(num_steps, max_consecutive_skips)

    def compute_loss(self, labels, outputs):
        # Runs inside the compiled step: py_function hands each batch's labels back to Python
        # as the step consumes it, so this is the data the step trained on, not a re-read.
        def record(batch_labels):
            self.seen.append(batch_labels.numpy())
            return 0

        recorded = tf.py_function(record, [labels], tf.int32)
        with tf.control_dependencies([recorded]):
            return tf.identity(super().compute_loss(labels, outputs))


def test_policies_start_from_identical_weights_and_write_three_files(tmp_path):
    RecordingTrainer.made = []
    result = compare.run(_config(tmp_path), trainer_cls=RecordingTrainer)

    rows = {row["policy"]: row for row in result["rows"]}
    assert result["policies"] == ["float32", "mixed_bfloat16"]  # float32 first: the baseline.
    assert [t.config.policy for t in RecordingTrainer.made] == ["float32", "mixed_bfloat16"]
    f32, bf16 = RecordingTrainer.made
    # Identical starting weights, value for value, and the same data order.
    assert len(f32.start_weights) == len(bf16.start_weights) > 0
    for a, b in zip(f32.start_weights, bf16.start_weights):
        np.testing.assert_array_equal(a, b)
    # The batches the two runs consumed, step by step: the same examples in the same order.
    assert len(f32.seen) == len(bf16.seen) >= 2 * 6  # 12 training steps, then evaluations.
    for step, (a, b) in enumerate(zip(f32.seen, bf16.seen)):
        np.testing.assert_array_equal(a, b, err_msg=f"batch {step}")
    # A shuffled stream, not one batch over and over: the check above can tell orders apart.
    assert len({a.tobytes() for a in f32.seen[:12]}) == 12
    assert rows["float32"]["initial_weights_checksum"] == rows["mixed_bfloat16"]["initial_weights_checksum"]
    # Training moved both away from the start, and differently (different arithmetic).
    assert rows["float32"]["final_weights_checksum"] != rows["float32"]["initial_weights_checksum"]
    assert rows["float32"]["final_weights_checksum"] != rows["mixed_bfloat16"]["final_weights_checksum"]
    assert int(f32.global_step.numpy()) == int(bf16.global_step.numpy()) == 2 * 6  # 192 // 32 x 2

    for row in rows.values():
        assert row["status"] == "ok"
        assert row["ms_per_step"] > 0 and row["examples_per_sec"] > 0
        assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["val_accuracy"] <= 1
        assert len(row["loss_curve"]) == 6  # 3 step loops per epoch x 2 epochs.
    assert rows["float32"]["speedup_vs_float32"] == pytest.approx(1.0)
    assert rows["float32"]["test_accuracy_delta_points"] == 0
    expected_delta = 100 * (rows["mixed_bfloat16"]["test_accuracy"] - rows["float32"]["test_accuracy"])
    assert rows["mixed_bfloat16"]["test_accuracy_delta_points"] == pytest.approx(expected_delta)

    with open(tmp_path / "comparison.json") as f:
        assert json.load(f)["rows"][1]["policy"] == "mixed_bfloat16"
    with open(tmp_path / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["policy"] for r in table] == ["float32", "mixed_bfloat16"]
    assert float(table[1]["ms_per_step"]) == pytest.approx(rows["mixed_bfloat16"]["ms_per_step"])
    with open(tmp_path / "comparison.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["comparison.csv", "comparison.json", "comparison.png"]


def test_policy_the_device_cannot_run_is_reported_not_crashed_on(tmp_path, monkeypatch):
    hpu = devices.DeviceInfo("hpu", "/device:HPU:0", "stand-in HPU", True)
    monkeypatch.setattr(compare.devices, "select_device", lambda requested, policy: hpu)
    result = compare.run(_config(tmp_path, compare_policies="float32,mixed_float16", epochs=1))
    rows = {row["policy"]: row for row in result["rows"]}
    assert rows["float32"]["status"] == "ok"
    assert "unsupported on HPU" in rows["mixed_float16"]["status"]
    assert rows["mixed_float16"]["speedup_vs_float32"] is None
    with open(tmp_path / "comparison.csv") as f:
        assert "unsupported on HPU" in f.read()


@pytest.mark.parametrize("policies, message", [
    ("float32,float64", "unknown policy 'float64'"),
    ("float32,float32", "twice"),
])
def test_bad_policy_lists_are_refused(tmp_path, policies, message):
    with pytest.raises(ConfigError, match=message):
        compare.run(_config(tmp_path, compare_policies=policies))
    assert os.listdir(tmp_path) == []


def test_model_dir_is_required():
    config = TrainConfig(dataset="synthetic", compare_policies="float32,mixed_bfloat16")
    with pytest.raises(UserError, match="--model_dir"):
        compare.run(config)


def test_table_aligns_numbers_right_and_words_left():
    rows = [{"policy": "float32", "status": "ok", "ms_per_step": 12.5, "examples_per_sec": 2560.0,
             "speedup_vs_float32": 1.0, "peak_memory_mib": 40.0, "val_accuracy": 0.5,
             "test_accuracy": 0.75, "test_accuracy_delta_points": 0.0, "skipped_steps": 0},
            {"policy": "mixed_float16", "status": "unsupported on HPU: no float16", "note": ""}]
    assert compare.format_table(rows).splitlines() == [
        "policy         ms/step  examples/s  speedup  peak MiB  val acc  test acc  delta (pts)"
        "  skipped  status",
        "-" * 102,
        "float32          12.50       2,560    1.00x        40   0.5000    0.7500        +0.00"
        "        0  ok",
        "mixed_float16        -           -        -         -        -         -            -"
        "        -  unsupported on HPU: no float16",
    ]


class _Unprintable:
    def __str__(self):
        raise RuntimeError("cannot format")


def test_a_failed_csv_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "comparison.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="cannot format"):
        compare.write_csv(str(path), [{"policy": "float32"}, {"policy": _Unprintable()}])
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["comparison.csv"]
    compare.write_csv(str(path), [{"policy": "float32", "status": "ok", "ms_per_step": 1.5}])
    assert path.read_text().splitlines()[1].startswith("float32,ok,,1.5,")
    assert os.listdir(tmp_path) == ["comparison.csv"]


def test_loss_curve_has_a_point_per_step_loop_even_with_one_loop_per_epoch(tmp_path):
    result = compare.run(_config(tmp_path, steps_per_loop=100, epochs=3))
    for row in result["rows"]:
        steps = [step for step, _ in row["loss_curve"]]
        assert steps == [6, 12, 18]  # 192 training examples / batch 32 = 6 steps per epoch.
        losses = [loss for _, loss in row["loss_curve"]]
        assert losses[-1] < losses[0]


def _plot_rows():
    """Two policies that ran (100 steps, two epochs) and one that did not: no training needed."""
    rows = []
    for i, policy in enumerate(("float32", "mixed_bfloat16")):
        losses = [(step, 2.0 / (1 + 0.1 * step) + 0.05 * (-1) ** step) for step in range(1, 101)]
        rows.append({"policy": policy, "status": "ok", "loss_per_step": losses,
                     "ms_per_step": 4.0 - i, "speedup_vs_float32": 4.0 / (4.0 - i),
                     "epochs": [{"epoch": 1, "ms_per_step": 9.0 - i},
                                {"epoch": 2, "ms_per_step": 4.1 - i}]})
    rows.append({"policy": "mixed_float16", "status": "unsupported on HPU", "loss_per_step": [],
                 "epochs": []})
    return rows


def test_plot_one_colour_per_policy_per_step_curves_labels_inside():
    from matplotlib.colors import to_rgba

    figure = compare.draw_plot(_plot_rows(), "test")
    curves, bars = figure.axes
    by_colour = {}
    for line in curves.lines:
        assert len(line.get_xdata()) == 100  # One point per step, raw and smoothed alike.
        by_colour.setdefault(to_rgba(line.get_color(), 1), []).append(line)
    assert len(by_colour) == 2 and all(len(lines) == 2 for lines in by_colour.values())
    assert [t.get_text() for t in curves.get_legend().get_texts()] == ["float32", "mixed_bfloat16"]
    # The smoothed line is the moving average (window 100 // 25) of the raw one under it.
    raw, smoothed = curves.lines[0].get_ydata(), curves.lines[1].get_ydata()
    assert smoothed[-1] == pytest.approx(np.mean(raw[-4:]))
    assert smoothed[0] == raw[0] and np.std(np.diff(smoothed)) < np.std(np.diff(raw)) / 3
    # Bars: the same colour as the policy's curves, the table's ms/step as height.
    patches = bars.patches
    assert [p.get_height() for p in patches] == [4.0, 3.0, 0.0]
    for patch, line in zip(patches[:2], (curves.lines[0], curves.lines[2])):
        assert to_rgba(patch.get_edgecolor(), 1) == to_rgba(line.get_color(), 1)
    # Every label inside the frame.
    low, high = bars.get_ylim()
    for text in bars.texts:
        assert low <= text.xy[1] < high
    assert [t.get_text().splitlines()[0] for t in bars.texts] == ["4.00 ms", "3.00 ms", "not run"]
    # The epoch lines' ms/step are drawn too, and the difference is explained.
    epoch_marks = [y for line in bars.lines for y in line.get_ydata()]
    assert sorted(epoch_marks) == pytest.approx([3.1, 4.1, 8.0, 9.0])
    assert "the table's ms/step, after warm-up" in bars.get_xlabel()
    assert "traces and compiles" in bars.get_xlabel()


def test_loss_per_step_agrees_with_the_per_loop_curve(tmp_path):
    result = compare.run(_config(tmp_path, epochs=1, steps_per_loop=3,
                                 compare_policies="float32"))
    row = result["rows"][0]
    steps = [step for step, _ in row["loss_per_step"]]
    assert steps == list(range(1, 7))
    losses = [loss for _, loss in row["loss_per_step"]]
    # Each step loop's mean loss is the mean of its steps' losses.
    assert [s for s, _ in row["loss_curve"]] == [3, 6]
    assert row["loss_curve"][0][1] == pytest.approx(np.mean(losses[:3]), rel=1e-5)
    assert row["loss_curve"][1][1] == pytest.approx(np.mean(losses[3:]), rel=1e-5)
    assert all(e["ms_per_step"] > 0 for e in row["epochs"])
