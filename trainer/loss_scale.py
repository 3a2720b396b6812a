"""Loss scaling: one path through the train step that costs nothing when it is off.

The idea is PyTorch's ``GradScaler(enabled=...)``: the Trainer always calls ``scale_loss``,
``unscale_gradients`` and ``apply_gradients``; when scaling is off they pass values through
and the optimizer is not wrapped, so nothing is added to the graph.
"""

from __future__ import annotations

from typing import Sequence, Union

from trainer.compat import mixed_precision, tf


def all_finite(gradients: Sequence[tf.Tensor]) -> tf.Tensor:
    """A scalar bool: True when every gradient value is finite."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients if g is not None])


class LossScaler:
    """Wraps an optimizer in Keras 2's ``LossScaleOptimizer`` when ``mode`` asks for it.

    Args:
      optimizer: the inner Keras 2 optimizer.
      mode: 'dynamic' (start at 2**15, halve on overflow, double after ``growth_steps``
        finite steps), 'none' (no wrapper), or a positive float (a fixed scale).
      growth_steps: finite steps before a dynamic scale doubles.
    """

    def __init__(self, optimizer, *, mode: Union[str, float], growth_steps: int = 2000):
        if mode not in ("dynamic", "none") and not (isinstance(mode, float) and mode > 0):
            raise ValueError(f"mode must be 'dynamic', 'none' or a positive float, got {mode!r}")
        self.mode = mode
        self.enabled = mode != "none"
        self.dynamic = mode == "dynamic"
        self.inner_optimizer = optimizer
        if self.enabled:
            kwargs = {"dynamic": True, "dynamic_growth_steps": growth_steps}
            if not self.dynamic:
                kwargs = {"dynamic": False, "initial_scale": float(mode)}
            self.optimizer = mixed_precision.LossScaleOptimizer(optimizer, **kwargs)
        else:
            self.optimizer = optimizer

    def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
        """Loss x current scale (call inside the tape); the loss itself when off."""
        return self.optimizer.get_scaled_loss(loss) if self.enabled else loss

    def unscale_gradients(self, gradients):
        """Gradients / current scale (call after the tape); unchanged when off."""
        return self.optimizer.get_unscaled_gradients(gradients) if self.enabled else gradients

    def apply_gradients(self, gradients, variables) -> tf.Tensor:
        """Applies already all-reduced, unscaled gradients; returns True if the step was skipped.

        A dynamic scale skips any step with a non-finite gradient (and halves itself); a fixed
        scale or no scaling always applies, so the result is a constant False there.
        """
        skipped = tf.constant(False)
        if self.dynamic:
            skipped = tf.logical_not(all_finite(gradients))
        self.optimizer.apply_gradients(zip(gradients, variables), skip_gradients_aggregation=True)
        return skipped

    @property
    def scale(self) -> tf.Tensor:
        """The current loss scale as a float32 tensor (1.0 when off)."""
        if not self.enabled:
            return tf.constant(1.0)
        return tf.convert_to_tensor(self.optimizer.loss_scale, tf.float32)

    @property
    def good_steps(self) -> tf.Tensor:
        """Finite steps since the dynamic scale last changed (0 when not dynamic)."""
        if not self.dynamic:
            return tf.constant(0, tf.int64)
        return tf.cast(self.optimizer.dynamic_counter, tf.int64)
