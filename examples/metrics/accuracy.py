"""Accuracy as an offline ``evaluate`` metric module (written for hf_layercollapse).

Load it by path, not by Hub name (``evaluate.load("accuracy")`` needs the Hub):

    >>> import evaluate
    >>> from metrics import metric_path
    >>> accuracy = evaluate.load(str(metric_path("accuracy")))
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Accuracy is the fraction of predictions equal to their references:
accuracy = (number of correct predictions) / (number of predictions).
With `normalize=False` it is the (weighted) number of correct predictions instead.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, default `True`): return the fraction correct; `False` returns the count
        (the sum of `sample_weight` over correct rows when weights are given).
    sample_weight (`list` of `float`, optional): one weight per row.
Returns:
    accuracy (`float`): between 0 and 1 when normalized; the (weighted) count otherwise.
Examples:
    >>> from metrics import load_metric
    >>> accuracy = load_metric("accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Classification accuracy (fraction of exact label matches)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(
        self,
        predictions: Sequence[int],
        references: Sequence[int],
        normalize: bool = True,
        sample_weight: Sequence[float] | None = None,
    ) -> dict[str, float]:
        preds, refs = np.asarray(predictions), np.asarray(references)
        weights = np.ones(len(refs)) if sample_weight is None else np.asarray(sample_weight, float)
        if not len(preds) == len(refs) == len(weights):
            raise ValueError("predictions, references and sample_weight need the same length")
        correct = float(np.sum(weights * (preds == refs)))
        if not normalize:
            return {"accuracy": correct}
        total = float(np.sum(weights))
        return {"accuracy": correct / total if total > 0 else 0.0}
