"""TensorBoard summaries (``tensorboard --logdir MODEL_DIR``): train/ and validation/ scalars."""

from __future__ import annotations

from typing import Dict, Optional

from trainer.compat import tf
from trainer.outputs import layout


class SummaryWriter:
    """Writes scalars per split; a no-op without a model_dir or on a non-chief worker."""

    def __init__(self, model_dir: Optional[str], *, enabled: bool = True):
        self._writers: Dict[str, tf.summary.SummaryWriter] = {}
        self._model_dir = model_dir if enabled else None

    @property
    def enabled(self) -> bool:
        """Whether anything is written (a model_dir on the chief): callers skip work otherwise."""
        return bool(self._model_dir)

    def scalars(self, split: str, step: int, values: Dict[str, float]) -> None:
        """Writes ``values`` under ``split`` ('train' or 'validation') at ``step``."""
        if not self._model_dir:
            return
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(
                layout.summaries(self._model_dir, split))
        with self._writers[split].as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
