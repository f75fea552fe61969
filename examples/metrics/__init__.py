"""Offline ``evaluate`` metric modules for the examples, tests and benchmarks (not part of the installed library).

``evaluate.load("accuracy")`` downloads the metric script from the Hub and fails offline. These
modules are our own and are loaded by file path, so they work with ``HF_HUB_OFFLINE=1``.

Example:
    >>> from metrics import load_metric
    >>> load_metric("accuracy").compute(predictions=[1, 0], references=[1, 1])
    {'accuracy': 0.5}
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate

__all__ = ["AVAILABLE_METRICS", "load_metric", "metric_path"]

#: Metric names that :func:`load_metric` accepts.
AVAILABLE_METRICS: tuple[str, ...] = ("accuracy", "f1")


def metric_path(name: str) -> Path:
    """Return the path of the metric script ``name`` (for ``evaluate.load(str(path))``).

    Example:
        >>> metric_path("f1").name
        'f1.py'
    """
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric {name!r}; available: {', '.join(AVAILABLE_METRICS)}")
    return Path(__file__).with_name(f"{name}.py")


def load_metric(name: str, **init_kwargs: Any) -> evaluate.EvaluationModule:
    """Load one of our metric modules with ``evaluate.load`` by path (works offline).

    ``init_kwargs`` go to ``evaluate.load``; the f1 module takes ``average`` and ``pos_label``
    there as defaults, which is how to configure it inside ``evaluate.combine``.

    Example:
        >>> import evaluate
        >>> metrics = evaluate.combine([load_metric("accuracy"), load_metric("f1", average="macro")])
        >>> metrics.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # doctest: +ELLIPSIS
        {'accuracy': 0.666..., 'f1': 0.666...}
    """
    import evaluate

    return evaluate.load(str(metric_path(name)), **init_kwargs)
