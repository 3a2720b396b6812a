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
import zlib
from typing import Optional

from trainer import compat
from trainer.compat import tf
from trainer.errors import UserError, warn
from trainer.outputs import files, layout
from trainer.runtime import lockstep

# Settings a checkpoint is only valid under; `policy` may be relaxed by --allow_policy_change
# (variables are float32 under every mixed policy, so weights carry over).
_MUST_MATCH = ("model", "model_args", "architecture", "optimizer", "dataset", "batch_size",
               "grad_accum_steps", "seed", "validation_split", "synthetic_examples",
               "data_files")
_SHOWN = {"architecture": "the weight shapes", "data_files": "data files (sizes and CRC-32)"}


def run_signature(trainer) -> dict:
    """What identifies a run's checkpoints: model, architecture, policy, optimizer, data."""
    config = trainer.config
    return {
        "keras": compat.KERAS_MAJOR,
        "model": config.model,
        "model_args": config.model_args,
        "architecture": [[list(w.shape), w.dtype.name] for w in compat.weights(trainer.model)],
        "policy": config.policy,
        "optimizer": config.optimizer,
        "dataset": config.dataset,
        "batch_size": config.batch_size,
        "grad_accum_steps": config.grad_accum_steps,
        # The input stream: an exact resume replays it from the global step, so anything
        # that changes it (order, split, the files themselves) must match.
        "seed": config.seed,
        "validation_split": config.validation_split,
        "synthetic_examples": config.synthetic_examples if config.dataset == "synthetic" else None,
        "data_files": trainer.datasets.fingerprint if trainer.datasets.fingerprint is not None
        else data_fingerprint(trainer.datasets.source),
    }


def data_fingerprint(source: str) -> dict:
    """Size and CRC-32 of each file in a dataset folder ({} for other sources).

    Content, not modification times: reinstalling the same package must not refuse a resume,
    while different files with the same names must.
    """
    if not source or not os.path.isdir(source):
        return {}
    fingerprint = {}
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            continue
        crc = 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                crc = zlib.crc32(chunk, crc)
        fingerprint[name] = [os.path.getsize(path), crc]
    return fingerprint


def check_compatible(model_dir: str, signature: dict, *, allow_policy_change: bool) -> bool:
    """Raises UserError when ``model_dir`` holds another run's checkpoints.

    Returns:
      True when ``model_dir`` already belongs to this run (a resume), False when it is new.
    """
    path = layout.run_file(model_dir)
    if not os.path.exists(path):
        if tf.train.latest_checkpoint(layout.checkpoints(model_dir)):
            raise UserError(
                f"{model_dir} holds checkpoints but no {layout.RUN_FILE}, so their model is unknown; "
                "use a new --model_dir")
        return False
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path} ({error}); use a new --model_dir") from None
    # Runs of earlier versions recorded no Keras: they all trained under Keras 2.
    written_under = saved.get("keras", 2)
    if written_under != signature["keras"]:
        raise UserError(
            f"{model_dir} holds checkpoints written under Keras {written_under}, but this run "
            f"uses {compat.KERAS_NAME} (their variables are laid out differently): "
            f"{compat.switch_to(written_under)} to "
            f"resume it, or use a new --model_dir. Nothing was changed.")
    keys = _MUST_MATCH if allow_policy_change else _MUST_MATCH + ("policy",)
    for key in keys:
        if saved.get(key) != signature[key]:
            shown = _SHOWN.get(key, key)
            hint = " (or pass --allow_policy_change)" if key == "policy" else ""
            raise UserError(
                f"{model_dir} was written by another run: its {shown} is "
                f"{_short(saved.get(key))}, this run's is {_short(signature[key])}; use a new "
                f"--model_dir{hint}. Nothing was changed.")
    return True


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


class CheckpointMismatch(UserError):
    """A readable checkpoint that does not fit this program (not damage on disk)."""


