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

Where each part lives: this module runs the inspector on a Trainer (``run.py --numerics``,
``--numerics_every``) and prints its report; ``trainer/tools/numerics/measure.py`` computes the
per-layer statistics and the recommendation (re-exported here), ``trainer/tools/numerics/passes.py``
runs the two forward and backward passes.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Type

from trainer import compat, registry
from trainer.compat import tf
from trainer.config import TrainConfig
from trainer.core import optimizers, precision
from trainer.core.steps import Trainer
from trainer.errors import UserError
from trainer.loop.actions import PeriodicAction
from trainer.outputs import console, files
from trainer.runtime import devices, distribution
from trainer.tools.numerics.measure import (FLUSH_TOLERANCE, HEADROOM_LIMIT, LIMITS, LOW_PRECISION,
                                            MAX_LOG2_SCALE, LayerNumerics, Limits, NumericsReport,
                                            gradient_fractions, inspect, relative_error, scale_text)

__all__ = [
    "FLUSH_TOLERANCE", "HEADROOM_LIMIT", "LIMITS", "LOW_PRECISION", "MAX_LOG2_SCALE", "Inspector",
    "LayerNumerics", "Limits", "NumericsReport", "format_report", "gradient_fractions", "inspect",
    "periodic_action", "relative_error", "run", "verdict",
]


# ---------------------------------------------------------------------- the printed report


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
    lines = [console.format_table(header, body, right=range(3, 10))]
    width = len(lines[0].splitlines()[1])
    lines.append("-" * width)
    totals = report.totals()
    lines.append(f"{len(report.rows)} layers, {len(report.flagged)} flagged (!!)")
    if report.low_dtypes:
        safe = ("no loss scale avoids both" if report.scale_range is None else
                f"loss scales {scale_text(report.scale_range[0])} to "
                f"{scale_text(report.scale_range[1])} avoid both; recommended "
                + ("--loss_scale=none (nothing underflows unscaled)"
                   if report.recommended_loss_scale == 1 else
                   f"--loss_scale={scale_text(report.recommended_loss_scale)}"))
        lines.append(
            f"gradients in {'/'.join(report.low_dtypes)} at loss scale "
            f"{scale_text(report.loss_scale)} ({report.loss_scale_mode}): "
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
        local = [trainer.strategy.experimental_local_results(v)[0]
                 for v in compat.weights(trainer.model)]
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
    files.check_outputs(metrics_file=config.metrics_file, model_dir=None)
    distribution.prepare(config)
    device = devices.select_device(config.device, policy=config.policy)
    cluster = distribution.setup(config, device)
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
        files.write_json(config.metrics_file, report.as_json())
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
