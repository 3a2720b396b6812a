"""Checkpoints under ``--model_dir``: exact resume, refusal of foreign runs, best-model copy.

Built on ``tf.train.CheckpointManager``. TensorFlow writes a checkpoint's files first and the
``checkpoint`` index file last (atomically), so a crash during a save leaves the previous
checkpoint the latest one; a newest checkpoint that is damaged on disk is skipped for the
one before it, loudly, and never for a silent fresh start.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

from trainer import reporting
from trainer.compat import tf
from trainer.errors import UserError

RUN_FILE = "run.json"
# Settings a checkpoint is only valid under; `policy` may be relaxed by --allow_policy_change
# (variables are float32 under every mixed policy, so weights carry over).
_MUST_MATCH = ("model", "model_args", "architecture", "optimizer", "dataset", "batch_size",
               "grad_accum_steps")


def run_signature(trainer) -> dict:
    """What identifies a run's checkpoints: model, architecture, policy, optimizer, data."""
    config = trainer.config
    return {
        "model": config.model,
        "model_args": config.model_args,
        "architecture": [[list(w.shape), w.dtype.name] for w in trainer.model.weights],
        "policy": config.policy,
        "optimizer": config.optimizer,
        "dataset": config.dataset,
        "batch_size": config.batch_size,
        "grad_accum_steps": config.grad_accum_steps,
    }


def check_compatible(model_dir: str, signature: dict, *, allow_policy_change: bool) -> bool:
    """Raises UserError when ``model_dir`` holds another run's checkpoints.

    Returns:
      True when ``model_dir`` already belongs to this run (a resume), False when it is new.
    """
    path = os.path.join(model_dir, RUN_FILE)
    if not os.path.exists(path):
        if tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")):
            raise UserError(
                f"{model_dir} holds checkpoints but no {RUN_FILE}, so their model is unknown; "
                "use a new --model_dir")
        return False
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path} ({error}); use a new --model_dir") from None
    keys = _MUST_MATCH if allow_policy_change else _MUST_MATCH + ("policy",)
    for key in keys:
        if saved.get(key) != signature[key]:
            shown = "the weight shapes" if key == "architecture" else key
            hint = " (or pass --allow_policy_change)" if key == "policy" else ""
            raise UserError(
                f"{model_dir} was written by another run: its {shown} is {saved.get(key)!r}, this "
                f"run's is {signature[key]!r}; use a new --model_dir{hint}. Nothing was changed.")
    return True


class Checkpointer:
    """Saves and restores a Trainer's full state; only the chief's files are kept.

    Args:
      trainer: the Trainer whose ``checkpoint_items()`` are saved.
      model_dir: the run's folder; checkpoints go to ``model_dir/checkpoints`` and the best
        one by a validation metric to ``model_dir/best``.
      keep: how many recent checkpoints to keep.
      is_chief: non-chief workers take part in each save (a distributed save is collective)
        but write into a temporary folder that is deleted; they restore from the chief's
        folder, which must therefore be on a file system every worker can read.
    """

    def __init__(self, trainer, *, model_dir: str, keep: int = 3, is_chief: bool = True):
        self.trainer = trainer
        self.model_dir = model_dir
        self.is_chief = is_chief
        self.best_value = tf.Variable(float("nan"), trainable=False, name="best_value")
        self.checkpoint = tf.train.Checkpoint(best_value=self.best_value,
                                              **trainer.checkpoint_items())
        root = model_dir if is_chief else tempfile.mkdtemp(prefix="worker-ckpt-")
        self._scratch = None if is_chief else root
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(root, "checkpoints"), max_to_keep=keep,
            step_counter=trainer.global_step, checkpoint_name="ckpt")
        self.best_manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(root, "best"), max_to_keep=1, checkpoint_name="best")

    def restore_or_initialize(self) -> Optional[str]:
        """Restores the newest readable checkpoint; returns its path, or None when there is none.

        Raises:
          UserError: when checkpoints exist but none can be read.
        """
        directory = os.path.join(self.model_dir, "checkpoints")
        state = tf.train.get_checkpoint_state(directory)
        candidates = list(reversed(state.all_model_checkpoint_paths)) if state else []
        if not candidates:
            return None
        for path in candidates:
            try:
                # Every object of ours must get a value; values the checkpoint has and we
                # lack (a loss scale, after --allow_policy_change to float32) may go unused.
                self.checkpoint.restore(path).assert_existing_objects_matched().expect_partial()
                return path
            except Exception as error:  # noqa: BLE001 - TF's reader raises many types here.
                reporting.warn(f"checkpoint {path} cannot be restored "
                               f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                               "trying the one before it")
        raise UserError(
            f"no checkpoint in {directory} can be restored (all damaged); move the "
            "folder away to start afresh, or point --model_dir elsewhere")

    def save(self) -> str:
        """Writes a checkpoint numbered by the global step (all workers must call it)."""
        return self.manager.save(checkpoint_number=self.trainer.global_step)

    def maybe_save_best(self, value: float, *, higher_is_better: bool) -> bool:
        """Saves to ``best/`` when ``value`` beats the best so far; returns whether it did."""
        best = float(self.best_value.numpy())
        better = best != best or (value > best if higher_is_better else value < best)
        if better:
            self.best_value.assign(value)
            self.best_manager.save(checkpoint_number=self.trainer.global_step)
        return better

    def close(self) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)


def write_run_file(model_dir: str, signature: dict) -> None:
    """Records the run's signature so a later start can tell a resume from a foreign folder."""
    os.makedirs(model_dir, exist_ok=True)
    reporting.write_json(os.path.join(model_dir, RUN_FILE), signature)
