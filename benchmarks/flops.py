"""Model FLOPs (matmuls and convolutions only, the usual MFU convention) and the matmul peak."""

from __future__ import annotations

import time

import numpy as np

from trainer.compat import keras, tf

# A training step costs about three forward passes: forward, plus gradients with respect to
# activations and to weights.
TRAIN_FLOPS_PER_FORWARD = 3


def _tokens(shape) -> int:
    return int(np.prod([d for d in shape[1:-1]])) if len(shape) > 2 else 1


def layer_forward_flops(layer) -> int:
    """Multiply-add FLOPs (x2) of one example through ``layer``; 0 for non-matmul layers."""
    if isinstance(layer, keras.Model):
        return sum(layer_forward_flops(inner) for inner in layer.layers)
    if isinstance(layer, keras.layers.Dense):
        shape = layer.input.shape
        return 2 * _tokens(shape) * shape[-1] * layer.units
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        c_in = layer.input.shape[-1] // layer.groups
        _, h, w, c_out = layer.output.shape
        return 2 * kh * kw * c_in * c_out * h * w
    if isinstance(layer, keras.layers.MultiHeadAttention):
        query = layer.input[0] if isinstance(layer.input, (list, tuple)) else layer.input
        tokens, dim = _tokens(query.shape), query.shape[-1]
        heads, key_dim = layer._num_heads, layer._key_dim
        projections = 2 * tokens * dim * heads * key_dim * 4  # query, key, value, output
        attention = 2 * 2 * tokens * tokens * heads * key_dim  # QK^T and scores x V
        return projections + attention
    return 0


def forward_flops(model: keras.Model) -> int:
    """FLOPs of one example's forward pass through a functional ``model``."""
    return sum(layer_forward_flops(layer) for layer in model.layers)


def train_flops_per_step(model: keras.Model, batch_size: int) -> int:
    """Model FLOPs of one training step on a batch of ``batch_size``."""
    return TRAIN_FLOPS_PER_FORWARD * forward_flops(model) * batch_size


def matmul_peak(dtype: tf.DType, *, size: int = 2048, chain: int = 8, repeats: int = 3) -> float:
    """The best dense-matmul FLOP/s of ``size`` x ``size`` products in ``dtype`` on this machine.

    Each measurement is a chain of ``chain`` dependent matmuls in one graph (so none can be
    skipped or overlapped with Python), after one warm-up call.
    """
    rng = np.random.default_rng(0)
    a = tf.constant(rng.standard_normal((size, size)) / np.sqrt(size), dtype)
    c0 = tf.constant(rng.standard_normal((size, size)), dtype)

    @tf.function
    def run(a, c):
        for _ in tf.range(chain):
            c = tf.matmul(a, c)  # a is scaled by 1/sqrt(size): c stays finite in bf16.
        return tf.reduce_sum(tf.cast(c[:1, :1], tf.float32))

    run(a, c0).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(a, c0).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * chain / best
