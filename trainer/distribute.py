"""Distribution: which tf.distribute strategy a run uses and whether this process is the chief.

(Multi-worker and HPU strategies are filled in by the distribution work; see issue 5.)
"""

from __future__ import annotations

import dataclasses

from trainer.compat import tf


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in the job.

    Attributes:
      strategy: the tf.distribute strategy to train under.
      is_chief: only the chief writes checkpoints, summaries and the metrics file.
      num_workers: processes in the job.
      worker_index: this process's index (0 is the chief).
    """

    strategy: tf.distribute.Strategy
    is_chief: bool = True
    num_workers: int = 1
    worker_index: int = 0


def setup(config, device) -> Cluster:
    """Builds the strategy ``config.distribution`` asks for on ``device``."""
    del device
    if config.distribution in ("auto", "none"):
        return Cluster(strategy=tf.distribute.get_strategy())
    raise NotImplementedError(f"distribution {config.distribution!r} is not wired yet")
