"""The numerics inspector (``run.py --numerics``): which layers lose precision under a policy, and why.

From identical weights and the same real batch (the first training batch, cut to what one
replica's step computes), the model runs forward and backward twice: under the run's policy
(the loss scaled as the train step scales it) and under float32. Per layer it reports:

- the relative error (L2 norm) of the layer's output and of its weight gradients vs float32;
  errors accumulate, so a layer's error includes every earlier layer's;
- headroom: the largest |activation| (float32 run) as a fraction of the largest finite value
  of the layer's output dtype (float16: 65504); near or above 1 the 16-bit output overflows;
- the gradient values (weight gradients and the gradient of the layer's output, the tensors
  the 16-bit backward pass carries) that flush to zero, become subnormal or overflow in that
  dtype at the current loss scale. Predicted from the float32 gradients: a value ``g`` is lost
  when ``|g * scale|`` rounds to zero, so each layer's loss is its own, not inherited;
- the typical optimizer update relative to the weight (``lr * |g|`` for SGD, ``lr`` for the
  normalised steps of Adam and RMSprop) against the dtype's unit roundoff: updates a pure
  16-bit weight would round away. Information only: under ``mixed_*`` policies the master
  weights are float32.

The loss scales at which no layer loses more than ``FLUSH_TOLERANCE`` of its gradient values
and none overflows give the recommended ``--loss_scale``.

Limits: layer outputs are taken with call hooks on the model's top-level layers (``model.layers``),
so a functional or Sequential model is inspected layer by layer and a subclassed model down to
the layers it holds as attributes; a nested model counts as one layer. Dropout-like layers (at
any depth) run as the identity in both passes, so both compute the same function;
BatchNormalization uses batch statistics, as in training. ``build_model`` is called twice more
to build the two copies the passes run on, so the training model's state is never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple, Type

import numpy as np

from trainer import devices, distribute, optimizers, precision, registry, reporting
from trainer.actions import PeriodicAction
from trainer.compat import keras, tf
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class Limits:
    """A floating-point format: largest finite, smallest normal and subnormal, unit roundoff."""

    max: float
    tiny: float
    subnormal: float
    roundoff: float

    @property
    def overflow_at(self) -> float:
        """The smallest magnitude that rounds to infinity (max plus half its spacing)."""
        return self.max * (1 + self.roundoff / (2 - 2 * self.roundoff))


LIMITS = {
    "float16": Limits(65504.0, 2.0 ** -14, 2.0 ** -24, 2.0 ** -11),
    "bfloat16": Limits((2 - 2.0 ** -7) * 2.0 ** 127, 2.0 ** -126, 2.0 ** -133, 2.0 ** -8),
    "float32": Limits((2 - 2.0 ** -23) * 2.0 ** 127, 2.0 ** -126, 2.0 ** -149, 2.0 ** -24),
}
LOW_PRECISION = ("float16", "bfloat16")
# A layer is flagged when more than this fraction of its nonzero gradient values flush to zero.
FLUSH_TOLERANCE = 0.01
# ... or when its largest |activation| exceeds this fraction of its dtype's largest finite value.
HEADROOM_LIMIT = 0.25
# Loss scales searched for the recommendation: 2**0 .. 2**126 (the --loss_scale range).
MAX_LOG2_SCALE = 126
# The recommendation sits at most this many powers of two above the lowest safe scale: room
# for gradients to shrink as training goes on, far from overflow.
_RECOMMEND_MARGIN = 8
_NOISE_LAYERS = tuple(getattr(keras.layers, name) for name in (
    "Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout") if hasattr(keras.layers, name))
_NORMALISED_OPTIMIZERS = ("adam", "adamw", "adamax", "nadam", "rmsprop", "adagrad", "adadelta",
                          "adafactor", "lion", "ftrl")


@dataclasses.dataclass
class LayerNumerics:
    """One row of the report; None where a value does not apply (e.g. no weights)."""

    name: str
    cls: str
    dtype: str
    output_error: Optional[float] = None
    gradient_error: Optional[float] = None
    headroom: Optional[float] = None
    max_abs_activation: Optional[float] = None
    gradient_values: int = 0
    flush_fraction: Optional[float] = None
    subnormal_fraction: Optional[float] = None
    overflow_fraction: Optional[float] = None
    update_ratio: Optional[float] = None
    lost_update_fraction: Optional[float] = None
    notes: List[str] = dataclasses.field(default_factory=list)
    # Sorted nonzero |gradient| values (float32 pass), for the loss-scale search.
    magnitudes: np.ndarray = dataclasses.field(default=None, repr=False)

    @property
    def flagged(self) -> bool:
        return any(note.startswith("!!") for note in self.notes)

    def as_json(self) -> dict:
        row = {k: _json_number(v) for k, v in dataclasses.asdict(self).items()
               if k != "magnitudes"}
        row["flagged"] = self.flagged
        return row


@dataclasses.dataclass
class NumericsReport:
    """The inspection of one model under one policy, on one batch."""

    model: str
    policy: str
    loss_scale: float
    loss_scale_mode: str
    examples: int
    optimizer: str
    learning_rate: float
    rows: List[LayerNumerics]
    scale_range: Optional[Tuple[float, float]] = None  # Safe loss scales (powers of 2), or None.
    recommended_loss_scale: Optional[float] = None
    low_dtypes: Tuple[str, ...] = ()

    @property
    def flagged(self) -> List[LayerNumerics]:
        return [row for row in self.rows if row.flagged]

    def totals(self) -> Dict[str, float]:
        """Whole-model fractions over the 16-bit layers' gradient values, and max headroom."""
        low = [r for r in self.rows if r.dtype in LOW_PRECISION and r.gradient_values]
        count = sum(r.gradient_values for r in low)

        def fraction(field):
            return sum(getattr(r, field) * r.gradient_values for r in low) / count if count else 0.0

        headrooms = [r.headroom for r in self.rows if r.headroom is not None]
        return {"gradient_underflow_fraction": fraction("flush_fraction"),
                "gradient_subnormal_fraction": fraction("subnormal_fraction"),
                "gradient_overflow_fraction": fraction("overflow_fraction"),
                "max_activation_headroom": max(headrooms, default=0.0),
                "loss_scale": self.loss_scale,
                "flagged_layers": float(len(self.flagged))}

    def as_json(self) -> dict:
        return {"model": self.model, "policy": self.policy, "loss_scale": self.loss_scale,
                "loss_scale_mode": self.loss_scale_mode, "examples": self.examples,
                "optimizer": self.optimizer, "learning_rate": self.learning_rate,
                "loss_scale_range": list(self.scale_range) if self.scale_range else None,
                "recommended_loss_scale": self.recommended_loss_scale,
                "totals": {k: _json_number(v) for k, v in self.totals().items()},
                "flagged": [r.name for r in self.flagged],
                "layers": [r.as_json() for r in self.rows]}