class Checkpointer:
    """Saves and restores a Trainer's full state; only the chief's files are kept.

    Saving is a collective (it reads sync-on-read variables such as the training metrics):
    every worker calls :meth:`save` and :meth:`maybe_save_best` at the same steps, decided
    from shared values (the global step, reduced metrics, :attr:`last_saved_step`).

    Args:
      trainer: the Trainer whose ``checkpoint_items()`` are saved.
      model_dir: the run's folder; checkpoints go to ``model_dir/checkpoints`` and the best
        one by a validation metric to ``model_dir/best``.
      keep: how many recent checkpoints to keep.
      is_chief: non-chief workers take part in each save (a distributed save is collective)
        but write into a temporary folder that is deleted; they restore from the chief's
        folder, which must therefore be on a file system every worker can read.
      worker_index: where this worker keeps its own input state (``input/worker-N``; default:
        the trainer's input pipeline index): the training iterator's position, for data
        whose position does not follow from the global step (``trainer.saves_input_state``).
    """

    def __init__(self, trainer, *, model_dir: str, keep: int = 3, is_chief: bool = True,
                 worker_index: Optional[int] = None):
        self.trainer = trainer
        self.model_dir = model_dir
        self.is_chief = is_chief
        self.keep = keep
        self.input_dir = layout.input_state(
            model_dir, trainer.input_context.input_pipeline_id if worker_index is None
            else worker_index)
        self._input = None  # (iterator, its CheckpointManager)
        self._input_unsaveable = False
        self.best_value = tf.Variable(float("nan"), trainable=False, name="best_value")
        self.items = dict(best_value=self.best_value, **trainer.checkpoint_items())
        self.checkpoint = tf.train.Checkpoint(**self.items)
        # The step of the newest checkpoint this job holds: set by a restore and by each save,
        # so every worker knows it without looking at (its own) files.
        self.last_saved_step: Optional[int] = None
        self.notes: list = []  # What a restore had to adapt (e.g. a fresh loss scale).
        root = model_dir if is_chief else tempfile.mkdtemp(prefix="worker-ckpt-")
        self._scratch = None if is_chief else root
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, layout.checkpoints(root), max_to_keep=keep,
            step_counter=trainer.global_step, checkpoint_name="ckpt")
        self.best_manager = tf.train.CheckpointManager(
            self.checkpoint, layout.best(root), max_to_keep=1, checkpoint_name="best")

    def restore_or_initialize(self) -> Optional[str]:
        """Restores the newest readable checkpoint; returns its path, or None when there is none.

        A checkpoint that cannot be read is damage: the one before it is tried, loudly. A
        readable one that does not fit this program is a mismatch: refused with what differs.
        Loss-scale state is the one part allowed to differ (``--loss_scale`` or the policy
        changed): a checkpoint without it starts a fresh scale, and this is said.

        Raises:
          UserError: when checkpoints exist but none can be read, or they do not fit.
        """
        directory = layout.checkpoints(self.model_dir)
        state = tf.train.get_checkpoint_state(directory)
        candidates = list(reversed(state.all_model_checkpoint_paths)) if state else []
        if not candidates:
            return None
        for path in candidates:
            try:
                names = {name for name, _ in tf.train.list_variables(path)}
            except Exception as error:  # noqa: BLE001 - TF's reader raises many types here.
                self._warn_damaged(path, error)
                continue
            saved_scale = any(n.startswith(compat.LOSS_SCALE_KEYS) for n in names)
            try:
                status = self.checkpoint.restore(path)
                # Values the checkpoint has and we lack (a loss scale, after a change to
                # float32) may go unused; every object of ours must get a value, except a
                # loss-scale state the checkpoint never had.
                status.expect_partial()
                unmatched = _unmatched_objects(status)
            except ValueError as error:  # Shapes or dtypes that do not fit.
                raise self._mismatch(path, error) from None
            except Exception as error:  # noqa: BLE001 - damaged data files.
                self._warn_damaged(path, error)
                continue
            scale_state = self._loss_scale_variables()
            # Dropout RNG state: checkpoints of earlier versions do not hold it.
            rng_state = [self.items.get("model_rng"), *self.trainer.rng_variables]
            unmatched_rng = [o for o in unmatched if any(o is v for v in rng_state)]
            unmatched = [o for o in unmatched if not any(o is v for v in rng_state)]
            if any(not any(obj is v for v in scale_state) for obj in unmatched):
                raise self._mismatch(path, AssertionError(
                    f"{len(unmatched)} of this program's values are not in it, e.g. "
                    f"{getattr(unmatched[0], 'name', type(unmatched[0]).__name__)}"))
            if unmatched_rng:
                self.notes.append(f"{os.path.basename(path)} holds no dropout RNG state (written "
                                  "by an earlier version); dropout masks restart from the seed")
            if unmatched:
                self.notes.append(f"{os.path.basename(path)} holds no loss-scale state (written "
                                  "without a dynamic loss scale); starting a fresh dynamic scale")
            elif saved_scale and not scale_state:
                self.notes.append(f"{os.path.basename(path)} holds a dynamic loss-scale state; "
                                  "this run does not use one, so it is left unused")
            self.last_saved_step = int(self.trainer.global_step.numpy())
            self._restore_input(self.last_saved_step)
            return path
        raise UserError(
            f"no checkpoint in {directory} can be restored (all damaged); move the "
            "folder away to start afresh, or point --model_dir elsewhere")

    def _input_manager(self):
        """The CheckpointManager of the trainer's current training iterator (None: none)."""
        iterator = None if self._input_unsaveable else self.trainer.input_state()
        if iterator is None:
            return None
        if self._input is None or self._input[0] is not iterator:
            manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(iterator=iterator), self.input_dir, max_to_keep=self.keep,
                step_counter=self.trainer.global_step, checkpoint_name="input")
            self._input = (iterator, manager)
        return self._input[1]

    def input_state_bytes(self) -> Optional[int]:
        """Size of this worker's newest saved input state (None: none saved)."""
        latest = tf.train.latest_checkpoint(self.input_dir) if self.trainer.saves_input_state \
            else None
        if not latest:
            return None
        return sum(os.path.getsize(p) for p in tf.io.gfile.glob(latest + ".*"))

    def _restore_input(self, step: int) -> None:
        """Restores this worker's iterator state saved with step ``step``, where it has one.

        Without one (an earlier version's checkpoint, input that was not streamed, a lost
        folder), ``train_from`` replays the position from the step, which says so.
        """
        if not self.trainer.saves_input_state:
            return
        path = os.path.join(self.input_dir, f"input-{step}")
        if not step or not tf.io.gfile.exists(path + ".index"):
            if step:
                self.notes.append(f"{self.input_dir} holds no input state for step {step}; the "
                                  "input position is replayed from the step")
            self.trainer.restore_input(None)  # A fresh stream at the step (see train_from).
            return
        try:
            self.trainer.restore_input(path)
        except (tf.errors.OpError, AssertionError, ValueError) as error:
            raise UserError(f"the input state {path} cannot be restored ({type(error).__name__}: "
                            f"{_first_line(error)}); the data pipeline or its files changed. "
                            f"Move {self.input_dir} away to replay the position from the step "
                            "instead") from None

    def _loss_scale_variables(self) -> list:
        """The dynamic loss-scale state variables of this run ([] when not dynamic)."""
        scaler = self.trainer.loss_scaler
        if not scaler.dynamic:
            return []
        return [scaler.state.scale, scaler.state.counter]

    @staticmethod
    def _mismatch(path: str, error: Exception) -> "CheckpointMismatch":
        return CheckpointMismatch(
            f"{path} is readable but does not fit this program ({type(error).__name__}: "
            f"{_first_line(error)}); it was written by different code or settings, not "
            "damaged. Use a new --model_dir, or run the code that wrote it")

    @staticmethod
    def _warn_damaged(path: str, error: Exception) -> None:
        warn(f"checkpoint {path} cannot be read ({type(error).__name__}: "
                       f"{_first_line(error)}); trying the one before it")

    def save(self) -> str:
        """Writes a checkpoint numbered by the global step (every worker must call it)."""
        lockstep.collective("checkpoint save")
        path = self.manager.save(checkpoint_number=self.trainer.global_step)
        self.last_saved_step = int(self.trainer.global_step.numpy())
        input_manager = self._input_manager()
        if input_manager is not None:  # This worker's own input position, by each worker.
            try:
                input_manager.save(checkpoint_number=self.trainer.global_step)
            except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError) as error:
                # A py_function or generator in the pipeline: its state is not saveable.
                self._input_unsaveable = True
                shutil.rmtree(self.input_dir, ignore_errors=True)
                warn(f"the training pipeline's state cannot be saved ({_first_line(error)}); a "
                     "resume will replay its position by reading and skipping (from_datasets "
                     "with train=a function) or cannot continue it")
        return path

    def maybe_save_best(self, value: float, *, higher_is_better: bool) -> bool:
        """Saves to ``best/`` when ``value`` beats the best so far; returns whether it did.

        ``value`` must be a reduced metric (equal on every worker): the decision leads to a
        collective save.
        """
        best = float(self.best_value.numpy())
        better = best != best or (value > best if higher_is_better else value < best)
        if better:
            self.best_value.assign(value)
            lockstep.collective("best checkpoint save")
            self.best_manager.save(checkpoint_number=self.trainer.global_step)
        return better

    def close(self) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)


