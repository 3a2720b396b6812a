"""The inspector's passes: one forward and backward pass, recording each top-level layer's outputs.

The loss is built as ``Trainer._gradients_fn`` builds it. Outputs are taken with call hooks
on the model's top-level layers (``model.layers``); Dropout-like layers (at any depth) run as
the identity, so a pass under the policy and one under float32 compute the same function.
The statistics are in ``trainer/tools/numerics/measure.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import List

import numpy as np

from trainer import compat
from trainer.compat import keras, tf
from trainer.core import precision

_NOISE_LAYERS = tuple(getattr(keras.layers, name) for name in (
    "Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout") if hasattr(keras.layers, name))


def top_layers(model: keras.Model) -> list:
    """The layers the inspector reports on: ``model.layers`` without the input layer."""
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
        for layer in compat.sublayers(model):
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
class Pass:
    """What one pass recorded, per top-level layer (in ``top_layers`` order)."""

    outputs: List[list]  # Per top-level layer: its floating output tensors, every call.
    weight_grads: List[list]  # Per layer: unscaled float32 gradients of its trainable weights.
    output_grads: List[list]  # Per layer: unscaled gradients of its outputs.
    weights: List[list]


def run_pass(model, compute_loss, features, labels, *, scale: float, divisor: float,
              regularization_divisor: float, auto_cast: bool) -> Pass:
    """One forward and backward pass, the loss built as ``Trainer._gradients_fn`` builds it."""
    top = top_layers(model)
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

    return Pass(acts, unscale(w_grads), unscale(a_grads), weights)


def flat64(tensors) -> np.ndarray:
    """The tensors (None skipped) as one flat float64 array."""
    parts = [tf.reshape(tf.cast(t, tf.float64), [-1]).numpy() for t in tensors if t is not None]
    return np.concatenate(parts) if parts else np.zeros(0)

