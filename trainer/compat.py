"""The one seam between the two Kerases: nothing else in the package asks which one it has.

Which Keras a run uses is TensorFlow's own rule, never changed here: ``tf.keras`` is Keras 2 on
TensorFlow 2.15 (the Gaudi stack) and, on TensorFlow >= 2.16, Keras 3 unless the user set
``TF_USE_LEGACY_KERAS=1`` before starting (then Keras 2 from the ``tf_keras`` package). The
library reads that answer from ``tf.keras`` and exports it as ``keras``; models, layers and
optimizers of the run must come from it (``import keras`` or ``tf.keras`` under Keras 3).

What differs, and is handled here (docs/keras.md has the full guide):

- Loss scaling. Both ``LossScaleOptimizer`` wrappers hold a dynamic scale and a good-step
  counter, under different names. The Trainer scales and unscales explicitly under both
  (Keras 3's wrapper has no ``get_unscaled_gradients`` and would divide again inside its own
  ``apply``), so only the state is taken from the wrapper: :func:`loss_scale_optimizer`,
  :class:`LossScaleState`, :data:`LOSS_SCALE_KEYS`.
- Applying gradients. The Trainer all-reduces once, before its finiteness check and clipping.
  Keras 2 is told not to reduce again (``skip_gradients_aggregation``); Keras 3's TensorFlow
  optimizer has no such switch and would sum the already-summed gradients once more, so its
  reduction is turned into a pass-through on the optimizers the Trainer owns
  (:func:`prepare_optimizer`, :func:`apply_gradients`).
- Variables. A Keras 3 variable wraps a ``tf.Variable`` (:func:`tf_variable`); Keras 3 keeps
  a layer's RNG (dropout) in ``SeedGenerator`` state variables that ``tf.train.Checkpoint``
  does not find by itself (:func:`rng_variables`); Keras 2 needs
  ``enable_tf_random_generator`` to keep that state in variables at all (:func:`seed_layers`).
- Which Keras an object belongs to (:func:`keras_of`, :func:`check_same_keras`), and the
  optimizer's fused (XLA) update.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import List, Optional

import tensorflow as tf

from trainer.errors import UserError

TF_VERSION = tuple(int(part) for part in tf.__version__.split(".")[:2])


def _pick_keras():
    """The Keras that ``tf.keras`` means in this process, by TensorFlow's rule."""
    if TF_VERSION < (2, 16):
        return tf.keras, 2, f"Keras {tf.__version__} (tf.keras)"
    try:
        model_module = tf.keras.Model.__module__  # The lazy loader imports the chosen Keras.
    except Exception as error:  # noqa: BLE001 - whatever the chosen Keras failed with.
        if os.environ.get("TF_USE_LEGACY_KERAS") in ("true", "True", "1"):  # TF's own test.
            raise UserError(
                f"TF_USE_LEGACY_KERAS={os.environ['TF_USE_LEGACY_KERAS']} asks TensorFlow "
                f"{tf.__version__} for Keras 2, which is not installed: `pip install "
                f"tf_keras~={tf.__version__.rsplit('.', 1)[0]}.0`, or unset TF_USE_LEGACY_KERAS "
                "to use Keras 3") from None
        _check_backend(os.environ.get("KERAS_BACKEND", "tensorflow"), error)
        raise UserError(f"TensorFlow {tf.__version__} cannot load Keras ({type(error).__name__}: "
                        f"{error}); reinstall it: pip install -r requirements.txt") from None
    if model_module.startswith("tf_keras"):
        import tf_keras  # Only the Keras TensorFlow chose is imported.
        return tf_keras, 2, f"Keras {tf_keras.__version__} (tf_keras)"
    import keras as keras3  # Only the Keras TensorFlow chose is imported.
    _check_backend(keras3.backend.backend())
    return keras3, 3, f"Keras {keras3.__version__}"


def _check_backend(backend: str, error: Optional[Exception] = None) -> None:
    if backend == "tensorflow":
        return
    failed = f", which failed to load ({type(error).__name__}: {error})" if error else ""
    raise UserError(
        f"Keras 3 is set to the {backend!r} backend (KERAS_BACKEND or ~/.keras/keras.json)"
        f"{failed}; this framework trains with TensorFlow: set KERAS_BACKEND=tensorflow "
        "before starting")


keras, KERAS_MAJOR, KERAS_NAME = _pick_keras()
mixed_precision = keras.mixed_precision