def _json_number(value):
    # JSON has no Inf/NaN: say it in words rather than write invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ---------------------------------------------------------------------- the two passes


def _top_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _set_call(layer, make):
    """Replaces ``layer.call`` on the instance (Keras' ``__call__`` looks it up per call)."""
    previous = layer.__dict__.get("call")
    object.__setattr__(layer, "call", make(layer.call))
    return layer, previous


@contextlib.contextmanager
def _hooks(model: keras.Model, top: list, sinks: List[list]):
    """Records each top-level layer's outputs in ``sinks``; noise layers run as identity."""
    patched = []

    def without_noise(original):
        @functools.wraps(original)
        def call(*args, **kwargs):
            if len(args) > 1:  # (inputs, training) passed positionally.
                args = (args[0], False) + tuple(args[2:])
            else:
                kwargs["training"] = False
            return original(*args, **kwargs)
        return call

    def recording(sink):
        def make(original):
            @functools.wraps(original)
            def call(*args, **kwargs):
                outputs = original(*args, **kwargs)
                sink.append(outputs)
                return outputs
            return call
        return make

    try:
        for layer in model.submodules:
            if isinstance(layer, _NOISE_LAYERS):
                patched.append(_set_call(layer, without_noise))
        for layer, sink in zip(top, sinks):
            patched.append(_set_call(layer, recording(sink)))
        yield
    finally:
        for layer, previous in reversed(patched):
            object.__delattr__(layer, "call")
            if previous is not None:
                object.__setattr__(layer, "call", previous)


