"""The inspector's measurement: per-layer errors, headroom, lost gradients and updates; loss scales.

:func:`inspect` compares the two passes layer by layer, searches the safe loss scales and
writes each layer's notes.

``trainer/tools/numerics/__init__.py`` runs it on a Trainer and prints the report (:class:`NumericsReport`);
the passes it compares are in ``trainer/tools/numerics/passes.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from trainer.compat import keras, tf
from trainer.core import precision
from trainer.tools.numerics.passes import flat64, run_pass, top_layers


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


# ---------------------------------------------------------------------- per-layer statistics


def relative_error(values: Sequence, reference: Sequence) -> Optional[float]:
    """``||values - reference|| / ||reference||`` (L2, float64); inf when ``values`` is not finite."""
    a, b = flat64(values), flat64(reference)
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
    w = np.abs(flat64([tf.convert_to_tensor(v) for v in weights]))
    g = np.abs(flat64(grads))
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
    ref = run_pass(reference_model, compute_loss, features, labels, scale=1.0, **kwargs)
    low = run_pass(policy_model, compute_loss, features, labels, scale=float(loss_scale), **kwargs)
    normalised = optimizer.lower() in _NORMALISED_OPTIMIZERS
    # Would a weight stored in the policy's compute dtype keep the update?
    policy_roundoff = LIMITS[precision.POLICY_COMPUTE_DTYPES.get(policy, "float32")].roundoff
    rows = []
    for i, layer in enumerate(top_layers(policy_model)):
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
        row.max_abs_activation = float(np.max(np.abs(flat64(ref.outputs[i])), initial=0.0))
        row.headroom = row.max_abs_activation / limits.max
        grads = np.abs(flat64(ref.weight_grads[i] + ref.output_grads[i]))
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


def scale_text(scale: Optional[float]) -> str:
    """A loss scale as the flag takes it: '128', or '2**40' for a large one; '-' for None."""
    if scale is None:
        return "-"
    return f"{scale:.0f}" if scale < 2 ** 24 else f"2**{int(math.log2(scale))}"


def _annotate(row: LayerNumerics, report: NumericsReport, *, lost_updates_matter: bool) -> None:
    """Adds the row's notes; '!!' marks a problem and says the fix."""
    if row.dtype not in LOW_PRECISION:
        return
    dtype, limits = row.dtype, LIMITS[row.dtype]
    scale = scale_text(report.loss_scale)
    fix_scale = (f"use --loss_scale={scale_text(report.recommended_loss_scale)}"
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