def _unmatched_objects(status) -> list:
    """This program's objects with values that a restore left unset (TF's own rule).

    ``assert_existing_objects_matched`` only raises; the same sets tell which objects, so a
    missing loss-scale state can be told from a checkpoint of another program.
    """
    try:
        status.assert_existing_objects_matched()
        return []
    except AssertionError:
        pass
    # TensorFlow's private module, imported only where its private helper is used.
    from tensorflow.python.checkpoint import \
        checkpoint as tf_checkpoint  # noqa: E501 pylint: disable=g-direct-tensorflow-import

    state = status._checkpoint  # pylint: disable=protected-access
    matched = list(state.object_by_proto_id.values())
    return [obj for obj in tf_checkpoint._objects_with_attributes(state.all_python_objects)  # pylint: disable=protected-access
            if not any(obj is m for m in matched)]


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def write_run_file(model_dir: str, signature: dict) -> None:
    """Records the run's signature so a later start can tell a resume from a foreign folder."""
    os.makedirs(model_dir, exist_ok=True)
    path = layout.run_file(model_dir)
    try:
        with open(path) as f:
            if json.load(f) == json.loads(json.dumps(signature)):
                return  # A resume of the same run changes nothing on disk.
    except (OSError, ValueError):
        pass
    files.write_json(path, signature)
