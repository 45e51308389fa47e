"""A task from the user's own CSV, TSV, JSONL or JSON file, as the same ``Task`` + ``DatasetDict``
pair that the bundled tasks give, so everything downstream treats both alike.

The file is read with the standard library: every check below can then name the file, row and
column at fault, which a generic loader's errors do not.
"""

from __future__ import annotations

import csv
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from .registry import LABEL_KINDS, Task, dedup_key, split_rows, to_dataset_dict

Row = dict[str, Any]


def _read_delimited(path: Path, delimiter: str) -> tuple[list[str], list[Row]]:
    """``utf-8-sig`` so a spreadsheet's byte-order mark does not end up in the first column's name.
    Python's csv refuses fields over 131,072 characters by default; a long document is a fine text,
    so the limit is raised to the file's size while it is read (and put back after)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, min(path.stat().st_size + 1, 2**31 - 1)))
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            try:
                rows = list(reader)
            except csv.Error as err:
                raise ValueError(f"line {reader.line_num} of {path} is not valid {path.suffix[1:].upper()}: {err}") from None
            return list(reader.fieldnames or []), rows
    finally:
        csv.field_size_limit(limit)


def _json_object(value: Any, where: str) -> Row:
    if not isinstance(value, dict):
        raise ValueError(f"{where} is not a JSON object with named fields")
    return value


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON: {e.msg}") from None


def _read_jsonl(path: Path) -> tuple[list[str], list[Row]]:
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = [_json_object(_parse_json(line, f"line {n} of {path}"), f"line {n} of {path}") for n, line in lines]
    return (list(rows[0]) if rows else []), rows


def _read_json(path: Path) -> tuple[list[str], list[Row]]:
    """A JSON array of objects (what ``DataFrame.to_json(orient="records")`` writes)."""
    text = path.read_text(encoding="utf-8")
    data = _parse_json(text, str(path)) if text.strip() else []
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON array of objects (or use .jsonl, one object per line)")
    rows = [_json_object(r, f"item {i} of {path}") for i, r in enumerate(data, 1)]
    return (list(rows[0]) if rows else []), rows


_READERS = {
    ".csv": partial(_read_delimited, delimiter=","),
    ".tsv": partial(_read_delimited, delimiter="\t"),
    ".jsonl": _read_jsonl,
    ".json": _read_json,
}


def _read_columns(path: Path, columns: list[str]) -> dict[str, list[Any]]:
    """The wanted columns of a data file, every value present and not blank: a missing label cannot
    be guessed, and a blank text is almost always a broken row."""
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise ValueError(f"unsupported file type {suffix or '(no extension)'!r} for {path}: use {', '.join(_READERS)}")
    try:
        available, rows = _READERS[suffix](path)
    except UnicodeDecodeError as err:
        bad = err.object[err.start:err.start + 1].hex()
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{bad} cannot be decoded): save it as UTF-8") from None
    if not rows:
        raise ValueError(f"{path} is empty: it has no data rows")
    for column in columns:
        if column not in available:
            raise ValueError(f"column {column!r} not found in {path}; available columns: {', '.join(available)}")
    out: dict[str, list[Any]] = {column: [] for column in columns}
    for i, row in enumerate(rows, 1):
        for column in columns:
            value = row.get(column)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(f"row {i} of {path} has no value in column {column!r}")
            out[column].append(value)
    return out


def _number(value: Any) -> float | None:
    """The value as a number, or None where it is a category name (booleans are categories)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _check_labels(values: list[Any], path: Path, label_column: str) -> None:
    """A NaN label is a missing one (what pandas writes for an empty cell); an infinite one is no class
    and no regression target. Either would otherwise decide the label kind or become a class."""
    for i, value in enumerate(values, 1):
        number = _number(value)
        if number is not None and math.isnan(number):
            raise ValueError(f"row {i} of {path} has a missing label ({value!r}) in column {label_column!r}")
        if number is not None and math.isinf(number):
            raise ValueError(f"row {i} of {path} has the label {value!r} in column {label_column!r}: not a finite number")


def _infer_label_kind(values: list[Any]) -> str:
    """Regression only when every label is a number and some are not whole: "1"/"2" or 0/1 are classes."""
    numbers = [_number(v) for v in values]
    if all(n is not None for n in numbers) and any(not n.is_integer() for n in numbers):
        return "regression"
    return "classification"


def _class_name(value: Any) -> str:
    """One name per class however it is written: 1, "1" and 1.0 are the same class."""
    number = _number(value)
    return str(int(number)) if number is not None and number.is_integer() else str(value).strip()


