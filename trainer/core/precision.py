"""Dtype policies: setting them for model construction and checking what the model outputs."""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Sequence

from trainer.compat import keras, mixed_precision, tf
from trainer.errors import UserError, warn

POLICY_COMPUTE_DTYPES = {
    "float32": "float32",
    "mixed_bfloat16": "bfloat16",
    "mixed_float16": "float16",
}


def is_mixed(policy: str) -> bool:
    """True for the policies whose layers compute in 16 bits with float32 variables."""
    return policy.startswith("mixed_")


@contextlib.contextmanager
def policy_scope(policy: str) -> Iterator[None]:
    """Sets Keras' global dtype policy while models are built, then restores the old one.

    Layers read the global policy when constructed, so the policy only needs to be in place
    while ``build_model`` runs; restoring it keeps one run from leaking into the next.
    """
    previous = mixed_precision.global_policy()
    mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        mixed_precision.set_global_policy(previous)


def check_trainable(policy: str) -> None:
    """Refuses a policy setting no Trainer can train under as given.

    Raises:
      UserError: ``policy`` is 'auto' (or anything but POLICY_COMPUTE_DTYPES' keys): only
        ``trainer.run`` resolves 'auto', by a trial before it builds the Trainer.
    """
    if policy not in POLICY_COMPUTE_DTYPES:
        raise UserError(
            f"policy {policy!r} is not a dtype policy: --policy=auto is decided by "
            "trainer.run before it builds the Trainer; a Trainer built directly takes one of "
            f"{', '.join(POLICY_COMPUTE_DTYPES)}")


def output_names(model: keras.Model, count: int) -> List[str]:
    """A readable name per model output: the producing layer for functional models."""
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != count:
        names = [model.name if count == 1 else f"{model.name}[{i}]" for i in range(count)]
    return names


def check_output_dtypes(model: keras.Model, outputs, *, policy: str, auto_cast: bool) -> None:
    """Refuses a model whose outputs are not float32 under a mixed policy.

    A bf16/fp16 softmax feeding the loss loses accuracy (the tutorial's rule). With
    ``auto_cast`` the Trainer casts outputs to float32 instead of refusing, and this warns
    once, naming the layers whose 16-bit output gets cast (a cast after a 16-bit softmax does
    not bring the precision back).

    Raises:
      UserError: naming the offending output layer and the fix.
    """
    if not is_mixed(policy):
        return
    flat = tf.nest.flatten(outputs)
    low = [(name, tensor.dtype.name) for name, tensor in zip(output_names(model, len(flat)), flat)
           if tensor.dtype in (tf.float16, tf.bfloat16)]
    if not low:
        return
    if auto_cast:
        layers = ", ".join(f"{name!r} ({dtype})" for name, dtype in low)
        warn(
            f"--auto_cast_outputs: casting the 16-bit output of model {model.name!r} layer(s) "
            f"{layers} to float32 under policy {policy}; a softmax computed in 16 bits stays "
            "imprecise after the cast: give that layer dtype='float32' instead")
        return
    name, dtype = low[0]
    raise UserError(
        f"model {model.name!r} output layer {name!r} produces {dtype} under policy {policy}; "
        f"the output (and a final softmax) must be float32: give that layer dtype='float32' "
        f"(e.g. keras.layers.Activation('softmax', dtype='float32')); for a "
        f"keras.applications model pass classifier_activation=None and add "
        f"keras.layers.Activation('softmax', dtype='float32') on its output; or pass "
        f"--auto_cast_outputs to cast outputs automatically")


def cast_outputs(outputs):
    """Casts every floating output to float32 (the opt-in alternative to refusing)."""
    return tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float32) if t.dtype.is_floating else t, outputs)


def layer_dtypes(model: keras.Model) -> Sequence[dict]:
    """One row per layer: name, class, compute dtype and variable dtype."""
    return [
        {
            "name": layer.name,
            "class": type(layer).__name__,
            "compute_dtype": layer.compute_dtype,
            "variable_dtype": layer.variable_dtype,
        }
        for layer in model.layers
    ]
