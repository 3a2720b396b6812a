"""What the user reads on the console: the start-up banner, a line per epoch, tables, a bar.

Warnings go through :func:`trainer.errors.warn`; files the run writes through
:mod:`trainer.outputs.files`.
"""

from __future__ import annotations

from typing import Container, Dict, Sequence

from trainer import compat
from trainer.compat import keras
from trainer.core.steps import Trainer


def _out(line: str) -> None:
    print(line, flush=True)


def banner(*, device, config, trainer) -> None:
    """Prints what is about to run: device, policy, loss scaling, model, data."""
    ds = trainer.datasets
    params = trainer.model.count_params()
    _out(f"device: {device.description}")
    _out(f"policy: {config.policy} | loss scale: {config.resolved_loss_scale} | "
         f"model: {trainer.model_name} ({params:,} parameters) | optimizer: {config.optimizer} "
         f"lr={config.learning_rate} | {compat.KERAS_NAME}")
    # A Trainer with its own build_datasets trains on what that returned, not --dataset.
    name = config.dataset if type(trainer).build_datasets is Trainer.build_datasets else None
    _out(f"data: {f'{name} from ' if name else ''}{ds.source}: {ds.num_train} train / "
         f"{ds.num_validation} validation / {ds.num_test} test, batch {config.batch_size}, "
         f"{ds.steps_per_epoch} steps per epoch")


def epoch_line(log) -> str:
    """One line per epoch, like Keras' verbose=2 output plus loss-scaling state."""
    parts = [f"epoch {log.epoch}/{log.epochs}", f"step {log.global_step}"]
    parts += [f"{k} {v:.4f}" for k, v in log.train.items()]
    parts += [f"val_{k} {v:.4f}" for k, v in log.validation.items()]
    parts += [f"{log.ms_per_step:.2f} ms/step", f"{log.examples_per_sec:,.0f} examples/s",
              *([] if log.input_wait is None else [f"input wait {log.input_wait:.0%}"]),
              f"loss_scale {log.loss_scale:g}", f"skipped {log.skipped_steps}"]
    return " - ".join(parts)


def print_epoch(log) -> None:
    _out(epoch_line(log))


def print_test(results: Dict[str, float]) -> None:
    _out("test: " + " - ".join(f"{k} {v:.4f}" for k, v in results.items()))


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *,
                 right: Container[int] = ()) -> str:
    """Rows of text cells as a fixed-width table: header, a rule, one line per row.

    Args:
      header: the column titles.
      rows: the cells, already formatted as strings, one sequence per row.
      right: indices of the columns to right-align (numbers); the others are left-aligned.
    """
    table = [tuple(header)] + [tuple(row) for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if i in right else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
             for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


class ProgressBar:
    """A Keras ``Progbar`` per epoch, with ETA, for interactive terminals (chief only).

    It is given values, never metrics: reading a metric is a collective that every worker
    must run (see :mod:`trainer.runtime.lockstep`), so the loop reads them on all workers and hands
    the reduced values to the chief's bar.
    """

    def __init__(self, steps_per_epoch: int, metric_names):
        self.steps_per_epoch = steps_per_epoch
        # Every value shown is already a running mean or a state: Progbar must not average it.
        self._new_bar = lambda: keras.utils.Progbar(
            steps_per_epoch, stateful_metrics=list(metric_names) + ["loss_scale"])
        self._bar = self._new_bar()  # Its clock starts now, with the epoch.

    def update(self, step: int, values: Dict[str, float]) -> None:
        """Shows ``values`` (already reduced across workers) at global step ``step``."""
        in_epoch = (step - 1) % self.steps_per_epoch + 1
        self._bar.update(in_epoch, values=list(values.items()),
                         finalize=in_epoch == self.steps_per_epoch)
        if in_epoch == self.steps_per_epoch:
            self._bar = self._new_bar()
