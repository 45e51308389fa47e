"""Prompt -> response examples as causal-LM training data: formatted with the tokenizer's chat template
where it has one (plain prompt + response otherwise), tokenized with the loss on the response tokens
only (prompt tokens labelled -100), and held to ``max_length`` by a stated policy.

The prompt and the response are tokenized separately and concatenated, so the boundary between
masked and learned tokens is exact whatever the tokenizer merges; the chat template renders the
prompt with ``add_generation_prompt=True`` and the response is the rest of the rendered conversation
(for ChatML: the answer, ``<|im_end|>`` and a newline), so the model learns to end its turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datasets import DatasetDict
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips
from ..config import TRUNCATION_POLICIES
PLAIN_SEPARATOR = "\n"  # between prompt and response when the tokenizer has no chat template


@dataclass(frozen=True)
class LengthReport:
    """What the length policy did to one split: examples kept (truncated ones included), dropped
    for being longer than ``max_length``, and truncated to fit."""

    kept: int
    dropped: int
    truncated: int

    def __post_init__(self) -> None:
        if min(self.kept, self.dropped, self.truncated) < 0 or self.truncated > self.kept:
            raise ValueError(f"{self} is inconsistent: counts must be >= 0 and truncated <= kept")


def _chat_prompt(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The turns before the response: a chat row's ``messages``, or the prompt as one user turn."""
    if row.get("messages") is not None:
        return list(row["messages"])
    return [{"role": "user", "content": row["prompt"]}]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError, or anything a template raises on unexpected turns
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the tokenizer's chat template failed on {messages[:1]!r}...: {first} "
                         "(fix the turns' roles, or set tokenizer.chat_template)") from None


def format_example(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The prompt text (what generation starts from) and the response text (what training learns).

    With a chat template the prompt ends with the assistant header and the response is the rest of
    the rendered conversation. Without one: ``prompt + "\\n"`` and ``response + eos``; chat data
    (``messages``) then has no faithful rendering and is refused.
    """
    if not tokenizer.chat_template:
        if row.get("messages") is not None:
            raise ValueError("chat data (a messages column) needs a tokenizer with a chat template: "
                             "set tokenizer.chat_template or use --prompt-column / --response-column")
        return row["prompt"] + PLAIN_SEPARATOR, row["response"] + (tokenizer.eos_token or "")
    prompt_turns = _chat_prompt(row)
    prompt = _render(tokenizer, prompt_turns, add_generation_prompt=True)
    full = _render(tokenizer, prompt_turns + [{"role": "assistant", "content": row["response"]}], False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the conversation differently from its prompt (e.g. it rewrites "
                         "earlier turns), so the response cannot be told apart: use a template that appends turns")
    return prompt, full[len(prompt):]


def format_prompt(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    """The text generation starts from (``format_example``'s prompt)."""
    return format_example({**row, "response": row.get("response") or ""}, tokenizer)[0]


def prompt_completion(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The example in TRL's prompt-completion format, chosen so that ``trl.SFTTrainer``'s completion-only
    tokenization gives exactly ``encode_example``'s tokens and labels -- the data the probe measured.

    With a chat template: conversational (the prompt's turns, then the response as the assistant's
    turn), which SFTTrainer renders with the same template. Without one: ``format_example``'s two
    texts; the response already ends with eos, so SFTTrainer adds none, and the prompt gets the
    tokenizer's special tokens (BOS) as ``encode_example`` gives it. SFTTrainer tokenizes prompt and
    completion together where ``encode_example`` tokenizes them apart; the two differ only where a
    tokenizer merges tokens across the boundary, which TRL warns about.
    """
    if tokenizer.chat_template:
        return {"prompt": _chat_prompt(row), "completion": [{"role": "assistant", "content": row["response"]}]}
    prompt, response = format_example(row, tokenizer)
    return {"prompt": prompt, "completion": response}


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> list[int]:
    """A chat template writes its own special tokens; a plain prompt gets the tokenizer's (BOS)."""
    return tokenizer(prompt, add_special_tokens=not chat)["input_ids"]


def encode_example(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """``input_ids`` = prompt tokens + response tokens, ``labels`` = -100 per prompt token + the
    response tokens, ``attention_mask`` all ones; not truncated."""
    prompt, response = format_example(row, tokenizer)
    prompt_ids = _prompt_ids(tokenizer, prompt, bool(tokenizer.chat_template))
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + response_ids, "attention_mask": [1] * (len(prompt_ids) + len(response_ids)),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def _fit(example: dict[str, list[int]], max_length: int, truncation: str, where: str) -> dict[str, list[int]] | None:
    """The example as the policy leaves it: whole, cut at ``max_length`` (response tokens only), or
    None (dropped). A prompt that leaves no response token is an error under ``truncate``."""
    if len(example["input_ids"]) <= max_length:
        return example
    if truncation == "drop":
        return None
    prompt_length = sum(label == IGNORE_INDEX for label in example["labels"])
    if prompt_length >= max_length:
        raise ValueError(f"{where}: its prompt alone is {prompt_length} tokens, which leaves no room for the response "
                         f"under max_length={max_length}: raise max_length, shorten the prompt, or use truncation='drop'")
    return {k: v[:max_length] for k, v in example.items()}


def tokenize_generation(dataset_dict: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int = 512,
                        truncation: str = "drop") -> tuple[DatasetDict, dict[str, LengthReport]]:
    """``input_ids``, ``attention_mask``, ``labels`` (prompt masked) and ``length`` (for length-grouped
    batching) of every split, not padded, and per split what the length policy did.

    ``truncation``: ``"drop"`` (default) leaves out examples longer than ``max_length`` -- a cut
    response would teach the model to stop mid-answer and loses a math answer's "#### N";
    ``"truncate"`` keeps them cut to ``max_length``. A split left empty is an error.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation={truncation!r} is invalid: must be one of {', '.join(TRUNCATION_POLICIES)}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} is invalid: must be an integer >= 2")
    parts, reports = {}, {}
    for split, data in dataset_dict.items():
        rows, dropped, truncated = [], 0, 0
        for i, row in enumerate(data):
            full = encode_example(row, tokenizer)
            fitted = _fit(full, max_length, truncation, f"{split} example {i}")
            dropped += fitted is None
            truncated += fitted is not None and fitted is not full
            if fitted is not None:
                rows.append({**fitted, "length": len(fitted["input_ids"])})
        if not rows:
            raise ValueError(f"every {split} example is longer than max_length={max_length} tokens: raise max_length "
                             "or use truncation='truncate'")
        reports[split] = LengthReport(kept=len(rows), dropped=dropped, truncated=truncated)
        parts[split] = _from_rows(rows)
    return DatasetDict(parts), reports


def _from_rows(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})


def generation_collator(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> DataCollatorForSeq2Seq:
    """Pads each batch to its longest example (inputs with the pad token, labels with -100, on the
    tokenizer's padding side) and drops the ``length`` column, which only the sampler reads. With
    ``TrainingArguments(train_sampling_strategy="group_by_length")`` batches hold examples of
    similar length, so little is padded."""
    return _DropLength(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of,
                       return_tensors="pt")


class _DropLength(DataCollatorForSeq2Seq):
    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        return super().__call__([{k: v for k, v in f.items() if k != "length"} for f in features], return_tensors)
