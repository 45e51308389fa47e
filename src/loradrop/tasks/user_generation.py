"""A generation task (prompt -> response) from the user's own file: a prompt and a response column,
or a ``messages`` column in the usual chat format (``[{"role": ..., "content": ...}, ...]``, the last
turn being the assistant's response to learn).

The same ``Task`` + ``DatasetDict`` pair as the bundled ``gsm`` task: columns ``prompt`` (or
``messages``: the turns before the response) and ``response``. Every check names the file, row and
column at fault and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import DatasetDict

from .gen_metrics import GENERATION_METRICS
from .registry import Task, dedup_key, split_rows, to_dataset_dict
from .user_data import _READERS, _parse_json

ROLES = ("system", "user", "assistant", "tool")


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise ValueError(f"unsupported file type {suffix or '(no extension)'!r} for {path}: use {', '.join(_READERS)}")
    columns, rows = _READERS[suffix](path)
    if not rows:
        raise ValueError(f"{path} is empty: it has no data rows")
    return columns, rows


def _require(columns: list[str], wanted: str, path: Path, flag: str) -> None:
    if wanted not in columns:
        raise ValueError(f"column {wanted!r} not found in {path}; available columns: {', '.join(columns)} "
                         f"(name the right one with {flag})")


def _text(value: Any, where: str, column: str, what: str) -> str:
    """A non-blank string; an empty response teaches nothing, an empty prompt is a broken row."""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
        raise ValueError(f"{where} has an empty {what} in column {column!r}: fill it in or remove the row")
    return str(value)


def _turns(value: Any, where: str, column: str) -> list[dict[str, str]]:
    """Chat turns from a list (JSON files) or a JSON string (CSV cells)."""
    if isinstance(value, str):
        value = _parse_json(value, f"column {column!r} of {where}")
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: column {column!r} must be a non-empty list of {{role, content}} turns")
    turns = []
    for i, turn in enumerate(value, 1):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: turn {i} of column {column!r} is not a {{\"role\": one of {', '.join(ROLES)}, "
                             f"\"content\": text}} object")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _split_chat(turns: list[dict[str, str]], where: str, column: str) -> tuple[list[dict[str, str]], str]:
    """The turns before the response and the response: the last turn, which must be the assistant's."""
    if turns[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last turn of column {column!r} is {turns[-1]['role']!r}, but it must be the "
                         "assistant's response to learn")
    if len(turns) < 2:
        raise ValueError(f"{where}: column {column!r} holds only the response: add the user turn it answers")
    response = _text(turns[-1]["content"], where, column, "assistant response")
    return turns[:-1], response


def _prompt_rows(rows: list[dict[str, Any]], path: Path, prompt_column: str, response_column: str) -> dict[str, list]:
    out: dict[str, list] = {"prompt": [], "response": []}
    for i, row in enumerate(rows, 1):
        where = f"row {i} of {path}"
        out["prompt"].append(_text(row.get(prompt_column), where, prompt_column, "prompt"))
        out["response"].append(_text(row.get(response_column), where, response_column, "response"))
    return out


def _chat_rows(rows: list[dict[str, Any]], path: Path, messages_column: str) -> dict[str, list]:
    out: dict[str, list] = {"messages": [], "response": []}
    for i, row in enumerate(rows, 1):
        where = f"row {i} of {path}"
        prompt, response = _split_chat(_turns(row.get(messages_column), where, messages_column), where, messages_column)
        out["messages"].append(prompt)
        out["response"].append(response)
    return out


def _read_generation(path: Path, prompt_column: str, response_column: str, messages_column: str | None) -> dict[str, list]:
    columns, rows = _read_rows(path)
    if messages_column is not None:
        _require(columns, messages_column, path, "--messages-column")
        return _chat_rows(rows, path, messages_column)
    _require(columns, prompt_column, path, "--prompt-column (or use --messages-column for chat data)")
    _require(columns, response_column, path, "--response-column")
    return _prompt_rows(rows, path, prompt_column, response_column)


def _dedup_keys(columns: dict[str, list]) -> list[tuple[str, str | None]]:
    """Prompts that differ only in case or spacing are the same prompt (a chat prompt: all its turns)."""
    if "prompt" in columns:
        return [dedup_key(p) for p in columns["prompt"]]
    return [dedup_key("\n".join(f"{t['role']}: {t['content']}" for t in turns)) for turns in columns["messages"]]


def load_user_generation_task(path: str | Path, prompt_column: str = "prompt", response_column: str = "response",
                              messages_column: str | None = None, validation_path: str | Path | None = None,
                              validation_ratio: float = 0.1, seed: int = 0,
                              metric: str = "rougeL") -> tuple[Task, DatasetDict]:
    """The generation task of a data file and its ``train`` / ``validation`` parts.

    With ``messages_column`` the rows are chats and the parts have columns ``messages`` (the turns
    before the last) and ``response`` (the last, assistant turn); otherwise ``prompt`` and
    ``response``. Without ``validation_path``, ``validation_ratio`` of the distinct prompts are held
    out (seeded; copies of a prompt stay on one side). ``metric`` scores generated responses: one of
    exact_match (math), choice_accuracy (yes/no, multiple choice), rougeL, bleu, chrf.
    """
    if isinstance(validation_ratio, bool) or not isinstance(validation_ratio, float) or not 0 < validation_ratio < 1:
        raise ValueError(f"validation_ratio={validation_ratio!r} is invalid: must be a fraction in (0, 1)")
    if metric not in GENERATION_METRICS:
        raise ValueError(f"metric={metric!r} does not fit a generation task: use one of {', '.join(GENERATION_METRICS)}")
    path = Path(path)
    train = _read_generation(path, prompt_column, response_column, messages_column)
    chat = messages_column is not None
    described = f"messages={messages_column!r}" if chat else f"prompt={prompt_column!r}, response={response_column!r}"
    task = Task(name=path.stem, description=f"user generation data from {path}", label_kind="generation", metric=metric,
                text_column="messages" if chat else "prompt", source=f"{path} ({described})")
    n = len(train["response"])
    if validation_path is None:
        train_idx, val_idx = split_rows(_dedup_keys(train), None, validation_ratio, seed)
        return task, to_dataset_dict(task, train, train_idx, val_idx)
    val = _read_generation(Path(validation_path), prompt_column, response_column, messages_column)
    both = {c: train[c] + val[c] for c in train}
    return task, to_dataset_dict(task, both, list(range(n)), list(range(n, n + len(val["response"]))))