def switch_to(major: int) -> str:
    """How to start a process that runs Keras ``major`` (for messages)."""
    if major == 2:
        return "set TF_USE_LEGACY_KERAS=1 before starting"
    return ("unset TF_USE_LEGACY_KERAS (TensorFlow >= 2.16)" if TF_VERSION >= (2, 16)
            else "use TensorFlow >= 2.16")


_OTHER = 3 if KERAS_MAJOR == 2 else 2
# The fix for an object (or a failure) of the other Keras, for messages.
_BUILD_WITH = "`import keras` or tf.keras" if KERAS_MAJOR == 3 else "tf_keras or tf.keras"
_FIX = (f"build it with {_BUILD_WITH}, or {switch_to(_OTHER)} to train with Keras {_OTHER}"
        f"{' (tf_keras)' if _OTHER == 2 else ''}")
# Where each Keras' classes live: the top package of their modules.
_ROOTS = {"tf_keras": 2, "keras": 2 if TF_VERSION < (2, 16) else 3}


def keras_of(obj) -> Optional[int]:
    """2 or 3 for an object (or class) from a Keras package; None for anything else."""
    cls = obj if isinstance(obj, type) else type(obj)
    for klass in cls.__mro__:
        root = klass.__module__.split(".")[0]
        if root in _ROOTS:
            if root == "keras" and TF_VERSION >= (2, 16):
                version = getattr(sys.modules.get("keras"), "__version__", "3")
                return 2 if version.startswith("2") else 3
            return _ROOTS[root]
    return None


def check_same_keras(obj, what: str) -> None:
    """Refuses a Keras object that belongs to the other Keras than the run's.

    Args:
      obj: a model, layer, optimizer or metric.
      what: what it is, for the message (e.g. "build_model() returned a model").

    Raises:
      UserError: one line naming both Kerases and the fix.
    """
    major = keras_of(obj)
    if major is None or major == KERAS_MAJOR:
        return
    built_with = "tf_keras" if major == 2 else "`import keras`"
    raise UserError(
        f"{what} is a Keras {major} {type(obj).__name__} (built with {built_with}), but this "
        f"run uses {KERAS_NAME}, as TensorFlow chose: {_FIX}")


def check_parts(model, what: str) -> None:
    """:func:`check_same_keras` for ``model`` and every layer or attribute it holds."""
    check_same_keras(model, what)
    layers = [model, *sublayers(model)] if hasattr(model, "_flatten_layers") else [model]
    for layer in layers:
        for name, value in list(vars(layer).items()):
            if isinstance(value, (list, tuple)):
                values = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
            else:
                values = [(name, value)]
            for label, part in values:
                check_same_keras(part, f"{what} holding {label!r} in layer "
                                       f"{getattr(layer, 'name', '?')!r}, which")


def other_keras_in_traceback(error: BaseException) -> Optional[int]:
    """The other Keras' major version when ``error`` was raised inside its code, else None.

    A model mixing the two Kerases (a tf_keras layer called on a Keras 3 tensor) fails deep
    inside one of them; this tells such a failure from a bug in the user's own code.
    """
    other = 2 if KERAS_MAJOR == 3 else 3
    package = "tf_keras" if other == 2 else "keras"
    module = sys.modules.get(package)
    if module is None or keras_of(getattr(module, "Model", None)) != other:
        return None
    root = os.path.dirname(module.__file__) + os.sep
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(root):
            return other
        tb = tb.tb_next
    return None


def mixed_keras_error(error: BaseException, what: str) -> Optional[UserError]:
    """A one-line UserError when ``error`` came from mixing the Kerases, else None."""
    other = other_keras_in_traceback(error)
    if other is None:
        return None
    return UserError(
        f"{what} failed inside Keras {other} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}): it mixes Keras {other} objects "
        f"into a run of {KERAS_NAME}; {_FIX}")


def tf_variable(variable) -> tf.Variable:
    """The ``tf.Variable`` behind a Keras variable (Keras 3 wraps one; Keras 2's is one)."""
    return getattr(variable, "value", variable) if KERAS_MAJOR == 3 else variable


def sublayers(model) -> list:
    """Every layer inside ``model``, recursively (Keras 3 layers are not ``tf.Module``s, so
    ``submodules`` is Keras 2 only; both have this private walk)."""
    return list(model._flatten_layers(include_self=False))  # pylint: disable=protected-access


