"""Evaluation metrics that weigh each example: padded examples never count.

Evaluation batches are full-size (``data.full_batches`` pads the last one with weight-0
examples), so every metric update must carry the batch's weights. :func:`weighted_views`
hands ``update_metrics`` views of the metrics that add them, so overrides that know nothing of
padding mask it anyway, ``super().update_metrics`` calls included.
"""

from __future__ import annotations

import inspect
from typing import Dict

from trainer.compat import tf


def _weigh(metric, weights, args, kwargs):
    """``args, kwargs`` for ``metric.update_state`` with ``sample_weight`` times ``weights``."""
    # Keras wraps update_state in a (*args, **kwargs) decorator: read the class's.
    signature = inspect.signature(type(metric).update_state)
    accepts = "sample_weight" in signature.parameters or any(
        p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if not accepts:
        raise TypeError(
            f"metric {metric.name!r}: update_state takes no sample_weight, so evaluation "
            "cannot leave out the padding of its last batch; accept "
            "`sample_weight=None` and weigh each example by it")
    if "sample_weight" in signature.parameters:  # Possibly passed by position.
        bound = signature.bind_partial(metric, *args, **kwargs)
        given = bound.arguments.pop("sample_weight", None)
        args, kwargs = bound.args[1:], bound.kwargs
    else:  # Taken by **kwargs.
        kwargs = dict(kwargs)
        given = kwargs.pop("sample_weight", None)
    combined = weights
    if given is not None:
        given = tf.cast(given, weights.dtype)
        rank = given.shape.rank or 0
        combined = given * (weights if rank == 0 else
                            tf.reshape(weights, [-1] + [1] * (rank - 1)))
    return args, dict(kwargs, sample_weight=combined)


class WeightedMetric:
    """A metric whose updates are weighed by ``weights``; everything else is the metric's."""

    def __init__(self, metric, weights):
        self._metric = metric
        self._weights = weights

    def __getattr__(self, name):
        return getattr(self._metric, name)

    def update_state(self, *args, **kwargs):
        args, kwargs = _weigh(self._metric, self._weights, args, kwargs)
        return self._metric.update_state(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        args, kwargs = _weigh(self._metric, self._weights, args, kwargs)
        return self._metric(*args, **kwargs)


def weighted_views(metrics: Dict[str, object], weights: tf.Tensor) -> Dict[str, WeightedMetric]:
    """Views of ``metrics`` whose ``update_state`` and call weigh every example by ``weights``.

    A view passes ``sample_weight=weights`` to the metric, multiplied by any
    ``sample_weight`` the caller gave; ``result``, ``reset_state`` and attributes are the
    metric's own. Make fresh views per trace: replicas trace in parallel threads, each with
    its own weights.
    """
    return {name: WeightedMetric(metric, weights) for name, metric in metrics.items()}
