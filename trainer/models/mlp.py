"""The mixed-precision tutorial's model: two wide Dense relu layers, logits, float32 softmax."""

from trainer.compat import keras
from trainer.models._checks import positive_int


def mlp(*, input_shape, num_classes: int, units: int = 256) -> keras.Model:
    """Flatten -> Dense(units, relu) x 2 -> Dense(num_classes) -> float32 softmax.

    The softmax is its own Activation layer with dtype float32: under a mixed policy the Dense
    layers compute in bf16/fp16, but the probabilities fed to the loss must be float32.
    """
    positive_int("mlp", "units", units)
    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(units, activation="relu", name="dense_1")(x)
    x = keras.layers.Dense(units, activation="relu", name="dense_2")(x)
    x = keras.layers.Dense(num_classes, name="dense_logits")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs=inputs, outputs=outputs, name="mlp")