def producing_layer(tensor):
    """The layer whose output a functional model's symbolic tensor is (None if unknown)."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    # Keras 2 names it `layer`; Keras 3 `operation` (the same tuple's first field).
    return getattr(history, "layer", None) or getattr(history, "operation", None)


def weights(model) -> List[tf.Variable]:
    """``model.weights`` as ``tf.Variable`` objects (with TensorFlow dtypes and shapes)."""
    return [tf_variable(w) for w in model.weights]


# ---------------------------------------------------------------- loss scaling


@dataclasses.dataclass(frozen=True)
class LossScaleState:
    """A dynamic loss scale's variables inside a Keras ``LossScaleOptimizer``.

    Attributes:
      scale: float32 variable, the current scale.
      counter: integer variable, finite steps since the scale last changed.
      growth_steps: finite steps before the scale doubles.
    """

    scale: tf.Variable
    counter: tf.Variable
    growth_steps: int


# Checkpoint key prefixes of that state in the Trainer's checkpoints (optimizer_items).
LOSS_SCALE_KEYS = ("optimizer/loss_scale/",) if KERAS_MAJOR == 2 else ("loss_scale/",)

INITIAL_SCALE = 2.0 ** 15  # Both Kerases start a dynamic scale here.


def loss_scale_optimizer(inner, *, growth_steps: int):
    """Wraps ``inner`` in the run's Keras ``LossScaleOptimizer`` with a dynamic scale."""
    if KERAS_MAJOR == 2:
        return mixed_precision.LossScaleOptimizer(inner, dynamic=True,
                                                  initial_scale=INITIAL_SCALE,
                                                  dynamic_growth_steps=growth_steps)
    return keras.optimizers.LossScaleOptimizer(inner, initial_scale=INITIAL_SCALE,
                                               dynamic_growth_steps=growth_steps)


def loss_scale_state(wrapper) -> LossScaleState:
    """The state variables of a wrapper from :func:`loss_scale_optimizer` (None before Keras 3
    builds it: its variables are made by ``build``)."""
    if KERAS_MAJOR == 2:
        state = wrapper._loss_scale  # pylint: disable=protected-access
        return LossScaleState(state.current_loss_scale, state.counter, int(state.growth_steps))
    if not wrapper.built:
        return None
    return LossScaleState(wrapper.dynamic_scale.value, wrapper.step_counter.value,
                          int(wrapper.dynamic_growth_steps))


def optimizer_items(optimizer, inner) -> dict:
    """The checkpoint items of an optimizer, whether or not it is wrapped for loss scaling.

    The keys of the inner optimizer's state must not depend on the wrapper, so that a run may
    change its policy or loss-scale mode and resume. Keras 2's wrapper delegates its
    dependencies to the inner optimizer (the same keys, plus ``optimizer/loss_scale/``);
    Keras 3's nests the inner one under ``inner_optimizer/``, so there the inner optimizer is
    saved itself and the scale's state beside it, as ``loss_scale/``.
    """
    if KERAS_MAJOR == 2 or optimizer is inner:
        return {"optimizer": optimizer}
    state = loss_scale_state(optimizer)
    return {"optimizer": inner,
            "loss_scale": tf.train.Checkpoint(dynamic_scale=state.scale,
                                              step_counter=state.counter)}


# ---------------------------------------------------------------- optimizers


def prepare_optimizer(optimizer, *, fuse: bool) -> None:
    """Readies an inner optimizer for the Trainer's step (which all-reduces by itself).

    Args:
      optimizer: the inner optimizer, from the run's Keras.
      fuse: XLA-compile the per-variable update. Keras 2 turns an optimizer's
        ``jit_compile`` off when no GPU is present, so on a CPU the float32 Adam update runs
        as a dozen separate element-wise ops per variable (43% of a wide MLP's bf16 step
        here; fused, that step is 1.30x faster: BENCHMARKS.md). Keras 3's TensorFlow
        optimizer never compiles its update; its ``update_step`` is compiled the same way.
    """
    if KERAS_MAJOR == 2:
        if fuse and hasattr(optimizer, "jit_compile"):
            optimizer.jit_compile = True
        return
    # The step's gradients are summed across replicas already; Keras 3 would sum them again.
    if not hasattr(optimizer, "_all_reduce_sum_gradients"):
        raise RuntimeError(f"Keras {keras.__version__} changed its TensorFlow optimizer: "
                           "trainer/compat.py must learn how to skip its gradient all-reduce")
    optimizer._all_reduce_sum_gradients = lambda grads_and_vars: grads_and_vars
    optimizer._trainer_plain_update_step = optimizer.update_step
    set_fused(optimizer, fuse)


