"""The policy comparison: identical initial weights, same data, three files, unsupported policies."""

import csv
import json
import os

import numpy as np
import pytest

from trainer import compare, devices
from trainer.config import TrainConfig
from trainer.errors import ConfigError, UserError
from trainer.trainer import Trainer


def _config(tmp_path, **overrides):
    settings = dict(model="cnn", model_args={"width": 4, "depth": 1, "dense_units": 8},
                    dataset="synthetic", synthetic_examples=256, batch_size=32, epochs=2,
                    steps_per_loop=2, validation_split=0.25, verbose=False,
                    compare_policies="mixed_bfloat16,float32", model_dir=str(tmp_path))
    settings.update(overrides)
    return TrainConfig(**settings)


class RecordingTrainer(Trainer):
    """Keeps every trainer and the weights its model holds when training starts."""

    made = []

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        RecordingTrainer.made.append(self)
        compiled = self.train_steps

        def train_steps(n, _self=self, _compiled=compiled):
            if not hasattr(_self, "start_weights"):
                _self.start_weights = [w.copy() for w in _self.model.get_weights()]
                _self.first_batch = next(iter(_self.datasets.train))[1].numpy()
            _compiled(n)

        self.train_steps = train_steps


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
    np.testing.assert_array_equal(f32.first_batch, bf16.first_batch)
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


def test_loss_curve_has_a_point_per_step_loop_even_with_one_loop_per_epoch(tmp_path):
    result = compare.run(_config(tmp_path, steps_per_loop=100, epochs=3))
    for row in result["rows"]:
        steps = [step for step, _ in row["loss_curve"]]
        assert steps == [6, 12, 18]  # 192 training examples / batch 32 = 6 steps per epoch.
        losses = [loss for _, loss in row["loss_curve"]]
        assert losses[-1] < losses[0]
