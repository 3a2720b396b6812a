"""Experiment (not a default): cast-once weights, measured by benchmarks/run.py.

Under a Keras mixed policy every read of a float32 weight inside a layer casts it to the
16-bit compute dtype, every step, and the backward pass casts each 16-bit weight gradient back
to float32: 17% of the wide MLP's bf16 op time. Here each such weight gets a 16-bit shadow
variable that the forward pass reads instead; the gradient is taken with respect to the
shadow (16-bit), and the XLA-fused optimizer update casts it to float32, applies it to the
float32 master weight and refreshes the shadow in the same kernel. The shadows are refreshed
from the masters at the start of every step loop, so weights changed between calls (a
restore) are picked up.

The result is identical to the default path (same weights after N steps, checked in
``tests/test_benchmarks.py``), but on the CPUs we measured it is slower: XLA's CPU backend
converts float32 <-> bfloat16 element by element in the fused update instead of with the
vector conversions oneDNN's Cast kernels use (BENCHMARKS.md, table (d)). It reaches into
Keras' AutoCastVariable, which is why it is an experiment and not part of ``trainer/``.
"""

from __future__ import annotations

import threading

from trainer.compat import tf
from trainer.core.steps import Trainer

try:  # tf_keras (TF >= 2.16) and TF 2.15's built-in Keras keep the class in different places.
    from tf_keras.src.mixed_precision.autocast_variable import AutoCastVariable
except ImportError:  # pragma: no cover - the TF 2.15 lane does not run the benchmarks.
    from keras.src.mixed_precision.autocast_variable import AutoCastVariable

_reading = threading.local()  # The shadow table while the train step's forward is traced.


def _shadow(variable):
    table = getattr(_reading, "table", None)
    if table is None or not variable._should_cast():
        return None
    shadow = table.get(id(variable))
    return shadow if shadow is not None and shadow.dtype == variable._cast_dtype else None


class _ShadowedVariable(AutoCastVariable):
    """An AutoCastVariable whose 16-bit reads return its shadow while the table is set."""

    def value(self):
        shadow = _shadow(self)
        return shadow.value() if shadow is not None else super().value()

    def read_value(self):
        shadow = _shadow(self)
        return shadow.read_value() if shadow is not None else super().read_value()

    def _dense_var_to_tensor(self, dtype=None, name=None, as_ref=False):
        shadow = _shadow(self)
        if shadow is not None and not as_ref:
            return tf.convert_to_tensor(shadow, dtype=dtype, name=name)
        return super()._dense_var_to_tensor(dtype=dtype, name=name, as_ref=as_ref)

    def __tf_tensor__(self, dtype=None, name=None):
        return self._dense_var_to_tensor(dtype=dtype, name=name)


# Ahead of AutoCastVariable's own conversion function (priority 100), which would cast.
tf.register_tensor_conversion_function(
    _ShadowedVariable,
    lambda v, dtype=None, name=None, as_ref=False: v._dense_var_to_tensor(dtype, name, as_ref),
    priority=99)


class CastOnceTrainer(Trainer):
    """The default Trainer with cast-once weights (one replica, no accumulation or clipping)."""

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        assert self.strategy.num_replicas_in_sync == 1 and config.grad_accum_steps == 1
        assert not config.clip_norm and not self.model.losses
        self._shadows = {}
        for variable in self.model.trainable_variables:
            if type(variable) is AutoCastVariable:
                compute = tf.as_dtype(self.model.compute_dtype)
                self._shadows[id(variable)] = (variable, tf.Variable(
                    tf.cast(variable._variable, compute), trainable=False))
                variable.__class__ = _ShadowedVariable
        inner = self.loss_scaler.inner_optimizer
        by_key = {inner._var_key(v): s for v, s in self._shadows.values()}
        update_step = inner.update_step

        def cast_update_refresh(gradient, variable):  # Runs inside the XLA-compiled update.
            update_step(tf.cast(gradient, variable.dtype), variable)
            shadow = by_key.get(inner._var_key(variable))
            if shadow is not None:
                shadow.assign(tf.cast(variable._variable.value(), shadow.dtype))

        inner.update_step = cast_update_refresh

    def _train_loop_fn(self, iterator, num_steps, max_consecutive_skips):
        for variable, shadow in self._shadows.values():
            shadow.assign(tf.cast(variable._variable, shadow.dtype))
        return super()._train_loop_fn(iterator, num_steps, max_consecutive_skips)

    def _gradients_fn(self, features, labels):
        variables = [self._shadows.get(id(v), (None, v))[1]
                     for v in self.model.trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch([s for _, s in self._shadows.values()])
            _reading.table = {key: s for key, (_, s) in self._shadows.items()}
            try:
                outputs = self._forward(features, training=True)
            finally:
                _reading.table = None
            per_example = self.compute_loss(labels, outputs)
            loss = tf.nn.compute_average_loss(per_example,
                                              global_batch_size=self.config.batch_size)
            scaled_loss = self.loss_scaler.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        return self.loss_scaler.unscale_gradients(gradients), per_example, outputs
