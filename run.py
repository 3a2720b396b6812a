"""Train a model with mixed precision: `python run.py --policy=mixed_bfloat16`.

Flags -> TrainConfig -> trainer.main(config). A user mistake prints one line and exits 1.
"""

import os
import sys

# Keep TensorFlow's C++ start-up chatter out. In a multi-process job also its ERROR lines: a
# dead peer makes the gRPC runtime print pages of them before our one `error:` line, whose
# exception carries the same cause.
_MULTI_PROCESS = any(os.environ.get(name) for name in (
    "TF_CONFIG", "OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "TRAINER_WORLD_SIZE"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3" if _MULTI_PROCESS else "2")

from absl import app, flags, logging  # noqa: E402

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
# The production loop: checkpoints, resume, evaluation, progress, accumulation.
flags.DEFINE_integer("checkpoint_every", 0, "Save a checkpoint every N steps (0: every epoch).")
flags.DEFINE_integer("keep_checkpoints", 3, "How many recent checkpoints to keep.")
flags.DEFINE_bool("deterministic", False,
                  "Seed everything and enable TF op determinism (bit-exact resume).")
flags.DEFINE_bool("allow_policy_change", False,
                  "Allow resuming a checkpoint written under another dtype policy.")
flags.DEFINE_integer("max_consecutive_skips", 100,
                     "Stop when this many steps in a row are skipped as non-finite (0: never).")
flags.DEFINE_integer("eval_every", 0, "Evaluate every N steps (0: at the end of each epoch).")
flags.DEFINE_string("best_metric", "auto",
                    "Validation metric that picks the best checkpoint kept in --model_dir "
                    "(auto: accuracy when the model reports it, else loss; losses and errors "
                    "are minimised, accuracies maximised).")
flags.DEFINE_integer("grad_accum_steps", 1, "Micro-batches accumulated per optimizer step.")
flags.DEFINE_float("clip_norm", 0.0, "Clip gradients to this global norm after unscaling (0: off).")
flags.DEFINE_bool("jit_compile", False,
                  "Compile the per-replica forward and backward pass with XLA (the iterator, "
                  "all-reduce and optimizer update stay outside; refused on Gaudi, which has "
                  "no XLA).")
flags.DEFINE_string("lr_schedule", "constant", "Learning-rate schedule: constant | cosine.")
flags.DEFINE_integer("warmup_steps", 0, "Linear warm-up steps before the schedule.")
flags.DEFINE_string("progress", "auto",
                    "auto (a bar on a terminal, log lines otherwise) | bar | log | none.")
# Precision toolkit.
flags.DEFINE_bool("audit", False, "Print the per-layer precision audit and exit (no training).")
flags.DEFINE_string("compare_policies", "",
                    "Comma list of policies to train and compare from identical weights, "
                    "e.g. float32,mixed_bfloat16.")
flags.DEFINE_bool("numerics", False,
                  "Print the per-layer numerics report of --policy against float32 and exit.")
flags.DEFINE_integer("numerics_every", 0,
                     "Log numerics statistics to TensorBoard every N steps (0: off).")
flags.DEFINE_string("export_dir", None, "Write a SavedModel here at the end of training.")
flags.DEFINE_string("profile_steps", "", "START,END: write a profiler trace of these steps.")
# Distribution.
flags.DEFINE_string("distribution", "auto",
                    "none | mirrored (local GPUs) | multi_worker | hpu | auto.")
flags.DEFINE_string("worker_hosts", "",
                    "Comma list of hosts (host or host:slots) for multi-worker runs under mpirun.")
flags.DEFINE_integer("base_port", 7850, "Worker i on a host listens on base_port + local rank.")

CONFIG_FLAGS = ("policy", "device", "model", "model_args", "dataset", "data_dir", "epochs",
                "batch_size", "learning_rate", "optimizer", "loss_scale", "steps_per_loop",
                "validation_split", "seed", "model_dir", "metrics_file", "auto_cast_outputs",
                "synthetic_examples", "checkpoint_every", "keep_checkpoints", "deterministic",
                "allow_policy_change", "max_consecutive_skips", "eval_every", "best_metric",
                "grad_accum_steps", "clip_norm", "jit_compile", "lr_schedule", "warmup_steps",
                "progress", "audit", "compare_policies", "numerics", "numerics_every",
                "export_dir", "profile_steps", "distribution", "worker_hosts", "base_port")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; flags look like --name=value "
                 "(see --helpfull)")
    import trainer
    from trainer.compat import tf  # Imports TensorFlow: after flag parsing, so --help is fast.

    if not any(arg.startswith(("--verbosity", "-v")) for arg in sys.argv[1:]):
        # TF's Python INFO lines (checkpoint timings) are noise to a user.
        logging.set_verbosity(logging.WARNING)
        tf.get_logger().setLevel("WARNING")

    try:
        config = trainer.TrainConfig(**{name: FLAGS[name].value for name in CONFIG_FLAGS})
        return trainer.main(config)
    except trainer.UserError as error:
        from trainer.errors import exit_with

        exit_with(error)


def _parse_flags(argv):
    """absl's parser, with a bad flag value reported as one ``error:`` line."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"error: {error}; see --helpfull for the flags")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
