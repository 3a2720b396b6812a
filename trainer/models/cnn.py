"""The Fashion-MNIST style convolutional net: (conv + BatchNorm + relu) x 2 + pooling per stage."""

from trainer.compat import keras
from trainer.models._checks import fraction, positive_int


def cnn(*, input_shape, num_classes: int, width: int = 32, depth: int = 2, dense_units: int = 128,
        dropout: float = 0.1, head_dropout: float = 0.3) -> keras.Model:
    """``depth`` stages of two 3x3 conv + BatchNorm + relu, then 2x2 max-pooling and dropout.

    Stage ``i`` has ``width * 2**i`` filters. A Dense(dense_units) relu head, the logits and a
    separate float32 softmax follow. Under a mixed policy the convolutions compute in bf16/fp16
    while BatchNorm keeps float32 moving statistics and normalises with float32 statistics.

    Args:
      width: filters of the first stage.
      depth: number of stages (each halves the spatial size).
      dense_units: width of the hidden Dense layer.
      dropout: dropout rate after each stage.
      head_dropout: dropout rate after the hidden Dense layer (most parameters are there).
    """
    positive_int("cnn", "width", width)
    positive_int("cnn", "depth", depth)
    positive_int("cnn", "dense_units", dense_units)
    fraction("cnn", "dropout", dropout)
    fraction("cnn", "head_dropout", head_dropout)
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for stage in range(depth):
        filters = width * 2 ** stage
        for conv in (1, 2):
            name = f"stage{stage + 1}_conv{conv}"
            # No bias: the BatchNorm that follows has its own offset.
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
            x = layers.BatchNormalization(name=f"{name}_bn")(x)
            x = layers.Activation("relu", name=f"{name}_relu")(x)
        if min(x.shape[1], x.shape[2]) >= 2:
            x = layers.MaxPooling2D(2, name=f"stage{stage + 1}_pool")(x)
        x = layers.Dropout(dropout, name=f"stage{stage + 1}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense_units, activation="relu", name="dense_hidden")(x)
    x = layers.Dropout(head_dropout, name="head_dropout")(x)
    x = layers.Dense(num_classes, name="dense_logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs=inputs, outputs=outputs, name="cnn")