def _class_names(values: list[Any], path: Path, label_column: str) -> tuple[str, ...]:
    """Sorted names (numerically where all are numbers, so "10" follows "9"); their order gives the ids."""
    names = {_class_name(v) for v in values}
    if len(names) < 2:
        raise ValueError(f"{path} has only one class ({next(iter(names))!r}) in column {label_column!r}: "
                         "classification needs at least two")
    numeric = all(_number(n) is not None for n in names)
    return tuple(sorted(names, key=float) if numeric else sorted(names))


def _encode_labels(values: list[Any], task: Task, path: Path) -> list[int] | list[float]:
    """Class ids, or finite float targets; an error names the first label that does not fit (for
    classes that can only be a validation label, as the classes come from the training file)."""
    if task.label_kind == "regression":
        numbers = [_number(v) for v in values]
        for i, (value, number) in enumerate(zip(values, numbers), 1):
            if number is None or not math.isfinite(number):
                raise ValueError(f"label {value!r} in row {i} of {path} is not a finite number, but the task is regression")
        return numbers
    ids = {name: i for i, name in enumerate(task.label_names)}
    for i, value in enumerate(values, 1):
        if _class_name(value) not in ids:
            raise ValueError(f"validation label {_class_name(value)!r} (row {i} of {path}) is not among the "
                             f"training labels: {', '.join(task.label_names)}")
    return [ids[_class_name(v)] for v in values]


def _columns(raw: dict[str, list[Any]], task: Task, text_column: str, text_pair_column: str | None,
             label_column: str, path: Path) -> dict[str, list]:
    """The raw columns under the task's canonical names ``text`` / ``text_pair`` / ``label``."""
    out = {task.text_column: [str(v) for v in raw[text_column]]}
    if text_pair_column:
        out[task.text_pair_column] = [str(v) for v in raw[text_pair_column]]
    out["label"] = _encode_labels(raw[label_column], task, path)
    return out


def _make_task(path: Path, labels: list[Any], label_column: str, text_column: str, text_pair_column: str | None,
               label_kind: str | None) -> Task:
    if label_kind is not None and label_kind not in LABEL_KINDS:
        raise ValueError(f"label_kind={label_kind!r} is invalid: must be one of {', '.join(LABEL_KINDS)} or None to infer it")
    kind = label_kind or _infer_label_kind(labels)
    classification = kind == "classification"
    pair = f", text_pair={text_pair_column!r}" if text_pair_column else ""
    return Task(
        name=path.stem,
        description=f"user data from {path}",
        label_kind=kind,
        metric="accuracy" if classification else "spearman",
        text_pair_column="text_pair" if text_pair_column else None,
        label_names=_class_names(labels, path, label_column) if classification else (),
        source=f"{path} (text={text_column!r}{pair}, label={label_column!r})",
    )


def load_user_task(path: str | Path, text_column: str, label_column: str, text_pair_column: str | None = None,
                   validation_path: str | Path | None = None, validation_ratio: float = 0.1, seed: int = 0,
                   label_kind: str | None = None) -> tuple[Task, DatasetDict]:
    """The task described by a data file and its ``train`` / ``validation`` parts, with columns
    ``text``, [``text_pair``] and ``label`` (class id, or float for regression).

    Without ``validation_path``, ``validation_ratio`` of the distinct texts are held out: seeded,
    stratified by class, and copies of a text (ignoring case and spacing) stay on one side.
    ``label_kind`` is inferred when None: non-whole numbers mean regression, anything else classes,
    numbered by their sorted names.
    """
    if isinstance(validation_ratio, bool) or not isinstance(validation_ratio, float) or not 0 < validation_ratio < 1:
        raise ValueError(f"validation_ratio={validation_ratio!r} is invalid: must be a fraction in (0, 1)")
    path = Path(path)
    wanted = [c for c in (text_column, text_pair_column, label_column) if c]
    raw = _read_columns(path, wanted)
    _check_labels(raw[label_column], path, label_column)
    task = _make_task(path, raw[label_column], label_column, text_column, text_pair_column, label_kind)
    train = _columns(raw, task, text_column, text_pair_column, label_column, path)
    n = len(train["label"])
    if validation_path is None:
        pairs = train[task.text_pair_column] if task.text_pair_column else [None] * n
        keys = [dedup_key(text, pair) for text, pair in zip(train[task.text_column], pairs)]
        strata = [task.label_names[i] for i in train["label"]] if task.label_kind == "classification" else None
        train_idx, val_idx = split_rows(keys, strata, validation_ratio, seed)
        return task, to_dataset_dict(task, train, train_idx, val_idx)
    validation_path = Path(validation_path)
    val_raw = _read_columns(validation_path, wanted)
    _check_labels(val_raw[label_column], validation_path, label_column)
    val = _columns(val_raw, task, text_column, text_pair_column, label_column, validation_path)
    both = {c: train[c] + val[c] for c in train}
    return task, to_dataset_dict(task, both, list(range(n)), list(range(n, n + len(val["label"]))))
