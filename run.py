"""Train a model with mixed precision: `python run.py --policy=mixed_bfloat16`.

Flags -> TrainConfig -> trainer.run(config). A user mistake prints one line and exits 2.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TensorFlow's C++ start-up chatter out.

from absl import app, flags  # noqa: E402

from trainer.config import DATASETS, DEVICES, OPTIMIZERS, POLICIES  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("policy", "mixed_bfloat16", f"Keras dtype policy: {' | '.join(POLICIES)}.")
flags.DEFINE_string("device", "auto", f"Device: {' | '.join(DEVICES)} (auto: hpu > gpu > cpu).")
flags.DEFINE_string("model", "mlp", "Registered model name (see models/), e.g. mlp.")
flags.DEFINE_string("model_args", "", "Model keyword arguments, e.g. 'units=64'.")
flags.DEFINE_string("dataset", "fashion_mnist", f"Dataset: {' | '.join(DATASETS)}.")
flags.DEFINE_string("data_dir", None, "Folder with the dataset files (IDX .gz, or mnist.npz).")
flags.DEFINE_integer("epochs", 8, "Passes over the training split.")
flags.DEFINE_integer("batch_size", 128, "Global batch size (split across replicas).")
flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
flags.DEFINE_string("optimizer", "adam", f"Optimizer: {' | '.join(OPTIMIZERS)}.")
flags.DEFINE_string("loss_scale", "auto",
                    "dynamic | none | a positive number (fixed scale) | auto (dynamic for mixed "
                    "policies, none for float32).")
flags.DEFINE_integer("steps_per_loop", 100, "Train steps per compiled call (an in-graph loop).")
flags.DEFINE_float("validation_split", 0.1, "Fraction of the training data held out (the end).")
flags.DEFINE_integer("seed", 42, "Random seed for weights and data order.")
flags.DEFINE_string("model_dir", None, "Folder for checkpoints and summaries.")
flags.DEFINE_string("metrics_file", None, "Write a JSON summary of the run here.")
flags.DEFINE_bool("auto_cast_outputs", False,
                  "Cast non-float32 model outputs to float32 instead of refusing the model.")
flags.DEFINE_integer("synthetic_examples", 4096, "Training examples of --dataset=synthetic.")

CONFIG_FLAGS = ("policy", "device", "model", "model_args", "dataset", "data_dir", "epochs",
                "batch_size", "learning_rate", "optimizer", "loss_scale", "steps_per_loop",
                "validation_split", "seed", "model_dir", "metrics_file", "auto_cast_outputs",
                "synthetic_examples")


def main(argv):
    del argv
    import trainer  # Imports TensorFlow: after flag parsing so --help stays fast.

    try:
        config = trainer.TrainConfig(**{name: FLAGS[name].value for name in CONFIG_FLAGS})
        trainer.run(config)
    except trainer.UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
