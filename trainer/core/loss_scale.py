"""Loss scaling: one path through the train step that costs nothing when it is off.

The idea is PyTorch's ``GradScaler(enabled=...)``: the Trainer always calls ``scale_loss``,
``unscale_gradients`` and ``apply_gradients``; when scaling is off the first two pass values
through and the optimizer is not wrapped.

``apply_gradients`` owns the one finiteness check of a step, under every mode: a step whose
gradients hold an Inf or NaN is never applied (it still counts in ``iterations``, as in Keras'
``LossScaleOptimizer``). A dynamic scale is updated here too, in the ``LossScaleOptimizer``'s
own state variables and by its rules (halve on overflow, never below 1; double after
``growth_steps`` finite steps), so checkpoints stay compatible with Keras'. The wrapper's own
``apply_gradients`` is never called: it would check the gradients a second time.
"""

from __future__ import annotations

from typing import Sequence, Union

from trainer.compat import mixed_precision, tf


def all_finite(gradients: Sequence[tf.Tensor]) -> tf.Tensor:
    """A scalar bool: True when every gradient value is finite (None entries are ignored)."""
    def values(g):
        return g.values if isinstance(g, tf.IndexedSlices) else g

    checks = [tf.reduce_all(tf.math.is_finite(values(g))) for g in gradients if g is not None]
    return tf.reduce_all(checks) if checks else tf.constant(True)


class _Unwrapped:
    """Carries mirrored variables through ``merge_call`` without the strategy unwrapping them.

    The inner optimizer must see the distributed variables, not one replica's component
    (Keras' ``LossScaleOptimizer`` does the same with its ``_UnwrapPreventer``).
    """

    __slots__ = ["value"]

    def __init__(self, value):
        self.value = value


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
        """Applies all-reduced, unscaled gradients unless one is non-finite.

        Call it in replica context (inside ``strategy.run``) or with no strategy. Pairs whose
        gradient is None are left out, so those variables stay untouched (no weight decay,
        no momentum). A skipped step still advances ``iterations``; under a dynamic scale it
        halves the scale and a finite step counts towards doubling it.

        Returns:
          A scalar bool tensor: True when the step was skipped.
        """
        pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        gradients, variables = [g for g, _ in pairs], [v for _, v in pairs]
        finite = all_finite(gradients)
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            self._apply_if_finite(finite, lambda: self._apply(gradients, _Unwrapped(variables)))
        else:
            # The inner optimizer's update calls merge_call, which a cond in replica context
            # must not contain: branch in cross-replica context, as Keras' wrapper does.
            def cross_replica(strategy, finite, gradients, variables):
                # The gradients were all-reduced, so every replica agrees: take the first.
                finite = strategy.experimental_local_results(finite)[0]
                self._apply_if_finite(finite, lambda: strategy.extended.call_for_each_replica(
                    self._apply, args=(gradients, variables)))

            tf.distribute.get_replica_context().merge_call(
                cross_replica, args=(finite, gradients, _Unwrapped(variables)))
        return tf.logical_not(finite)

    def _apply(self, gradients, variables: _Unwrapped) -> None:
        self.inner_optimizer.apply_gradients(zip(gradients, variables.value),
                                             skip_gradients_aggregation=True)

    def _apply_if_finite(self, finite: tf.Tensor, apply) -> None:
        def on_finite():
            apply()
            if self.dynamic:
                self._count_good_step()

        def on_overflow():
            # The update is skipped but the step counts (Keras' LossScaleOptimizer does too).
            self.inner_optimizer.iterations.assign_add(1, read_value=False)
            if self.dynamic:
                state = self._state
                state.counter.assign(0)
                state.current_loss_scale.assign(
                    tf.maximum(state.current_loss_scale / state.multiplier, 1.0))

        tf.cond(finite, on_finite, on_overflow)

    def _count_good_step(self) -> None:
        state = self._state

        def grow():
            doubled = state.current_loss_scale * state.multiplier
            # Keras keeps the old scale when doubling would overflow float32.
            state.current_loss_scale.assign(
                tf.where(tf.math.is_finite(doubled), doubled, state.current_loss_scale))
            state.counter.assign(0)

        def count():
            state.counter.assign_add(1)

        tf.cond(state.counter + 1 >= state.growth_steps, grow, count)

    @property
    def _state(self):
        # Keras' _DynamicLossScaleState: `current_loss_scale` and `counter` (saved as
        # 'good_steps'), the variables its own apply_gradients would update.
        return self.optimizer._loss_scale

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
