"""A complete Trainer subclass: a small CNN, a label-smoothing loss and a top-2 accuracy metric.

Run it from the repository root:  python examples/custom_trainer.py
(--quick trains a few seconds on synthetic data instead of Fashion-MNIST).
The base class still owns compilation, loss scaling and the mixed-precision checks.
Written with Keras 3 (`import keras`), TensorFlow's Keras since 2.16; for Keras 2 see
docs/keras.md.
"""

import sys

import keras
import tensorflow as tf

import trainer


class SmoothedCNNTrainer(trainer.Trainer):
    """Trains a small CNN with label smoothing and reports top-2 accuracy as well."""

    label_smoothing = 0.1

    def build_model(self):
        # Runs under the run's dtype policy: Conv/Dense compute in bf16, variables stay float32.
        inputs = keras.Input(shape=self.datasets.input_shape)
        x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Conv2D(32, 3, activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(self.datasets.num_classes)(x)
        # The output must be float32 under a mixed policy, or the Trainer refuses the model.
        outputs = keras.layers.Activation("softmax", dtype="float32")(x)
        return keras.Model(inputs, outputs, name="small_cnn")

    def compute_loss(self, labels, outputs):
        # Per-example values: the base class divides their sum by the global batch size.
        one_hot = tf.one_hot(labels, self.datasets.num_classes)
        return keras.losses.categorical_crossentropy(
            one_hot, outputs, label_smoothing=self.label_smoothing)

    def build_metrics(self):
        metrics = super().build_metrics()  # Keeps 'accuracy'.
        metrics["top2_accuracy"] = keras.metrics.SparseTopKCategoricalAccuracy(
            k=2, name="top2_accuracy")
        return metrics

    def update_metrics(self, metrics, labels, outputs):
        super().update_metrics(metrics, labels, outputs)
        metrics["top2_accuracy"].update_state(labels, outputs)


def main(quick: bool = False) -> dict:
    # `model` only labels the run in the output: build_model above decides what is built.
    config = trainer.TrainConfig(policy="mixed_bfloat16", model="small_cnn",
                                 dataset="fashion_mnist", epochs=2, batch_size=128)
    if quick:
        config = config.replace(dataset="synthetic", synthetic_examples=1024, epochs=2,
                                batch_size=32, steps_per_loop=8)
    summary = trainer.run(config, trainer_cls=SmoothedCNNTrainer)
    print(f"done: test accuracy {summary['test_accuracy']:.4f} after "
          f"{summary['global_step']} steps")
    return summary


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
