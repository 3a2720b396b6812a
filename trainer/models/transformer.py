"""A ViT-style encoder on image patches: patch embedding, pre-LayerNorm attention blocks."""

from trainer.compat import keras
from trainer.errors import ConfigError
from trainer.models._checks import fraction, positive_int


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding per token position to a ``(batch, tokens, dim)`` input.

    The embedding variable is float32 (the policy's variable dtype); Keras casts it to the
    compute dtype when it is read inside ``call``.
    """

    def build(self, input_shape):
        self.embedding = self.add_weight(
            name="embedding", shape=tuple(input_shape[1:]),
            initializer=keras.initializers.RandomNormal(stddev=0.02), trainable=True)
        super().build(input_shape)

    def call(self, inputs):
        return inputs + self.embedding


def _gelu_tanh(x):
    return keras.activations.gelu(x, approximate=True)


def _encoder_block(x, *, dim: int, heads: int, mlp_dim: int, dropout: float, name: str,
                   norm_epsilon: float, gelu):
    layers = keras.layers
    # Pre-norm: LayerNorm computes its mean/variance in float32 even for bf16/fp16 inputs.
    y = layers.LayerNormalization(epsilon=norm_epsilon, name=f"{name}_ln1")(x)
    y = layers.MultiHeadAttention(heads, dim // heads, dropout=dropout, name=f"{name}_attention")(y, y)
    x = layers.Add(name=f"{name}_add1")([x, y])
    y = layers.LayerNormalization(epsilon=norm_epsilon, name=f"{name}_ln2")(x)
    y = layers.Dense(mlp_dim, activation=gelu, name=f"{name}_mlp1")(y)
    y = layers.Dense(dim, name=f"{name}_mlp2")(y)
    if dropout:
        y = layers.Dropout(dropout, name=f"{name}_dropout")(y)
    return layers.Add(name=f"{name}_add2")([x, y])


def transformer(*, input_shape, num_classes: int, patch_size: int = 4, dim: int = 64,
                depth: int = 2, heads: int = 4, mlp_ratio: int = 2,
                dropout: float = 0.0, fused_ops: bool = False) -> keras.Model:
    """Patches -> linear embedding + position -> ``depth`` encoder blocks -> mean pool -> softmax.

    Args:
      patch_size: side of the square patches (must divide the image height and width).
      dim: token width (must be divisible by ``heads``).
      depth: number of encoder blocks.
      heads: attention heads per block.
      mlp_ratio: the block MLP is ``mlp_ratio * dim`` wide.
      dropout: dropout in attention and after the MLP.
      fused_ops: build the ops TensorFlow's CPU backend has fused kernels for: LayerNorm with
        epsilon 1.001e-5 (Keras runs the fused batch-norm kernel, whose smallest epsilon that
        is, only from there; at the default 1e-6 a LayerNorm is ~8 separate ops) and the tanh approximation of GELU instead
        of the exact erf form. A slightly different model (benchmarks: speed, table (e)
        of BENCHMARKS.md: accuracy), so not the default.
    """
    for name, value in (("patch_size", patch_size), ("dim", dim), ("depth", depth),
                        ("heads", heads), ("mlp_ratio", mlp_ratio)):
        positive_int("transformer", name, value)
    fraction("transformer", "dropout", dropout)
    if not isinstance(fused_ops, bool):
        raise ConfigError(
            f"transformer: fused_ops must be true or false, got {fused_ops!r} (--model_args)")
    norm_epsilon, gelu = (1.001e-5, _gelu_tanh) if fused_ops else (1e-6, "gelu")
    height, width = input_shape[0], input_shape[1]
    if height % patch_size or width % patch_size:
        raise ConfigError(
            f"transformer: patch_size {patch_size} must divide the image size {height}x{width} "
            "(--model_args)")
    if dim % heads:
        raise ConfigError(
            f"transformer: dim {dim} must be divisible by heads {heads} (--model_args)")
    layers = keras.layers
    tokens = (height // patch_size) * (width // patch_size)
    inputs = keras.Input(shape=input_shape, name="images")
    # A stride-patch_size convolution is the per-patch linear projection.
    x = layers.Conv2D(dim, patch_size, strides=patch_size, name="patch_embedding")(inputs)
    x = layers.Reshape((tokens, dim), name="tokens")(x)
    x = PositionEmbedding(name="position_embedding")(x)
    for block in range(depth):
        x = _encoder_block(x, dim=dim, heads=heads, mlp_dim=mlp_ratio * dim, dropout=dropout,
                           name=f"block{block + 1}", norm_epsilon=norm_epsilon, gelu=gelu)
    x = layers.LayerNormalization(epsilon=norm_epsilon, name="final_ln")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    x = layers.Dense(num_classes, name="dense_logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs=inputs, outputs=outputs, name="transformer")