def _floating(outputs) -> list:
    return [t for t in tf.nest.flatten(outputs)
            if isinstance(t, tf.Tensor) and t.dtype.is_floating]


@dataclasses.dataclass
class _Pass:
    outputs: List[list]  # Per top-level layer: its floating output tensors, every call.
    weight_grads: List[list]  # Per layer: unscaled float32 gradients of its trainable weights.
    output_grads: List[list]  # Per layer: unscaled gradients of its outputs.
    weights: List[list]


def _run_pass(model, compute_loss, features, labels, *, scale: float, divisor: float,
              regularization_divisor: float, auto_cast: bool) -> _Pass:
    """One forward and backward pass, the loss built as ``Trainer._gradients_fn`` builds it."""
    top = _top_layers(model)
    sinks: List[list] = [[] for _ in top]
    with _hooks(model, top, sinks), tf.GradientTape() as tape:
        outputs = model(features, training=True)
        if auto_cast:
            outputs = precision.cast_outputs(outputs)
        loss = tf.reduce_sum(compute_loss(labels, outputs)) / divisor
        if model.losses:
            loss += tf.add_n(model.losses) / regularization_divisor
        scaled = loss * scale
    acts = [[t for out in sink for t in _floating(out)] for sink in sinks]
    weights = [list(layer.trainable_weights) for layer in top]
    w_grads, a_grads = tape.gradient(scaled, (weights, acts))

    def unscale(grads):
        return [[None if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32) / scale
                 for g in per_layer] for per_layer in grads]

    return _Pass(acts, unscale(w_grads), unscale(a_grads), weights)


def _flat64(tensors) -> np.ndarray:
    parts = [tf.reshape(tf.cast(t, tf.float64), [-1]).numpy() for t in tensors if t is not None]
    return np.concatenate(parts) if parts else np.zeros(0)


def relative_error(values: Sequence, reference: Sequence) -> Optional[float]:
    """``||values - reference|| / ||reference||`` (L2, float64); inf when ``values`` is not finite."""
    a, b = _flat64(values), _flat64(reference)
    if not b.size or a.shape != b.shape:
        return None
    if not np.all(np.isfinite(a)):
        return math.inf
    diff, norm = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
    return diff / norm if norm else (0.0 if diff == 0 else math.inf)


def gradient_fractions(magnitudes: np.ndarray, limits: Limits, scale: float):
    """(flushed, subnormal, overflowed) fractions of the sorted nonzero ``magnitudes`` x scale."""
    n = magnitudes.size
    if not n:
        return 0.0, 0.0, 0.0
    # Round to nearest even: |x| <= half the smallest subnormal becomes 0.
    flushed = np.searchsorted(magnitudes, limits.subnormal / 2 / scale, side="right")
    below_normal = np.searchsorted(magnitudes, limits.tiny / scale, side="left")
    overflowed = n - np.searchsorted(magnitudes, limits.overflow_at / scale, side="left")
    return flushed / n, (below_normal - flushed) / n, overflowed / n


