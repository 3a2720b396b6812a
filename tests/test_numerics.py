"""The numerics inspector: flags exactly a known overflow and a known underflow, fixes the latter
with the loss scale it recommends, flags nothing in float32; the CLI and the TensorBoard action."""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli, small_config

from trainer import job, registry
from trainer.compat import keras, tf
from trainer.config import TrainConfig
from trainer.core import precision
from trainer.core.steps import Trainer
from trainer.errors import UserError
from trainer.tools import numerics

OVERFLOW_MODEL = "test_numerics_overflow"  # Registered only by the test that runs it by name.


def overflow_model(*, input_shape, num_classes):
    """'boom' scales activations of about 1 by 1e6: far past float16's 65504."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, name="hidden")(x)
    x = keras.layers.Rescaling(1e6, name="boom")(x)
    x = keras.layers.Rescaling(1e-6, name="unboom")(x)
    x = keras.layers.Dense(num_classes, name="logits")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="overflow")


def underflow_model(*, input_shape, num_classes):
    """'tiny' feeds the logits through a float32 x1e-6: its gradients are ~1e-9 unscaled."""
    inputs = keras.Input(shape=input_shape)
    flat = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(flat)
    x = keras.layers.Dense(num_classes, name="logits")(x)
    side = keras.layers.Dense(num_classes, name="tiny")(flat)
    side = keras.layers.Rescaling(1e-6, dtype="float32", name="shrink")(side)
    x = keras.layers.Add(dtype="float32", name="sum")([x, side])
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="underflow")


def _inspect(build, policy, loss_scale, mode="fixed"):
    rng = np.random.default_rng(0)
    features = tf.constant(rng.random((32, 28, 28, 1)), tf.float32)
    labels = tf.constant(rng.integers(0, 10, 32))
    keras.utils.set_random_seed(1)
    with precision.policy_scope(policy):
        model = build(input_shape=(28, 28, 1), num_classes=10)
    with precision.policy_scope("float32"):
        reference = build(input_shape=(28, 28, 1), num_classes=10)
    reference.set_weights(model.get_weights())
    return numerics.inspect(model, reference, compute_loss=keras.losses.sparse_categorical_crossentropy,
                            features=features, labels=labels, policy=policy,
                            loss_scale=loss_scale, loss_scale_mode=mode)


def _flagged(report):
    return [row.name for row in report.flagged]


def _rows(report):
    return {row.name: row for row in report.rows}


def test_float16_overflow_flags_exactly_that_layer():
    report = _inspect(overflow_model, "mixed_float16", 2.0 ** 15, "dynamic")
    assert _flagged(report) == ["boom"]
    boom = _rows(report)["boom"]
    assert boom.dtype == "float16" and boom.max_abs_activation > 65504 and boom.headroom > 1
    assert "keep this layer in float32 (dtype='float32')" in " ".join(boom.notes)
    # The 16-bit output is inf; the next layers inherit it and say so, unflagged.
    assert boom.output_error == float("inf")
    assert "an earlier layer overflowed" in " ".join(_rows(report)["unboom"].notes)
    # The layer before it is fine: in float32 its activations are about 1. (Its float16 error
    # is 3e-4 on TF 2.21 and 4e-3 on TF 2.15, whose CPU float16 matmul rounds more.)
    hidden = _rows(report)["hidden"]
    assert hidden.headroom < 1e-3 and hidden.output_error < 0.01 and not hidden.flagged


def test_float16_underflow_flags_exactly_that_layer_and_the_recommended_scale_fixes_it():
    report = _inspect(underflow_model, "mixed_float16", 1.0)
    assert _flagged(report) == ["tiny"]
    tiny = _rows(report)["tiny"]
    assert tiny.flush_fraction > 0.5  # Most of its gradient values round to 0 unscaled ...
    assert tiny.gradient_error > 0.5  # ... so its 16-bit weight gradient is mostly wrong.
    assert _rows(report)["hidden"].flush_fraction <= numerics.FLUSH_TOLERANCE
    low, high = report.scale_range
    scale = report.recommended_loss_scale
    assert 1 < low <= scale <= high and np.log2(scale) == int(np.log2(scale))
    assert f"use --loss_scale={scale:.0f}" in " ".join(tiny.notes)

    fixed = _inspect(underflow_model, "mixed_float16", scale)
    assert _flagged(fixed) == []
    tiny = _rows(fixed)["tiny"]
    assert tiny.flush_fraction <= numerics.FLUSH_TOLERANCE and tiny.overflow_fraction == 0
    assert tiny.gradient_error < 0.01  # Now as good as the other layers' float16 gradients.
    # Past the top of the range something overflows: the range is tight, not decorative.
    over = _inspect(underflow_model, "mixed_float16", high * 2)
    assert over.totals()["gradient_overflow_fraction"] > 0
    assert _flagged(over)


@pytest.mark.parametrize("build", [overflow_model, underflow_model])
def test_float32_flags_nothing_and_matches_itself(build):
    report = _inspect(build, "float32", 1.0, "none")
    assert _flagged(report) == []
    assert all(row.output_error == 0 for row in report.rows)
    assert report.low_dtypes == () and report.recommended_loss_scale is None


def test_bfloat16_has_float32_range_no_underflow_no_scale_needed():
    report = _inspect(underflow_model, "mixed_bfloat16", 1.0)
    assert _flagged(report) == []
    assert report.totals()["gradient_underflow_fraction"] == 0
    assert report.recommended_loss_scale == 1
    # bf16 keeps 8 bits: relative errors of a few 2**-8, not float16's 2**-11.
    assert 1e-4 < _rows(report)["logits"].output_error < 0.05


def test_gradient_fractions_match_a_real_cast_to_float16():
    rng = np.random.default_rng(3)
    values = np.sort(2.0 ** rng.uniform(-40, 20, 20000))
    for scale in (1.0, 2.0 ** 10):
        flushed, subnormal, overflow = numerics.gradient_fractions(values, numerics.LIMITS["float16"],
                                                                  scale)
        with np.errstate(over="ignore"):
            cast = (values * scale).astype(np.float16)
        assert flushed == np.mean(cast == 0)
        assert overflow == np.mean(np.isinf(cast))
        assert subnormal == pytest.approx(np.mean((cast != 0) & (np.abs(cast) < 2.0 ** -14)),
                                          abs=1e-3)
        assert 0 < flushed < 1 and 0 < overflow < 1


def test_run_returns_1_when_flagged_and_writes_one_json_entry_per_layer(tmp_path, capsys,
                                                                        register_model):
    register_model(OVERFLOW_MODEL)(overflow_model)
    path = tmp_path / "numerics.json"
    config = small_config(model=OVERFLOW_MODEL, model_args={}, policy="mixed_float16",
                          metrics_file=str(path), verbose=True)
    assert numerics.run(config) == 1
    out = capsys.readouterr().out
    assert "numerics FLAGGED" in out and "'boom'" in out.splitlines()[-1]
    payload = json.loads(path.read_text())
    names = [entry["name"] for entry in payload["layers"]]
    assert len(names) == 6 and names[1:] == ["hidden", "boom", "unboom", "logits", "probs"]
    assert payload["flagged"] == ["boom"] and payload["examples"] == 32
    assert [e["flagged"] for e in payload["layers"]].count(True) == 1
    assert payload["loss_scale"] == 2.0 ** 15 and payload["loss_scale_mode"] == "dynamic"
    boom = next(e for e in payload["layers"] if e["name"] == "boom")
    assert boom["output_error"] == "inf"  # JSON has no Inf: said in words.
    assert numerics.run(config.replace(policy="float32", metrics_file=None)) == 0


class SubclassedModel(keras.Model):
    """No functional graph: only the layers held as attributes can be hooked."""

    def __init__(self):
        super().__init__(name="subclassed")
        self.flat = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(8, activation="relu", name="sub_hidden")
        self.drop = keras.layers.Dropout(0.5, name="sub_drop")
        self.head = keras.layers.Dense(10, name="sub_head")
        self.probs = keras.layers.Activation("softmax", dtype="float32", name="sub_probs")

    def call(self, x, training=False):
        x = self.drop(self.hidden(self.flat(x)), training=training)
        return self.probs(self.head(x))


class SubclassTrainer(Trainer):
    """Its own model and loss: the inspector must use both."""

    loss_calls = 0

    def build_model(self):
        return SubclassedModel()

    def compute_loss(self, labels, outputs):
        SubclassTrainer.loss_calls += 1
        return keras.losses.sparse_categorical_crossentropy(labels, outputs)


def test_trainer_subclass_hooks_and_a_subclassed_model(capsys):
    SubclassTrainer.loss_calls = 0
    config = small_config(policy="mixed_bfloat16", grad_accum_steps=2)
    report = numerics.Inspector(SubclassTrainer(config)).report()
    assert [row.cls for row in report.rows] == ["Flatten", "Dense", "Dropout", "Dense",
                                                "Activation"]
    assert [row.name for row in report.rows][1:] == ["sub_hidden", "sub_drop", "sub_head",
                                                     "sub_probs"]
    assert SubclassTrainer.loss_calls >= 2  # Both passes used the subclass's loss.
    # One micro-batch of one replica: 32 / 2 examples, the loss divided by the global 32.
    assert report.examples == 16
    rows = {row.cls + str(i): row for i, row in enumerate(report.rows)}
    drop = rows["Dropout2"]
    # Dropout ran as the identity in both passes: its error is the Dense's before it.
    assert drop.output_error == pytest.approx(rows["Dense1"].output_error)
    assert all(row.output_error < 0.05 for row in report.rows) and not report.flagged


def _scalars(folder):
    values = {}
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor))))
    return values


def test_numerics_every_logs_summaries_and_leaves_training_unchanged(tmp_path):
    base = small_config(policy="mixed_float16", steps_per_loop=8)
    plain = job.run(base.replace(model_dir=str(tmp_path / "plain")))
    logged = job.run(base.replace(model_dir=str(tmp_path / "numerics"), numerics_every=3))
    # Loops are cut at 3 and 6 but every step is the same step: identical weights.
    assert logged["weights_checksum"] == plain["weights_checksum"]
    assert logged["global_step"] == 8
    scalars = _scalars(str(tmp_path / "numerics" / "train"))
    tags = {f"numerics/{k}" for k in ("gradient_underflow_fraction", "gradient_subnormal_fraction",
                                      "gradient_overflow_fraction", "max_activation_headroom",
                                      "loss_scale", "flagged_layers")}
    assert tags <= set(scalars)
    for tag in tags:
        assert [step for step, _ in scalars[tag]] == [3, 6]
    for tag in ("gradient_underflow_fraction", "gradient_subnormal_fraction",
                "gradient_overflow_fraction"):
        assert all(0 <= v <= 1 for _, v in scalars[f"numerics/{tag}"])
    assert all(0 < v < numerics.HEADROOM_LIMIT
               for _, v in scalars["numerics/max_activation_headroom"])
    assert [v for _, v in scalars["numerics/loss_scale"]] == [2.0 ** 15, 2.0 ** 15]
    assert [v for _, v in scalars["numerics/flagged_layers"]] == [0, 0]
    assert not any(tag.startswith("numerics/") for tag in _scalars(str(tmp_path / "plain" / "train")))


def test_numerics_every_needs_a_model_dir():
    with pytest.raises(UserError, match="--model_dir"):
        job.run(small_config(numerics_every=2))


def test_cli_cnn_prints_the_table_and_json(tmp_path):
    path = tmp_path / "cnn.json"
    result = run_cli("--numerics", "--model=cnn", "--model_args=width=4,depth=1,dense_units=8",
                     "--policy=mixed_bfloat16", "--dataset=synthetic", "--synthetic_examples=256",
                     "--batch_size=32", f"--metrics_file={path}", timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "numerics OK" in result.stdout.splitlines()[-1]
    payload = json.loads(path.read_text())
    names = [entry["name"] for entry in payload["layers"]]
    model = registry.build_model("cnn", input_shape=(28, 28, 1), num_classes=10,
                                 model_args={"width": 4, "depth": 1, "dense_units": 8})
    assert names == [layer.name for layer in model.layers
                     if not isinstance(layer, keras.layers.InputLayer)]
    for name in names:  # One table row per layer.
        assert any(line.startswith(name + " ") for line in result.stdout.splitlines())
    assert payload["policy"] == "mixed_bfloat16" and payload["flagged"] == []
    assert all(e["flagged"] is False for e in payload["layers"])
    assert all(isinstance(e["output_error"], float) for e in payload["layers"])


def test_unknown_model_is_one_error_line():
    with pytest.raises(UserError):
        numerics.run(TrainConfig(numerics=True, model="no_such_model", dataset="synthetic"))


def test_two_workers_stay_in_step_and_only_the_chief_writes(tmp_path):
    # A real 2-process job: the action runs on both workers, computes and writes on the chief
    # only, and runs no collective, so the job neither hangs nor trips the lockstep check.
    model_dir = tmp_path / "job"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "--num_workers=2", "--", "run.py",
         "--dataset=synthetic", "--synthetic_examples=1024", "--model_args=units=16",
         "--epochs=1", "--batch_size=64", "--policy=mixed_bfloat16", "--device=cpu",
         "--progress=none", "--seed=3", "--distribution=multi_worker", "--numerics_every=5",
         f"--model_dir={model_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stdout[-3000:]
    lines = re.findall(r"worker (\d)/2[^:]*: global_step (\d+) weights_checksum (\S+)",
                       result.stdout)
    assert len(lines) == 2 and lines[0][1:] == lines[1][1:] and lines[0][1] == "14"
    assert len(glob.glob(str(model_dir / "train" / "events.out.tfevents.*"))) == 1
    scalars = _scalars(str(model_dir / "train"))
    assert [step for step, _ in scalars["numerics/loss_scale"]] == [5, 10]
    assert all(v == 0 for _, v in scalars["numerics/gradient_underflow_fraction"])  # bfloat16
