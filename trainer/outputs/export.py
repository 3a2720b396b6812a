"""Export: the trained model as a SavedModel with a float32 ``serving_default`` signature.

``--export_dir=PATH`` is checked before training (a path that exists and is not an empty
folder is refused: nothing on disk is overwritten) and written after the last step, once the
final weights and test loss are known to be finite.

The signature takes what the model saw in training: float32 inputs of the dataset's input
shape with any batch size (``images``: uint8 pixels scaled to [0, 1], float images as
given) and returns the model's outputs as float32 (``outputs``; ``output_<i>`` for a model
with several). The computation runs under the training policy (bf16 math under
``mixed_bfloat16``), exactly as the Trainer's own evaluation does.

Saving reads every model variable, and variables that sync on read (a BatchNorm's moving
statistics under a multi-worker strategy) all-reduce when read: it is a collective. So every
worker exports, in the same order (the lockstep rule, ``trainer/runtime/lockstep.py``); non-chief
workers write into a scratch folder that is deleted. The chief writes into a hidden folder
next to ``PATH`` and renames it into place, so a crash never leaves half a SavedModel there.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from trainer.compat import tf
from trainer.core import precision
from trainer.errors import UserError
from trainer.runtime import lockstep


def check_export_dir(path: str) -> None:
    """Refuses, before training, an export folder that would overwrite something.

    ``path`` may be missing (it is created at the end, with its parent folders) or an empty
    folder; its parent must be writable, which is proved by creating and removing a folder.

    Raises:
      UserError: one line saying what is in the way and how to fix it.
    """
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise UserError(f"--export_dir={path} is a file; pass a new folder for the SavedModel")
        if os.listdir(path):
            raise UserError(
                f"--export_dir={path} already holds files and exports never overwrite; pass a "
                "new or empty folder (or remove that one)")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".export-check-"))
    except OSError as error:
        raise UserError(f"cannot use --export_dir={path}: cannot create folders in {parent} "
                        f"({error.strerror or error}); pass a writable path") from None


class _Serving(tf.Module):
    """The exported object: the model plus one traced, float32-in/float32-out function."""

    def __init__(self, model, input_shape, auto_cast: bool):
        super().__init__()
        self.model = model
        self._auto_cast = auto_cast
        self.serve = tf.function(
            self._serve,
            input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name="images")])

    def _serve(self, images):
        outputs = self.model(images, training=False)
        if self._auto_cast:
            outputs = precision.cast_outputs(outputs)
        flat = [tf.cast(t, tf.float32) for t in tf.nest.flatten(outputs)]
        if len(flat) == 1:
            return {"outputs": flat[0]}
        return {f"output_{i}": t for i, t in enumerate(flat)}


def export_model(trainer, path: str, *, is_chief: bool) -> str:
    """Writes ``trainer.model`` as a SavedModel to ``path`` (chief) or a scratch folder.

    Every worker must call this at the same point (it is a collective).

    Returns:
      A one-line description of the signature, e.g.
      ``serving_default: images float32[?,28,28,1] -> outputs float32[?,10]``.

    Raises:
      UserError: when ``path`` was filled by someone else during training; the SavedModel
        is then left in the hidden folder the message names.
    """
    lockstep.collective("export")
    input_shape = tuple(trainer.datasets.input_shape)
    module = _Serving(trainer.model, input_shape, trainer.config.auto_cast_outputs)
    serve = module.serve.get_concrete_function()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent if is_chief else None,
                               prefix=".export-" if is_chief else "worker-export-")
    with trainer.strategy.scope():
        tf.saved_model.save(module, staging, signatures={"serving_default": serve})
    if not is_chief:
        shutil.rmtree(staging, ignore_errors=True)
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; a model folder is not.
        try:
            os.replace(staging, path)  # Atomic; replaces a missing or empty folder only.
        except OSError:
            raise UserError(f"--export_dir={path} was filled by something else during training; "
                            f"the SavedModel is in {staging} instead") from None
    outputs = ", ".join(f"{name} {spec.dtype.name}[{_dims(spec.shape)}]"
                        for name, spec in sorted(serve.structured_outputs.items()))
    return f"serving_default: images float32[{_dims(serve.inputs[0].shape)}] -> {outputs}"


def _dims(shape: tf.TensorShape) -> str:
    return ",".join("?" if d is None else str(d) for d in shape.as_list())
