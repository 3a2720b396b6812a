"""A small residual network (He et al. basic blocks) with BatchNorm, for 28x28 images."""

from trainer.compat import keras
from trainer.models._checks import positive_int


def _conv_bn(x, filters: int, kernel: int, strides: int, name: str):
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                            kernel_initializer="he_normal", name=name)(x)
    return keras.layers.BatchNormalization(name=f"{name}_bn")(x)


def _basic_block(x, filters: int, strides: int, name: str):
    layers = keras.layers
    shortcut = x
    y = _conv_bn(x, filters, 3, strides, f"{name}_conv1")
    y = layers.Activation("relu", name=f"{name}_relu1")(y)
    y = _conv_bn(y, filters, 3, 1, f"{name}_conv2")
    if strides != 1 or shortcut.shape[-1] != filters:
        # A 1x1 projection makes the shortcut's shape match the block's output.
        shortcut = _conv_bn(shortcut, filters, 1, strides, f"{name}_proj")
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def resnet(*, input_shape, num_classes: int, width: int = 16, stages: int = 3,
           blocks: int = 1) -> keras.Model:
    """Stem conv, ``stages`` stages of ``blocks`` basic blocks, global pooling, float32 softmax.

    Stage ``i`` has ``width * 2**i`` filters; every stage after the first starts with a
    stride-2 block. All BatchNorm layers keep float32 statistics under mixed policies.

    Args:
      width: filters of the stem and the first stage.
      stages: number of stages.
      blocks: basic blocks per stage.
    """
    positive_int("resnet", "width", width)
    positive_int("resnet", "stages", stages)
    positive_int("resnet", "blocks", blocks)
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv_bn(inputs, width, 3, 1, "stem")
    x = layers.Activation("relu", name="stem_relu")(x)
    for stage in range(stages):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, width * 2 ** stage, strides, f"stage{stage + 1}_block{block + 1}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(num_classes, name="dense_logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs=inputs, outputs=outputs, name="resnet")
