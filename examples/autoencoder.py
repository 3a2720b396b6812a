"""A convolutional autoencoder: your own targets (the images themselves) under mixed_bfloat16.

Run it from the repository root:  python examples/autoencoder.py
(--quick trains a few seconds on synthetic data instead of Fashion-MNIST).
build_datasets hands the Trainer arrays with images as targets (trainer.data.from_arrays);
the base class still owns compilation, loss scaling and the mixed-precision checks.
"""

import sys

import numpy as np

import trainer
from trainer import data
from trainer.compat import keras, tf


class AutoencoderTrainer(trainer.Trainer):
    """Encodes 28x28 images into 7x7x4 codes and decodes them back; the loss is the MSE."""

    def build_datasets(self):
        config = self.config
        arrays = data.load_arrays(config.dataset, data_dir=config.data_dir, seed=config.seed,
                                  synthetic_examples=config.synthetic_examples)
        # Inputs stay uint8 (the pipeline scales them to [0, 1]); targets are the same
        # pixels as float32, scaled by the same float32 multiply as data.to_float. Float
        # targets skip the class-id checks.
        targets = [x.astype(np.float32) * np.float32(1.0 / 255.0)
                   for x in (arrays.x_train, arrays.x_test)]
        return data.from_arrays(arrays.x_train, targets[0], arrays.x_test, targets[1],
                                batch_size=config.batch_size,
                                validation_split=config.validation_split, seed=config.seed,
                                source=arrays.source)

    def build_model(self):
        # Runs under the run's dtype policy: convolutions compute in bf16, variables stay float32.
        inputs = keras.Input(shape=self.datasets.input_shape)
        x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
        code = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu",
                                   name="code")(x)
        x = keras.layers.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu")(code)
        x = keras.layers.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(self.datasets.input_shape[-1], 3, padding="same")(x)
        # The output must be float32 under a mixed policy: the MSE is taken in float32.
        outputs = keras.layers.Activation("sigmoid", dtype="float32", name="pixels")(x)
        return keras.Model(inputs, outputs, name="conv_autoencoder")

    def compute_loss(self, targets, outputs):
        # One value per example: the mean over its pixels (the base class divides the sum
        # over examples by the global batch size).
        return tf.reduce_mean(tf.square(outputs - targets), axis=[1, 2, 3])

    def build_metrics(self):
        return {}  # No accuracy for a reconstruction; 'loss' is the MSE.

    def update_metrics(self, metrics, labels, outputs):
        pass


def main(quick: bool = False) -> dict:
    config = trainer.TrainConfig(policy="mixed_bfloat16", model="conv_autoencoder",
                                 dataset="fashion_mnist", epochs=3, batch_size=128,
                                 learning_rate=2e-3)
    if quick:
        config = config.replace(dataset="synthetic", synthetic_examples=1024, epochs=2,
                                batch_size=32, steps_per_loop=8)
    summary = trainer.run(config, trainer_cls=AutoencoderTrainer)
    print(f"done: test reconstruction MSE {summary['test_loss']:.5f} after "
          f"{summary['global_step']} steps")
    return summary


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
