"""Experiments as files: every configs/*.flags parses into the TrainConfig it documents, and
one of them runs end to end (shrunk by flags given after it)."""

import json
import re

import pytest
from absl import flags
from conftest import ROOT, run_cli

from trainer.cli import config_flags as trainer_flags
from trainer.config import TrainConfig

CONFIGS = sorted((ROOT / "configs").glob("*.flags"))
# BENCHMARKS.md table (e): model -> (float32, mixed_bfloat16) test accuracy.
TABLE_E = {"mlp": ("0.8890", "0.8898"), "cnn": ("0.9243", "0.9262"),
           "resnet": ("0.9067", "0.9070"), "transformer": ("0.8726", "0.8739")}


def parse(*argv) -> TrainConfig:
    """The TrainConfig run.py would build from ``argv`` (the real absl parser and flags)."""
    flag_values = flags.FlagValues()
    trainer_flags.define_flags(flag_values)
    flag_values(["run.py", *argv])
    return trainer_flags.config_from_flags(flag_values)


def test_the_expected_files_exist():
    assert {path.stem for path in CONFIGS} == {
        "default", *(f"compare_{model}" for model in TABLE_E)}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_file_starts_with_its_command_and_accuracy(path):
    lines = path.read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert lines[0].startswith("#") and len(header) >= 2
    text = "\n".join(header)
    assert f"python run.py --flagfile=configs/{path.name}" in text
    assert re.search(r"accuracy .*0\.\d{4}", text)
    assert all(line.startswith(("#", "--")) or not line.strip() for line in lines)


def test_default_is_the_make_run_run():
    config = parse(f"--flagfile={ROOT / 'configs' / 'default.flags'}")
    assert config == TrainConfig(policy="mixed_bfloat16")  # Every field: the defaults.
    assert "0.8821" in (ROOT / "configs" / "default.flags").read_text()  # README's figure.


@pytest.mark.parametrize("model", sorted(TABLE_E))
def test_comparison_files_are_table_e(model):
    path = ROOT / "configs" / f"compare_{model}.flags"
    config = parse(f"--flagfile={path}")
    assert (config.compare_policies, config.model, config.lr_schedule) == (
        "float32,mixed_bfloat16", model, "cosine")
    assert (config.dataset, config.epochs, config.batch_size, config.optimizer,
            config.learning_rate, config.seed, config.model_args) == (
        "fashion_mnist", 8, 128, "adam", 1e-3, 42, {})
    assert config.model_dir == f"runs/compare_{model}"
    float32, bf16 = TABLE_E[model]
    assert f"float32 {float32}, mixed_bfloat16 {bf16}" in " ".join(path.read_text().split())


def test_later_flags_override_the_file():
    config = parse(f"--flagfile={ROOT / 'configs' / 'compare_cnn.flags'}", "--epochs=1",
                   "--model=mlp")
    assert (config.epochs, config.model, config.lr_schedule) == (1, "mlp", "cosine")


def test_comparison_file_runs_end_to_end(tmp_path):
    proc = run_cli("--flagfile=configs/compare_mlp.flags", "--dataset=synthetic",
                   "--synthetic_examples=256", "--epochs=1", "--batch_size=32",
                   "--validation_split=0", "--model_args=units=16", "--steps_per_loop=4",
                   f"--model_dir={tmp_path}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "comparison.json") as f:
        result = json.load(f)
    # From the file: both policies, the mlp; from the flags after it: the tiny run.
    assert result["policies"] == ["float32", "mixed_bfloat16"]
    assert (result["model"], result["dataset"], result["epochs"], result["batch_size"]) == (
        "mlp", "synthetic", 1, 32)
    rows = result["rows"]
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert rows[0]["initial_weights_checksum"] == rows[1]["initial_weights_checksum"]
    assert [row["epochs"][-1]["step"] for row in rows] == [8, 8]  # 256 / 32 steps.
    assert all(0 <= row["test_accuracy"] <= 1 for row in rows)
