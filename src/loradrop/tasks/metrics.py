"""Evaluation scores for the tasks, computed by scikit-learn and SciPy so that they match the numbers
papers report (GLUE's accuracy, Matthews correlation and Spearman correlation)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

if TYPE_CHECKING:
    from .registry import Task

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("spearman",)


def _classification_scores(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-averaged F1 (every class counts the same, so a minority class that is never
    predicted shows) and Matthews correlation (0 for any constant prediction)."""
    return {
        "accuracy": float(accuracy_score(references, predictions)),
        "f1": float(f1_score(references, predictions, average="macro", zero_division=0)),
        "matthews": float(matthews_corrcoef(references, predictions)),
    }


def _regression_scores(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Spearman rank correlation; NaN when either side is constant (no ranking to correlate)."""
    return {"spearman": float(spearmanr(predictions, references).statistic)}


def _metric_name(task_or_metric: Task | str) -> str:
    name = getattr(task_or_metric, "metric", task_or_metric)
    if name not in CLASSIFICATION_METRICS + REGRESSION_METRICS:
        known = ", ".join(CLASSIFICATION_METRICS + REGRESSION_METRICS)
        raise ValueError(f"unknown metric {name!r}; known metrics: {known}")
    return name


def _as_predictions(predictions: Any, regression: bool) -> np.ndarray:
    """Label ids from logits (argmax over the last axis) or values as given, so a model's raw output
    can be passed straight in."""
    array = np.asarray(predictions)
    if regression:
        return array.reshape(len(array), -1)[:, 0] if array.ndim == 2 else array
    return array.argmax(axis=-1) if array.ndim == 2 else array


def compute_metrics(task_or_metric: Task | str, predictions: Any, references: Any) -> dict[str, float]:
    """All scores that fit the task's kind, plus the task's main score under ``"metric"``.

    ``predictions`` may be label ids or logits of shape (n, num_labels); for regression, values of
    shape (n,) or (n, 1). ``"f1"`` is macro-averaged over the classes, not GLUE's positive-class F1.
    """
    name = _metric_name(task_or_metric)
    regression = name in REGRESSION_METRICS
    preds, refs = _as_predictions(predictions, regression), np.asarray(references)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references: they must pair up one to one")
    if len(refs) == 0:
        raise ValueError("no references: a score needs at least one evaluation example")
    scores = _regression_scores(preds, refs) if regression else _classification_scores(preds, refs)
    return {"metric": scores[name], **scores}


def majority_baseline(train_labels: Sequence[Any], eval_labels: Sequence[Any], metric: str) -> float:
    """The score of always predicting the most common training label (the smallest label on a tie):
    the floor a fine-tuned model has to beat. For ``spearman`` a constant prediction ranks nothing,
    so its correlation is taken as 0."""
    _metric_name(metric)
    if len(train_labels) == 0:
        raise ValueError("no training labels: the majority baseline needs at least one")
    if metric in REGRESSION_METRICS:
        return 0.0
    counts = Counter(train_labels)
    majority = max(sorted(counts), key=counts.__getitem__)
    return compute_metrics(metric, [majority] * len(eval_labels), list(eval_labels))["metric"]