def set_fused(optimizer, fused: bool) -> None:
    """Turns the XLA-compiled per-variable update on or off (before the step is traced)."""
    if KERAS_MAJOR == 2:
        optimizer.jit_compile = fused
        return
    original = optimizer._trainer_plain_update_step
    if not fused:
        optimizer.update_step = original
        return

    # One trace per variable, as Keras 2's `_update_step_xla` keys them: the slots are
    # looked up when tracing, so two variables of one shape must not share a trace.
    @tf.function(jit_compile=True)
    def fused_update_step(gradient, variable, learning_rate, key):
        del key  # Only keys the trace.
        return original(gradient, variable, learning_rate)

    def update_step(gradient, variable, learning_rate):
        # The learning rate may be a Keras variable, which tf.function cannot trace.
        return fused_update_step(gradient, variable, tf.convert_to_tensor(learning_rate),
                                 optimizer._var_key(variable))  # pylint: disable=protected-access

    optimizer.update_step = update_step


def is_fused(optimizer) -> bool:
    """Whether :func:`set_fused` (or :func:`prepare_optimizer`) turned the fused update on."""
    if KERAS_MAJOR == 2:
        return bool(getattr(optimizer, "jit_compile", False))
    return optimizer.update_step is not getattr(optimizer, "_trainer_plain_update_step", None)


def apply_gradients(optimizer, gradients, variables) -> None:
    """Applies already all-reduced gradients (replica context), without reducing again."""
    if KERAS_MAJOR == 2:
        optimizer.apply_gradients(zip(gradients, variables), skip_gradients_aggregation=True)
    else:
        optimizer.apply(gradients, variables)


def seed_layers() -> None:
    """Keeps layer RNG state (dropout) in variables that checkpoints hold (bit-exact resume).

    Keras 3 always does (``SeedGenerator`` state variables); Keras 2 only when asked.
    """
    if KERAS_MAJOR == 2:
        keras.backend.experimental.enable_tf_random_generator()


def metrics_checkpoint(metrics: dict) -> tf.train.Checkpoint:
    """A checkpoint object holding the state of named Keras metrics.

    Keras 2 metrics are trackable themselves (their keys stay those of earlier versions);
    Keras 3 metrics are not, so their variables are held by position.
    """
    if KERAS_MAJOR == 2:
        return tf.train.Checkpoint(**metrics)
    return tf.train.Checkpoint(**{
        name: tf.train.Checkpoint(**{f"v{i}": tf_variable(v)
                                     for i, v in enumerate(metric.variables)})
        for name, metric in metrics.items()})


def rng_variables(model) -> List[tf.Variable]:
    """Variables of ``model``'s layer RNGs (dropout) that ``tf.train.Checkpoint(model=...)``
    misses, so a resumed run draws the masks the uninterrupted one would have.

    Keras 3 keeps them on ``SeedGenerator`` objects, which are not trackable. Keras 2 (after
    ``seed_layers``) makes a ``tf.random.Generator`` per layer, lazily at the first draw and
    out of the checkpoint's reach; here it is made now, so call this once, in the strategy's
    scope, before the first step.
    """
    found = []
    for layer in [model, *sublayers(model)]:
        if KERAS_MAJOR == 3:
            found += [generator.state.value
                      for generator in getattr(layer, "_seed_generators", [])]
            continue
        generator = getattr(layer, "_random_generator", None)
        if getattr(generator, "_rng_type", None) == "stateful":
            generator._maybe_init()  # pylint: disable=protected-access
            found.append(generator._generator.state)  # pylint: disable=protected-access
    return found


__all__ = ["tf", "keras", "mixed_precision", "TF_VERSION", "KERAS_MAJOR", "KERAS_NAME",
           "switch_to", "keras_of", "check_same_keras", "check_parts", "mixed_keras_error",
           "tf_variable",
           "weights", "producing_layer", "sublayers", "LossScaleState", "LOSS_SCALE_KEYS",
           "optimizer_items", "loss_scale_optimizer", "loss_scale_state", "prepare_optimizer",
           "set_fused", "is_fused", "apply_gradients", "seed_layers", "rng_variables",
           "metrics_checkpoint"]