def _update_ratio(weights, grads, *, learning_rate: float, normalised: bool, momentum: float,
                  roundoff: float):
    """Median of update/|weight| over nonzero weights, and the fraction below ``roundoff``."""
    w = np.abs(_flat64([tf.convert_to_tensor(v) for v in weights]))
    g = np.abs(_flat64(grads))
    if not w.size or w.shape != g.shape:
        return None, None
    keep = w > 0
    if not keep.any():
        return None, None
    update = (np.full(w.shape, learning_rate) if normalised
              else learning_rate * g / (1.0 - momentum))
    ratio = update[keep] / w[keep]
    return float(np.median(ratio)), float(np.mean(ratio < roundoff))


# ---------------------------------------------------------------------- the report


def inspect(policy_model: keras.Model, reference_model: keras.Model, *, compute_loss, features,
            labels, policy: str, loss_scale: float = 1.0, loss_scale_mode: str = "none",
            divisor: Optional[float] = None, regularization_divisor: float = 1.0,
            learning_rate: float = 1e-3, optimizer: str = "adam", momentum: float = 0.0,
            auto_cast: bool = False, model_name: Optional[str] = None) -> NumericsReport:
    """Runs both passes and builds the per-layer report.

    Args:
      policy_model, reference_model: the same architecture built under ``policy`` and under
        float32, holding the same weights.
      compute_loss: ``(labels, outputs) -> per-example float32 loss``.
      features, labels: one batch.
      loss_scale: the scale the policy pass multiplies the loss by (the train step's).
      divisor: the per-example losses' sum is divided by it (default: the batch size).
      optimizer: a name; Adam-like ones take normalised steps of about ``learning_rate``.
    """
    examples = int(tf.nest.flatten(labels)[0].shape[0])
    kwargs = dict(divisor=float(divisor or examples), regularization_divisor=regularization_divisor,
                  auto_cast=auto_cast)
    ref = _run_pass(reference_model, compute_loss, features, labels, scale=1.0, **kwargs)
    low = _run_pass(policy_model, compute_loss, features, labels, scale=float(loss_scale), **kwargs)
    normalised = optimizer.lower() in _NORMALISED_OPTIMIZERS
    # Would a weight stored in the policy's compute dtype keep the update?
    policy_roundoff = LIMITS[precision.POLICY_COMPUTE_DTYPES.get(policy, "float32")].roundoff
    rows = []
    for i, layer in enumerate(_top_layers(policy_model)):
        dtypes = sorted({t.dtype.name for t in low.outputs[i]})
        row = LayerNumerics(layer.name, type(layer).__name__, ",".join(dtypes) or "-")
        rows.append(row)
        if not ref.outputs[i]:
            row.notes.append("not called on this batch" if not dtypes else "no float output")
            continue
        dtype = max(dtypes, key=lambda d: LIMITS.get(d, LIMITS["float32"]).roundoff)
        limits = LIMITS.get(dtype, LIMITS["float32"])
        row.output_error = relative_error(low.outputs[i], ref.outputs[i])
        if ref.weight_grads[i]:
            row.gradient_error = relative_error(low.weight_grads[i], ref.weight_grads[i])
            row.update_ratio, row.lost_update_fraction = _update_ratio(
                ref.weights[i], ref.weight_grads[i], learning_rate=learning_rate,
                normalised=normalised, momentum=momentum, roundoff=policy_roundoff)
        row.max_abs_activation = float(np.max(np.abs(_flat64(ref.outputs[i])), initial=0.0))
        row.headroom = row.max_abs_activation / limits.max
        grads = np.abs(_flat64(ref.weight_grads[i] + ref.output_grads[i]))
        row.magnitudes = np.sort(grads[grads > 0])
        row.gradient_values = int(row.magnitudes.size)
        row.flush_fraction, row.subnormal_fraction, row.overflow_fraction = gradient_fractions(
            row.magnitudes, limits, float(loss_scale))
    low_dtypes = tuple(sorted({r.dtype for r in rows if r.dtype in LOW_PRECISION}))
    scale_range, recommended = _recommend(rows)
    report = NumericsReport(model_name or policy_model.name, policy, float(loss_scale),
                            loss_scale_mode, examples, optimizer, float(learning_rate), rows,
                            scale_range, recommended, low_dtypes)
    for row in rows:
        _annotate(row, report, lost_updates_matter=not precision.is_mixed(policy)
                  and policy != "float32")
    return report


