"""The ``--model_dir`` layout: every name a run keeps there, and nowhere else::

    MODEL_DIR/
      run.json                  what wrote the checkpoints (model, data, policy, Keras...):
                                a later run with other settings is refused, not mixed in
      checkpoints/ckpt-STEP.*   tf.train.CheckpointManager's, the newest --keep_checkpoints
      best/best-STEP.*          the best validation --best_metric so far
      input/worker-N/input-STEP.*  worker N's training-iterator state at each checkpoint
                                (streamed record files: an exact resume reads nothing twice)
      train/  validation/       TensorBoard scalars (``tensorboard --logdir MODEL_DIR``)
      profile/                  --profile_steps traces (TensorBoard's profile plugin)
      comparison.json .csv .png --compare_policies' table, data and plot

Only the chief writes here; the other workers of a multi-worker job save into scratch
folders with the same layout (saving is a collective, see :mod:`trainer.runtime.lockstep`).
The one exception is ``input/worker-N``: a worker's input position exists in that worker
alone, so each writes its own folder (and only that one).
"""

from __future__ import annotations

import os

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
BEST = "best"
INPUT = "input"
SUMMARY_SPLITS = ("train", "validation")
PROFILE = "profile"
COMPARISON_FORMATS = ("json", "csv", "png")

# Everything a run keeps at the top of --model_dir: --metrics_file may not replace one.
ENTRIES = (RUN_FILE, CHECKPOINTS, BEST, INPUT, *SUMMARY_SPLITS, PROFILE,
           *(f"comparison.{ext}" for ext in COMPARISON_FORMATS))


def run_file(model_dir: str) -> str:
    return os.path.join(model_dir, RUN_FILE)


def checkpoints(model_dir: str) -> str:
    return os.path.join(model_dir, CHECKPOINTS)


def best(model_dir: str) -> str:
    return os.path.join(model_dir, BEST)


def input_state(model_dir: str, worker: int) -> str:
    """Worker ``worker``'s training-iterator checkpoints (``input-STEP``)."""
    return os.path.join(model_dir, INPUT, f"worker-{worker}")


def summaries(model_dir: str, split: str) -> str:
    """The TensorBoard log folder of ``split`` ('train' or 'validation')."""
    if split not in SUMMARY_SPLITS:
        raise ValueError(f"unknown summary split {split!r}; one of {SUMMARY_SPLITS}")
    return os.path.join(model_dir, split)


def profile(model_dir: str) -> str:
    return os.path.join(model_dir, PROFILE)


def comparison(model_dir: str) -> dict:
    """``{'json': path, 'csv': path, 'png': path}`` of the policy comparison's files."""
    return {ext: os.path.join(model_dir, f"comparison.{ext}") for ext in COMPARISON_FORMATS}
