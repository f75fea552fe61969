"""F1 score as an offline ``evaluate`` metric module (written for hf_layercollapse).

Binary F1 of one positive label, or the macro / micro / weighted average over labels.
Defaults can be set when loading, which is what ``evaluate.combine`` needs:

    >>> import evaluate
    >>> from metrics import metric_path
    >>> f1 = evaluate.load(str(metric_path("f1")), average="macro")
    >>> round(f1.compute(predictions=[0, 1, 1], references=[0, 1, 0])["f1"], 4)
    0.6667
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
import numpy as np

AVERAGES = ("binary", "macro", "micro", "weighted")

_DESCRIPTION = """\
F1 is the harmonic mean of precision and recall: F1 = 2 * (precision * recall) / (precision + recall).
For several labels, "macro" averages the per-label F1 (each label counts the same), "weighted"
weights them by the labels' support, and "micro" pools the counts of all labels (for single-label
classification it equals accuracy). A label with no true and no predicted rows has F1 0, as in
scikit-learn's default (`zero_division`).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    average (`str`, default `"binary"` or the value given at load time): one of "binary",
        "macro", "micro", "weighted".
    pos_label (`int`, default `1`): the positive label when `average="binary"`.
    labels (`list` of `int`, optional): labels to average over; default all labels present in
        predictions or references.
    sample_weight (`list` of `float`, optional): one weight per row.
Returns:
    f1 (`float`): between 0 and 1.
Examples:
    >>> from metrics import load_metric
    >>> f1 = load_metric("f1")
    >>> f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 1])
    {'f1': 0.5}
"""

_CITATION = ""


def _per_label_counts(
    preds: np.ndarray, refs: np.ndarray, weights: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted true positives, predicted positives and actual positives per label."""
    tp = np.array([np.sum(weights * ((preds == lab) & (refs == lab))) for lab in labels])
    predicted = np.array([np.sum(weights * (preds == lab)) for lab in labels])
    actual = np.array([np.sum(weights * (refs == lab)) for lab in labels])
    return tp, predicted, actual


def _f1(tp: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """F1 = 2 tp / (predicted + actual), 0 where both are 0."""
    denominator = predicted + actual
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, 2.0 * tp / safe, 0.0)


def f1_score(
    predictions: Sequence[int],
    references: Sequence[int],
    average: str = "binary",
    pos_label: int = 1,
    labels: Sequence[int] | None = None,
    sample_weight: Sequence[float] | None = None,
) -> float:
    """Compute the F1 score (same conventions as scikit-learn's ``f1_score``)."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, not {average!r}")
    preds, refs = np.asarray(predictions), np.asarray(references)
    weights = np.ones(len(refs)) if sample_weight is None else np.asarray(sample_weight, float)
    if not len(preds) == len(refs) == len(weights):
        raise ValueError("predictions, references and sample_weight need the same length")
    if average == "binary":
        present = np.union1d(preds, refs)
        if len(present) > 2:
            raise ValueError(f"average='binary' needs at most 2 labels, got {present.tolist()}")
        chosen = np.asarray([pos_label])
    else:
        chosen = np.union1d(preds, refs) if labels is None else np.asarray(labels)
    tp, predicted, actual = _per_label_counts(preds, refs, weights, chosen)
    if average == "micro":
        return float(_f1(tp.sum(), predicted.sum(), actual.sum()))
    scores = _f1(tp, predicted, actual)
    if average == "weighted":
        return float(np.average(scores, weights=actual)) if actual.sum() > 0 else 0.0
    return float(np.mean(scores)) if len(scores) else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    """F1 score; ``average`` and ``pos_label`` given at load time become the defaults."""

    def __init__(self, *args: Any, average: str = "binary", pos_label: int = 1, **kwargs: Any) -> None:
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, not {average!r}")
        self.default_average = average
        self.default_pos_label = pos_label
        super().__init__(*args, **kwargs)

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
        average: str | None = None,
        pos_label: int | None = None,
        labels: Sequence[int] | None = None,
        sample_weight: Sequence[float] | None = None,
    ) -> dict[str, float]:
        score = f1_score(
            predictions,
            references,
            average=self.default_average if average is None else average,
            pos_label=self.default_pos_label if pos_label is None else pos_label,
            labels=labels,
            sample_weight=sample_weight,
        )
        return {"f1": score}
