"""The precision audit (``run.py --audit``): which layer computes, stores and outputs what dtype.

No training and no data: the model is built under the chosen policy for the dataset's input
shape and inspected. Normalisation layers are traced to read the dtype their mean/variance
ops really use, so "statistics in float32" is checked, not assumed.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

from trainer import compat, data, registry
from trainer.compat import keras, tf
from trainer.config import TrainConfig
from trainer.core import precision
from trainer.outputs import console

# Input shape and class count of each dataset (the synthetic stand-in copies Fashion-MNIST).
_LOW_PRECISION = ("float16", "bfloat16")
_NORMALIZATION = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
# Ops that compute normalisation statistics, and the attribute holding their dtype.
_STATISTICS_OPS = {"Mean": "T", "FusedBatchNorm": "T", "FusedBatchNormV2": "U",
                   "FusedBatchNormV3": "U", "_FusedBatchNormEx": "U"}


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One line of the audit table.

    Attributes:
      name, cls: the layer's name and class.
      compute_dtype, variable_dtype: from the layer's dtype policy.
      output_dtype: dtype of the layer's output tensor ('-' if it has none, e.g. shared layers).
      params: parameter count.
      notes: sensitivity marks; a leading '!!' means a problem.
    """

    name: str
    cls: str
    compute_dtype: str
    variable_dtype: str
    output_dtype: str
    params: int
    notes: Tuple[str, ...] = ()

    @property
    def flagged(self) -> bool:
        return any(note.startswith("!!") for note in self.notes)


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The audit of one model under one policy; ``ok`` is False when an output is not float32."""

    model: str
    policy: str
    rows: Tuple[LayerRow, ...]
    bad_outputs: Tuple[Tuple[str, str], ...]

    @property
    def ok(self) -> bool:
        return not self.bad_outputs


def statistics_dtypes(layer: keras.layers.Layer, input_shape: Sequence[Optional[int]],
                      input_dtype: str) -> List[str]:
    """The dtypes a normalisation layer computes its mean/variance in (read from its graph).

    The layer is traced once in training mode on a symbolic input; nothing is executed, so
    the layer's state (e.g. BatchNorm moving statistics) is not changed.
    """
    shape = [2 if dim is None else dim for dim in input_shape]
    concrete = tf.function(lambda x: layer(x, training=True)).get_concrete_function(
        tf.TensorSpec(shape, input_dtype))
    found = set()
    for op in concrete.graph.get_operations():
        attr = _STATISTICS_OPS.get(op.type)
        if attr:
            found.add(tf.as_dtype(op.get_attr(attr)).name)
    return sorted(found)


def _output_dtype(layer) -> str:
    try:
        outputs = tf.nest.flatten(layer.output)
    except (AttributeError, RuntimeError):  # Shared layers have no single output.
        return "-"
    # tf.as_dtype: Keras 3's symbolic tensors give their dtype as a string.
    return ",".join(sorted({tf.as_dtype(t.dtype).name for t in outputs}))


def _is_softmax(layer) -> bool:
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", "")
    return isinstance(layer, keras.layers.Softmax) or name in ("softmax", "log_softmax")


def audit_model(model: keras.Model, *, policy: str, sample: tf.Tensor) -> AuditReport:
    """Inspects ``model`` (built under ``policy``) and runs it once on ``sample``.

    Marks with '!!' the numerically sensitive layers that run in 16 bits: a softmax, a model
    output, normalisation statistics or variables.
    """
    outputs = tf.nest.flatten(model(sample, training=False))
    output_layer_names = set()
    for tensor in tf.nest.flatten(getattr(model, "outputs", None) or []):
        layer = compat.producing_layer(tensor)
        if layer is not None:
            output_layer_names.add(layer.name)
    rows = []
    for layer, dtypes in zip(model.layers, precision.layer_dtypes(model)):
        notes = []
        out_dtype = _output_dtype(layer)
        if layer.name in output_layer_names:
            if out_dtype == "float32":
                notes.append("model output (float32, feeds the loss)")
            else:
                notes.append(f"!! model output in {out_dtype}: feeds the loss; give the layer "
                             "dtype='float32'")
        if _is_softmax(layer) and layer.compute_dtype in _LOW_PRECISION:
            notes.append(f"!! softmax computed in {layer.compute_dtype}")
        if isinstance(layer, keras.layers.MultiHeadAttention) and (
                layer.compute_dtype in _LOW_PRECISION):
            # Usual practice (and Keras'): the attention softmax stays in 16 bits; it is not
            # fed to the loss, so it is noted, not flagged.
            notes.append(f"attention softmax in {layer.compute_dtype}")
        if isinstance(layer, _NORMALIZATION):
            if layer.variable_dtype in _LOW_PRECISION:
                notes.append(f"!! normalisation variables in {layer.variable_dtype}")
            try:
                stats = statistics_dtypes(layer, layer.input.shape,
                                          tf.as_dtype(layer.input.dtype).name)
            except (AttributeError, RuntimeError, ValueError):
                stats = []
            low = [d for d in stats if d in _LOW_PRECISION]
            if low:
                notes.append(f"!! statistics computed in {','.join(low)}")
            elif stats:
                notes.append(f"statistics in {','.join(stats)}")
        rows.append(LayerRow(dtypes["name"], dtypes["class"], str(dtypes["compute_dtype"]),
                             str(dtypes["variable_dtype"]), out_dtype, layer.count_params(),
                             tuple(notes)))
    names = precision.output_names(model, len(outputs))
    bad = tuple((name, t.dtype.name) for name, t in zip(names, outputs) if t.dtype != tf.float32)
    return AuditReport(model.name, policy, tuple(rows), bad)


def format_table(report: AuditReport) -> str:
    """The audit as a fixed-width text table plus a one-line verdict."""
    header = ("layer", "class", "compute", "variables", "output", "params", "notes")
    body = [(r.name, r.cls, r.compute_dtype, r.variable_dtype, r.output_dtype, f"{r.params:,}",
             "; ".join(r.notes)) for r in report.rows]
    lines = console.format_table(header, body, right={5}).split("\n")
    total = sum(r.params for r in report.rows)
    flagged = sum(r.flagged for r in report.rows)
    lines.append("-" * len(lines[0]))
    lines.append(f"{len(report.rows)} layers, {total:,} parameters, {flagged} flagged (!!)")
    lines.append(verdict(report))
    return "\n".join(lines)


def verdict(report: AuditReport) -> str:
    """One line: OK, or which output is not float32 and the fix."""
    if report.ok:
        return f"audit OK: model {report.model!r} under {report.policy}: every output is float32"
    name, dtype = report.bad_outputs[0]
    return (f"audit FAILED: model {report.model!r} output {name!r} is {dtype} under "
            f"{report.policy}; outputs must be float32: give that layer dtype='float32'")


def audit(config: TrainConfig) -> AuditReport:
    """Builds ``config.model`` under ``config.policy`` and audits it (no data is loaded)."""
    registry.check_model_args(config.model, config.model_args)
    input_shape, num_classes = data.dataset_shapes(
        config.dataset, config.data_dir, image_size=config.image_size,
        num_classes=config.num_classes, label_offset=config.label_offset)
    keras.utils.set_random_seed(config.seed)
    with precision.policy_scope(config.policy):
        model = registry.build_model(config.model, input_shape=input_shape,
                                     num_classes=num_classes, model_args=config.model_args)
    sample = tf.zeros((1,) + input_shape, tf.float32)
    return audit_model(model, policy=config.policy, sample=sample)


def run(config: TrainConfig) -> int:
    """Prints the audit table; returns 1 when a model output is not float32, else 0."""
    report = audit(config)
    print(f"precision audit: model {config.model} ({config.dataset} shapes), policy {config.policy}")
    print(format_table(report), flush=True)
    return 0 if report.ok else 1
