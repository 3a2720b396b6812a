"""The precision audit: flags a bf16 softmax output, passes every zoo model."""

import os
import subprocess
import sys

import pytest

from trainer import compat, registry
from trainer.compat import keras, tf
from trainer.config import TrainConfig
from trainer.tools import audit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_MODEL = "test_audit_bf16_softmax"


def bf16_softmax(*, input_shape, num_classes):
    """The tutorial's mistake: the softmax inherits the mixed policy and outputs bf16."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.LayerNormalization(name="norm")(x)
    x = keras.layers.Dense(num_classes, name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="bad")


def _rows(report):
    return {row.name: row for row in report.rows}


@pytest.fixture
def bad_model(register_model):
    """BAD_MODEL, registered for one test only (see conftest.register_model)."""
    register_model(BAD_MODEL)(bf16_softmax)
    return BAD_MODEL


def test_flags_a_bf16_softmax_output(bad_model, capsys):
    config = TrainConfig(model=bad_model, dataset="synthetic", policy="mixed_bfloat16")
    assert audit.run(config) == 1
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-1]
    assert last.startswith("audit FAILED") and "'probabilities'" in last and "bfloat16" in last
    report = audit.audit(config)
    assert report.bad_outputs == (("probabilities", "bfloat16"),)
    row = _rows(report)["probabilities"]
    assert row.flagged and row.output_dtype == "bfloat16" and row.compute_dtype == "bfloat16"
    assert any("softmax computed in bfloat16" in note for note in row.notes)
    # The LayerNorm before it keeps float32 statistics, read from its graph.
    assert _rows(report)["norm"].notes == ("statistics in float32",)
    assert not _rows(report)["logits"].flagged


def test_same_model_passes_under_float32(bad_model):
    report = audit.audit(TrainConfig(model=bad_model, dataset="synthetic", policy="float32"))
    assert report.ok and not any(row.flagged for row in report.rows)


def test_a_model_registered_by_a_test_is_gone_afterwards():
    # Runs after the two tests above registered BAD_MODEL: the registry is as it was.
    assert BAD_MODEL not in registry.model_names()
    assert {"mlp", "cnn", "resnet", "transformer"} <= set(registry.model_names())


def test_table_columns_line_up():
    row = audit.LayerRow("dense_with_a_long_name", "Dense", "bfloat16", "float32", "bfloat16",
                         1290, ("!! model output in bfloat16",))
    report = audit.AuditReport("m", "mixed_bfloat16", (row,), (("dense", "bfloat16"),))
    lines = audit.format_table(report).splitlines()
    assert lines[0] == ("layer                   class  compute   variables  output    params"
                        "  notes")
    assert lines[1] == "-" * len(lines[0])
    assert lines[2] == ("dense_with_a_long_name  Dense  bfloat16  float32    bfloat16   1,290"
                        "  !! model output in bfloat16")
    assert lines[3:5] == ["-" * len(lines[0]), "1 layers, 1,290 parameters, 1 flagged (!!)"]
    assert lines[5].startswith("audit FAILED: model 'm' output 'dense' is bfloat16")


def test_pure_bfloat16_policy_flags_normalisation():
    # Variables and statistics in bf16 are what the pure policy gets wrong; the audit says so.
    report = audit.audit_model(
        _build_under("bfloat16"), policy="bfloat16",
        sample=tf.zeros((1, 28, 28, 1)))
    notes = " ".join(_rows(report)["norm"].notes)
    assert "!! normalisation variables in bfloat16" in notes
    # Read from the layer's graph: Keras 2 computes the statistics in the policy's bf16;
    # Keras 3's normalisation layers cast 16-bit inputs to float32 for them first.
    if compat.KERAS_MAJOR == 2:
        assert "!! statistics computed in bfloat16" in notes
    else:
        assert "statistics in float32" in notes and "!! statistics" not in notes


def _build_under(policy):
    from trainer.core.precision import policy_scope
    with policy_scope(policy):
        return bf16_softmax(input_shape=(28, 28, 1), num_classes=10)


@pytest.mark.parametrize("policy", ("mixed_bfloat16", "mixed_float16"))
@pytest.mark.parametrize("model", ("mlp", "cnn", "resnet", "transformer"))
def test_every_zoo_model_passes(model, policy):
    report = audit.audit(TrainConfig(model=model, dataset="synthetic", policy=policy))
    assert report.ok, audit.verdict(report)
    assert not [row.name for row in report.rows if row.flagged]
    rows = list(report.rows)
    assert rows[-1].output_dtype == "float32" and rows[-1].compute_dtype == "float32"
    low = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}[policy]
    assert any(row.compute_dtype == low for row in rows)
    assert sum(row.params for row in rows) == registry.build_model(
        model, input_shape=(28, 28, 1), num_classes=10, model_args={}).count_params()


def test_cli_exit_codes():
    # The one subprocess check: run.py turns the audit's verdict into the exit status.
    good = subprocess.run([sys.executable, "run.py", "--audit", "--model=cnn", "--dataset=synthetic"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr[-2000:]
    assert "audit OK" in good.stdout and "stage1_conv1_bn" in good.stdout
