"""The alpha sample of LoRA-drop's probe: stratified by label so small classes are represented."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_LABEL_COLUMNS = ("labels", "label")


def _rows(dataset: Any) -> int:
    try:
        return len(dataset)
    except TypeError:
        raise ValueError(f"the data set must have a length (a datasets.Dataset or a list), got {type(dataset).__name__}") from None


def _labels(dataset: Any, label_column: str | None) -> list[Any] | None:
    """The label of every row, or None where the data set has no usable class labels."""
    first = dataset[0]
    if not isinstance(first, dict):
        return None
    column = label_column or next((c for c in _LABEL_COLUMNS if c in first), None)
    if column is None:
        return None
    if column not in first:
        raise ValueError(f"label_column={column!r} is not a column of the data set; columns: {sorted(first)}")
    if hasattr(dataset, "column_names"):  # datasets.Dataset: read the column without decoding every row
        values = list(dataset[column])
    else:
        values = [row[column] for row in dataset]
    if any(isinstance(v, float) and not float(v).is_integer() for v in values) or isinstance(values[0], (list, tuple)):
        return None  # regression targets or token labels: no classes to stratify by
    return values


def _subset(dataset: Any, indices: list[int]) -> Any:
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return [dataset[i] for i in indices]


def stratified_sample(dataset: Any, ratio: float, label_column: str | None = None, seed: int = 0) -> Any:
    """A ``ratio`` sample of ``dataset`` that keeps each class's share (within one example) and has
    at least one example of every class; a seeded random sample when there are no class labels
    (regression, generation). Works on a ``datasets.Dataset`` and on a list of dicts; the result has
    the same kind, rows in their original order."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio!r} is invalid: must be a number in (0, 1]")
    n = _rows(dataset)
    if n == 0:
        raise ValueError("the data set is empty: LoRA-drop's probe needs at least one training example")
    rng = np.random.default_rng(seed)
    labels = _labels(dataset, label_column)
    if labels is None:
        picked = rng.choice(n, size=max(1, round(ratio * n)), replace=False).tolist()
    else:
        by_class: dict[Any, list[int]] = {}
        for i, label in enumerate(labels):
            by_class.setdefault(label, []).append(i)
        picked = []
        for label in sorted(by_class, key=repr):
            members = by_class[label]
            k = min(len(members), max(1, math.floor(ratio * len(members) + 0.5)))
            picked.extend(rng.choice(members, size=k, replace=False).tolist())
    return _subset(dataset, sorted(int(i) for i in picked))

