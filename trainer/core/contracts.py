"""Subclass contracts, checked once with one clear line each (no silent wrong training).

What a ``Trainer`` subclass hands the base class must fit: a loss per example, a training
stream that ``train_from`` reproduces, a per-replica batch that accumulation can split. Each
check runs at construction or at the first trace, before any step.
"""

from __future__ import annotations

from trainer import data
from trainer.compat import tf
from trainer.config import TrainConfig
from trainer.errors import UserError


def check_accumulation(config: TrainConfig, replicas: int) -> None:
    """Refuses a per-replica batch that ``grad_accum_steps`` cannot split evenly."""
    k = config.grad_accum_steps
    per_replica = config.batch_size // replicas
    if k == 1 or (per_replica % k == 0 and config.batch_size % replicas == 0):
        return
    unit = replicas * k
    lower = config.batch_size - config.batch_size % unit
    fewer = max(d for d in range(1, k + 1) if per_replica % d == 0) if per_replica else 1
    raise UserError(
        f"--batch_size={config.batch_size} gives {per_replica} examples per replica on "
        f"{replicas} replicas, which --grad_accum_steps={k} cannot split into equal "
        f"micro-batches; use a --batch_size divisible by {unit} (e.g. "
        f"--batch_size={lower or unit} or --batch_size={lower + unit}) or "
        f"--grad_accum_steps={fewer}")


def describe_spec(spec) -> str:
    """'(float32[32,28,28,1], int32[32])': an element_spec on one short line."""
    def one(s):
        shape, dtype = getattr(s, "shape", None), getattr(s, "dtype", None)
        if shape is None or dtype is None:
            return type(s).__name__
        dims = ",".join("?" if d is None else str(d) for d in shape.as_list()) \
            if shape.rank is not None else "..."
        return f"{dtype.name}[{dims}]"

    return "(" + ", ".join(one(s) for s in tf.nest.flatten(spec)) + ")"


def check_train_from(datasets: data.Datasets, owner: str) -> None:
    """Refuses a ``train`` that ``train_from`` does not reproduce (the Trainer reads the latter).

    The Trainer reads its input from ``train_from(examples_seen)``, so a ``build_datasets``
    override that maps ``train`` to new features or targets but keeps the old ``train_from``
    would silently train on the old data. Only a change of element spec (dtype, shape,
    structure) is detectable without reading data; changes that keep it are the override's
    duty (the ``build_datasets`` docstring says so).
    """
    if datasets.train_from is None:
        return
    got, expected = datasets.train.element_spec, datasets.train_from(0).element_spec
    if got != expected:
        raise UserError(
            f"{owner}.build_datasets returned a `train` that yields {describe_spec(got)} but a "
            f"`train_from` that yields {describe_spec(expected)}; the Trainer reads "
            "train_from(n), which must be train with its first n examples skipped: map both "
            "with datasets.map_train(fn), or set train_from=None")


def contract_error(message: str) -> UserError:
    """A UserError to raise while tracing: AutoGraph passes it through unchanged.

    AutoGraph otherwise re-creates an exception raised in converted code with an 'in user
    code:' stack in its message, and the user would get a multi-line error.
    """
    error = UserError(message)
    error.ag_pass_through = True
    return error


def check_loss_shape(per_example, labels, features, *, owner: str, micro: bool) -> None:
    """Refuses, when the step is traced, a compute_loss result that is not one per example.

    A ``[batch, 28, 28]`` loss would be summed over every pixel (the optimised loss 784x
    the logged one), a scalar mean divided by the batch once more: both train silently
    wrong. The static shape is all there is to check; an unknown dimension passes.
    """
    reference = tf.nest.flatten(labels) or tf.nest.flatten(features)
    batch = reference[0].shape[0] if reference and reference[0].shape.rank else None
    shape = per_example.shape
    if shape.rank is None or (shape.rank == 1 and None in (batch, shape[0])) or \
            shape.as_list() == [batch]:
        return
    part = "micro-batch" if micro else "batch"
    raise contract_error(
        f"{owner}.compute_loss returned shape {shape.as_list()}; it must "
        f"return one loss per example, shape [{batch if batch is not None else 'batch'}] "
        f"(this replica's {part}): reduce any other axes yourself (e.g. "
        "tf.reduce_mean(loss, axis=[1, 2])) and do not average over the batch (the Trainer "
        "divides the sum by the global batch size)")