def _recommend(rows) -> Tuple[Optional[Tuple[float, float]], Optional[float]]:
    """Safe loss scales (powers of 2) for every 16-bit layer at once, and the one to use."""
    low = [r for r in rows if r.dtype in LOW_PRECISION and r.magnitudes is not None]
    if not low:
        return None, None
    safe_low, safe_high = None, None
    for k in range(MAX_LOG2_SCALE + 1):
        fractions = [gradient_fractions(r.magnitudes, LIMITS[r.dtype], 2.0 ** k) for r in low]
        if safe_low is None and all(f[0] <= FLUSH_TOLERANCE for f in fractions):
            safe_low = k
        if all(f[2] == 0 for f in fractions):
            safe_high = k
    if safe_low is None or safe_high is None or safe_low > safe_high:
        return None, None
    if safe_low == 0 and all(r.dtype == "bfloat16" for r in low):
        best = 0  # bfloat16 has float32's exponent range: no scaling needed.
    else:
        best = min((safe_low + safe_high) // 2, safe_low + _RECOMMEND_MARGIN)
    return (2.0 ** safe_low, 2.0 ** safe_high), 2.0 ** best


def _scale_text(scale: Optional[float]) -> str:
    if scale is None:
        return "-"
    return f"{scale:.0f}" if scale < 2 ** 24 else f"2**{int(math.log2(scale))}"


def _annotate(row: LayerNumerics, report: NumericsReport, *, lost_updates_matter: bool) -> None:
    """Adds the row's notes; '!!' marks a problem and says the fix."""
    if row.dtype not in LOW_PRECISION:
        return
    dtype, limits = row.dtype, LIMITS[row.dtype]
    scale = _scale_text(report.loss_scale)
    fix_scale = (f"use --loss_scale={_scale_text(report.recommended_loss_scale)}"
                 if report.recommended_loss_scale else
                 "no single loss scale fits every layer: keep this layer in float32 "
                 "(dtype='float32')")
    if row.headroom is not None and row.headroom >= HEADROOM_LIMIT:
        what = "overflows" if row.max_abs_activation >= limits.overflow_at else "is near"
        row.notes.append(f"!! output {what} {dtype}'s max: |x| up to {row.max_abs_activation:.3g} "
                         f"({row.headroom:.0%} of {limits.max:.6g}); keep this layer in float32 "
                         "(dtype='float32')")
    elif row.output_error == math.inf:
        row.notes.append(f"not finite in {dtype}: an earlier layer overflowed")
    if row.flush_fraction and row.flush_fraction > FLUSH_TOLERANCE:
        row.notes.append(f"!! {row.flush_fraction:.1%} of gradient values flush to zero in "
                         f"{dtype} at loss scale {scale}; {fix_scale}")
    if row.overflow_fraction:
        if report.loss_scale_mode == "dynamic":
            row.notes.append(f"gradients overflow at the initial scale {scale}: the dynamic "
                             "scale halves on the first steps (they are skipped)")
        else:
            row.notes.append(f"!! {row.overflow_fraction:.2%} of gradient values overflow "
                             f"{dtype} at loss scale {scale}; {fix_scale}")
    if row.lost_update_fraction and row.lost_update_fraction >= 0.5:
        mark = "!! " if lost_updates_matter else "info: "
        row.notes.append(f"{mark}{row.lost_update_fraction:.0%} of updates are below {dtype}'s "
                         "rounding of the weight" + ("" if lost_updates_matter else
                                                     " (master weights are float32 here)"))


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def format_report(report: NumericsReport) -> str:
    """The report as a fixed-width table, a line on loss scales and a one-line verdict."""
    header = ("layer", "class", "dtype", "out err", "grad err", "|x|/max", "g->0", "g subn",
              "g inf", "upd/|w|", "notes")
    body = [(r.name, r.cls, r.dtype, _fmt(r.output_error, ".1e"), _fmt(r.gradient_error, ".1e"),
             _fmt(r.headroom, ".1e"), _fmt(r.flush_fraction, ".2%"),
             _fmt(r.subnormal_fraction, ".2%"), _fmt(r.overflow_fraction, ".2%"),
             _fmt(r.update_ratio, ".1e"), "; ".join(r.notes)) for r in report.rows]
    lines = [reporting.format_table(header, body, right=range(3, 10))]
    width = len(lines[0].splitlines()[1])
    lines.append("-" * width)
    totals = report.totals()
    lines.append(f"{len(report.rows)} layers, {len(report.flagged)} flagged (!!)")
    if report.low_dtypes:
        safe = ("no loss scale avoids both" if report.scale_range is None else
                f"loss scales {_scale_text(report.scale_range[0])} to "
                f"{_scale_text(report.scale_range[1])} avoid both; recommended "
                + ("--loss_scale=none (nothing underflows unscaled)"
                   if report.recommended_loss_scale == 1 else
                   f"--loss_scale={_scale_text(report.recommended_loss_scale)}"))
        lines.append(
            f"gradients in {'/'.join(report.low_dtypes)} at loss scale "
            f"{_scale_text(report.loss_scale)} ({report.loss_scale_mode}): "
            f"{totals['gradient_underflow_fraction']:.2%} flush to zero, "
            f"{totals['gradient_subnormal_fraction']:.2%} subnormal, "
            f"{totals['gradient_overflow_fraction']:.2%} overflow; {safe}")
    lines.append(verdict(report))
    return "\n".join(lines)


def verdict(report: NumericsReport) -> str:
    """One line: OK, or the flagged layers."""
    if not report.flagged:
        return (f"numerics OK: model {report.model!r} under {report.policy}: no layer past "
                "the thresholds")
    names = ", ".join(repr(r.name) for r in report.flagged)
    return (f"numerics FLAGGED: model {report.model!r} under {report.policy}: "
            f"{len(report.flagged)} layer(s) past the thresholds: {names} (see their notes)")


# ---------------------------------------------------------------------- from a Trainer


def _optimizer_info(trainer: Trainer) -> Tuple[str, float, float]:
    inner = trainer.loss_scaler.inner_optimizer
    name = type(inner).__name__.lower()
    learning_rate = optimizers.current_learning_rate(trainer.optimizer)
    if learning_rate <= 0:  # Step 0 of a warm-up: judge the peak rate instead.
        learning_rate = trainer.config.learning_rate
    momentum = float(getattr(inner, "momentum", 0.0) or 0.0) if name == "sgd" else 0.0
    return name, learning_rate, momentum


class Inspector:
    """Inspects a Trainer's model on its first training batch, as one replica's step sees it.

    Two copies of the model (the run's policy and float32) are built once with the Trainer's
    own ``build_model``, outside any distribution strategy, and loaded with the training
    model's weights (this worker's local values: no collective) before each inspection.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self._models = None
        self._batch = None

    def _build(self):
        trainer, config = self.trainer, self.trainer.config
        models = []
        for policy in (config.policy, "float32"):
            with precision.policy_scope(policy):
                models.append(trainer.build_model())
        sample = tf.zeros((1,) + tuple(trainer.datasets.input_shape), tf.float32)
        for model in models:
            model(sample, training=False)  # Builds a subclassed model's weights, as the Trainer does.
            if len(model.weights) != len(trainer.model.weights):
                raise UserError(
                    f"--numerics: {type(trainer).__name__}.build_model returned a model with "
                    f"{len(model.weights)} weights on a second call, {len(trainer.model.weights)} "
                    "on the first; it must build the same model each time")
        features, labels = next(iter(trainer.datasets.train))[:2]
        replicas = trainer.strategy.num_replicas_in_sync
        per_step = max(config.batch_size // (replicas * config.grad_accum_steps), 1)
        self._batch = tf.nest.map_structure(lambda t: t[:per_step], (features, labels))
        self._models = models

    def report(self, loss_scale: Optional[float] = None) -> NumericsReport:
        """Loads the current weights and inspects; ``loss_scale`` defaults to the trainer's."""
        trainer, config = self.trainer, self.trainer.config
        if self._models is None:
            self._build()
        local = [trainer.strategy.experimental_local_results(v)[0] for v in trainer.model.weights]
        for model in self._models:
            for target, value in zip(model.weights, local):
                target.assign(tf.convert_to_tensor(value))
        name, learning_rate, momentum = _optimizer_info(trainer)
        features, labels = self._batch
        return inspect(
            *self._models, compute_loss=trainer.compute_loss, features=features, labels=labels,
            policy=config.policy,
            loss_scale=trainer.loss_scale if loss_scale is None else loss_scale,
            loss_scale_mode=str(config.resolved_loss_scale) if isinstance(
                config.resolved_loss_scale, str) else "fixed",
            divisor=config.batch_size,
            regularization_divisor=config.grad_accum_steps * trainer.strategy.num_replicas_in_sync,
            learning_rate=learning_rate, optimizer=name, momentum=momentum,
            auto_cast=config.auto_cast_outputs, model_name=trainer.model_name)


def run(config: TrainConfig, *, trainer_cls: Type[Trainer] = Trainer) -> int:
    """``run.py --numerics``: prints the report; returns 1 when a layer is flagged, else 0.

    The Trainer is built as a training run builds it (device, strategy, the subclass's hooks),
    on one worker; ``--metrics_file`` receives the report as JSON, one entry per layer.
    """
    if trainer_cls is Trainer:
        registry.check_model_args(config.model, config.model_args)
    reporting.check_outputs(metrics_file=config.metrics_file, model_dir=None)
    distribute.prepare(config)
    device = devices.select_device(config.device, policy=config.policy)
    cluster = distribute.setup(config, device)
    if cluster.num_workers > 1:
        raise UserError("--numerics inspects one batch in one process; run it without mpirun or "
                        "trainer.launch (any --distribution on one worker is fine)")
    trainer = trainer_cls(config, strategy=cluster.strategy)
    report = Inspector(trainer).report()
    if config.verbose:
        print(f"numerics: model {report.model} under {config.policy} vs float32, first training "
              f"batch ({report.examples} examples), {device.description}, {report.optimizer} "
              f"lr={report.learning_rate:g}", flush=True)
    print(format_report(report), flush=True)
    if config.metrics_file:
        reporting.write_json(config.metrics_file, report.as_json())
    return 1 if report.flagged else 0


def periodic_action(trainer: Trainer, summaries, lockstep) -> PeriodicAction:
    """``--numerics_every=N``: every N steps, the inspector's totals go to TensorBoard.

    It runs after the step loop, outside the compiled step, on one batch (the first training
    batch; the training stream is not read). Only the chief computes and writes: it reads its
    local weight values and runs no collective, which ``lockstep.chief_only`` enforces.

    Raises:
      UserError: no ``--model_dir`` to write the summaries into.
    """
    config = trainer.config
    if not config.model_dir:
        raise UserError(f"--numerics_every={config.numerics_every} writes TensorBoard summaries "
                        "into --model_dir; pass --model_dir=DIR")
    inspector = Inspector(trainer)

    def log(step: int, now: float) -> None:
        del now
        scale = trainer.loss_scale  # Every worker reads it alike, outside chief-only code.
        with lockstep.chief_only() as chief:
            if not (chief and summaries.enabled):
                return
            totals = inspector.report(loss_scale=scale).totals()
            summaries.scalars("train", step, {f"numerics/{k}": v for k, v in totals.items()})
            summaries.flush()

    return PeriodicAction(log, every_steps=config.numerics_every, name="numerics")
