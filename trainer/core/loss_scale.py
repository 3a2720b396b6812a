"""Loss scaling: one path through the train step that costs nothing when it is off.

The idea is PyTorch's ``GradScaler(enabled=...)``: the Trainer always calls ``scale_loss``,
``unscale_gradients`` and ``apply_gradients``; when scaling is off the first two pass values
through and the optimizer is not wrapped.

Both Kerases are served by this one path (their differences are ``trainer/compat.py``'s).
Scaling and unscaling are explicit under both: Keras 3's ``LossScaleOptimizer`` has no
``get_unscaled_gradients`` and divides by the scale inside its own ``apply``, so calling it
after unscaling would divide twice (docs/keras.md).

``apply_gradients`` owns the one finiteness check of a step, under every mode: a step whose
gradients hold an Inf or NaN is never applied (it still counts in ``iterations``, as in Keras
2's ``LossScaleOptimizer``). A dynamic scale is updated here too, in the run's Keras
``LossScaleOptimizer``'s own state variables and by Keras 2's rules (halve on overflow, never
below 1; double after ``growth_steps`` finite steps), so a plain Keras wrapper reads the state
back. The wrapper's own ``apply``/``apply_gradients`` is never called: it would check the
gradients a second time (and, under Keras 3, unscale them again).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from trainer import compat
from trainer.compat import tf


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
    """Scales the loss and unscales the gradients explicitly, under either Keras.

    A dynamic scale lives in the run's Keras ``LossScaleOptimizer`` (its state variables, so
    checkpoints hold it where Keras keeps it); this class updates it by Keras 2's rules under
    both Kerases. The wrapper's own ``apply``/``apply_gradients`` is never called: under
    Keras 3 it would divide the (already unscaled) gradients by the scale a second time.

    Args:
      optimizer: the inner optimizer, from the run's Keras.
      mode: 'dynamic' (start at 2**15, halve on overflow, never below 1; double after
        ``growth_steps`` finite steps), 'none' (no scaling, no wrapper), or a positive float
        (a fixed scale; no state, so no wrapper either).
      growth_steps: finite steps before a dynamic scale doubles.
    """

    def __init__(self, optimizer, *, mode: Union[str, float], growth_steps: int = 2000):
        if mode not in ("dynamic", "none") and not (isinstance(mode, float) and mode > 0):
            raise ValueError(f"mode must be 'dynamic', 'none' or a positive float, got {mode!r}")
        self.mode = mode
        self.enabled = mode != "none"
        self.dynamic = mode == "dynamic"
        self.inner_optimizer = optimizer
        self.optimizer = compat.loss_scale_optimizer(optimizer, growth_steps=growth_steps) \
            if self.dynamic else optimizer
        self._fixed = None if self.dynamic or not self.enabled else float(mode)

    def build(self, variables) -> None:
        """Creates the optimizer's slots (and the scale's state) for ``variables``."""
        self.optimizer.build(variables)

    @property
    def state(self) -> Optional[compat.LossScaleState]:
        """The dynamic scale's variables (only when ``dynamic``; None until built)."""
        return compat.loss_scale_state(self.optimizer)

    def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
        """Loss x current scale (call inside the tape); the loss itself when off."""
        if not self.enabled:
            return loss
        return loss * tf.cast(self.scale, loss.dtype)

    def unscale_gradients(self, gradients):
        """Gradients x (1 / current scale) (call after the tape); unchanged when off.

        The reciprocal is taken once, in float32, as Keras 2's ``get_unscaled_gradients``
        does; a power-of-two scale makes it exact.
        """
        if not self.enabled:
            return gradients
        reciprocal = 1.0 / self.scale

        def unscale(g):
            if g is None:
                return None
            if isinstance(g, tf.IndexedSlices):
                return tf.IndexedSlices(g.values * tf.cast(reciprocal, g.dtype), g.indices,
                                        g.dense_shape)
            return g * tf.cast(reciprocal, g.dtype)

        return [unscale(g) for g in gradients]

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
        compat.apply_gradients(self.inner_optimizer, gradients, variables.value)

    def _apply_if_finite(self, finite: tf.Tensor, apply) -> None:
        def on_finite():
            apply()
            if self.dynamic:
                self._count_good_step()

        def on_overflow():
            # The update is skipped but the step counts (Keras' LossScaleOptimizer does too).
            compat.tf_variable(self.inner_optimizer.iterations).assign_add(1, read_value=False)
            if self.dynamic:
                state = self.state
                state.counter.assign(0)
                state.scale.assign(tf.maximum(state.scale / 2.0, 1.0))

        tf.cond(finite, on_finite, on_overflow)

    def _count_good_step(self) -> None:
        state = self.state

        def grow():
            doubled = state.scale * 2.0
            # Keras keeps the old scale when doubling would overflow float32.
            state.scale.assign(tf.where(tf.math.is_finite(doubled), doubled, state.scale))
            state.counter.assign(0)

        def count():
            state.counter.assign_add(1)

        tf.cond(state.counter + 1 >= state.growth_steps, grow, count)

    @property
    def scale(self) -> tf.Tensor:
        """The current loss scale as a float32 tensor (1.0 when off)."""
        if self.dynamic:
            state = self.state
            return tf.convert_to_tensor(compat.INITIAL_SCALE if state is None else state.scale,
                                        tf.float32)
        return tf.constant(self._fixed or 1.0, tf.float32)

    @property
    def good_steps(self) -> tf.Tensor:
        """Finite steps since the dynamic scale last changed (0 when not dynamic)."""
        if not self.dynamic:
            return tf.constant(0, tf.int64)
        return tf.cast(self.state.counter, tf.int64)
