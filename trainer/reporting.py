"""What the user sees: the start-up banner, a line per epoch, the metrics file."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Dict

from trainer.errors import UserError


def _out(line: str) -> None:
    print(line, flush=True)


def banner(*, device, config, trainer) -> None:
    """Prints what is about to run: device, policy, loss scaling, model, data."""
    ds = trainer.datasets
    params = trainer.model.count_params()
    _out(f"device: {device.description}")
    _out(f"policy: {config.policy} | loss scale: {config.resolved_loss_scale} | "
         f"model: {trainer.model_name} ({params:,} parameters) | optimizer: {config.optimizer} "
         f"lr={config.learning_rate}")
    _out(f"data: {config.dataset} from {ds.source}: {ds.num_train} train / "
         f"{ds.num_validation} validation / {ds.num_test} test, batch {config.batch_size}, "
         f"{ds.steps_per_epoch} steps per epoch")


def epoch_line(log) -> str:
    """One line per epoch, like Keras' verbose=2 output plus loss-scaling state."""
    parts = [f"epoch {log.epoch}/{log.epochs}", f"step {log.global_step}"]
    parts += [f"{k} {v:.4f}" for k, v in log.train.items()]
    parts += [f"val_{k} {v:.4f}" for k, v in log.validation.items()]
    parts += [f"{log.ms_per_step:.2f} ms/step", f"{log.examples_per_sec:,.0f} examples/s",
              f"loss_scale {log.loss_scale:g}", f"skipped {log.skipped_steps}"]
    return " - ".join(parts)


def print_epoch(log) -> None:
    _out(epoch_line(log))


def print_test(results: Dict[str, float]) -> None:
    _out("test: " + " - ".join(f"{k} {v:.4f}" for k, v in results.items()))


def prepare_output_file(path: str) -> None:
    """Creates the parent folder of an output file now, so a bad path fails before training."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create folder {folder} for {path}: {error.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"folder {folder} is not writable; choose another --metrics_file")


def write_json(path: str, payload: dict) -> None:
    """Writes ``payload`` atomically (temp file + rename): readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode.
    os.replace(tmp, path)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class ProgressBar:
    """A Keras ``Progbar`` per epoch, with ETA, for interactive terminals."""

    def __init__(self, steps_per_epoch: int, metric_names):
        from trainer.compat import keras  # Only bar mode needs Keras here.

        self.steps_per_epoch = steps_per_epoch
        # Every value shown is already a running mean or a state: Progbar must not average it.
        self._new_bar = lambda: keras.utils.Progbar(
            steps_per_epoch, stateful_metrics=list(metric_names) + ["loss_scale"])
        self._bar = self._new_bar()  # Its clock starts now, with the epoch.

    def update(self, trainer, step: int) -> None:
        in_epoch = (step - 1) % self.steps_per_epoch + 1
        values = list(trainer.train_results().items()) + [("loss_scale", trainer.loss_scale)]
        self._bar.update(in_epoch, values=values, finalize=in_epoch == self.steps_per_epoch)
        if in_epoch == self.steps_per_epoch:
            self._bar = self._new_bar()


def progress_mode(requested: str) -> str:
    """'bar' on a terminal and 'log' otherwise, for ``requested == 'auto'``."""
    if requested == "auto":
        return "bar" if sys.stdout.isatty() else "log"
    return requested
