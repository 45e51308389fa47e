"""Scoring a causal LM on a generation task: greedy, batched ``model.generate`` on the validation
prompts (left-padded, a cap on new tokens) scored by the task's metric, and the validation loss /
perplexity of the reference responses (response tokens only, as in training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .tasks.gen_metrics import compute_generation_metrics
from .tasks.generation import IGNORE_INDEX, format_prompt, generation_collator


@dataclass
class GenerationEval:
    """Predictions (generated text, special tokens removed) beside their references, and the scores."""

    predictions: list[str]
    references: list[str]
    scores: dict[str, float] = field(default_factory=dict)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")


class _LeftPadding:
    """A decoder continues from the last position of each row, so prompts must end together:
    padding goes on the left while generating, and back as it was afterwards."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer, self.side = tokenizer, tokenizer.padding_side

    def __enter__(self) -> PreTrainedTokenizerBase:
        self.tokenizer.padding_side = "left"
        return self.tokenizer

    def __exit__(self, *exc: Any) -> None:
        self.tokenizer.padding_side = self.side


@torch.no_grad()
def generate(model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 256,
             batch_size: int = 8) -> list[str]:
    """Greedy continuations of already formatted prompts (see ``format_prompt``), ``batch_size`` at a
    time, each stopped at the end-of-text token or after ``max_new_tokens``; the model is put in
    eval mode and back in the mode it was in."""
    _positive("max_new_tokens", max_new_tokens)
    _positive("batch_size", batch_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        with _LeftPadding(tokenizer) as tok:
            for start in range(0, len(prompts), batch_size):
                batch = tok(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=not tok.chat_template).to(device)
                tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                        pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
                new = tokens[:, batch["input_ids"].shape[1]:]
                outputs.extend(tok.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def evaluate_generation(model: Any, tokenizer: PreTrainedTokenizerBase, dataset: Any, metric: str,
                        max_new_tokens: int = 256, batch_size: int = 8, max_examples: int | None = None) -> GenerationEval:
    """Generates a response to each of the first ``max_examples`` rows of ``dataset`` (columns
    ``prompt`` or ``messages``, and ``response``) and scores them with ``metric`` against the
    ``response`` column (see ``tasks.gen_metrics``)."""
    if max_examples is not None:
        _positive("max_examples", max_examples)
    rows = [dataset[i] for i in range(min(len(dataset), max_examples or len(dataset)))]
    if not rows:
        raise ValueError("the evaluation data set is empty: generation evaluation needs at least one example")
    prompts = [format_prompt(row, tokenizer) for row in rows]
    predictions = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    references = [row["response"] for row in rows]
    return GenerationEval(predictions, references, compute_generation_metrics(metric, predictions, references))


@torch.no_grad()
def validation_loss(model: Any, tokenizer: PreTrainedTokenizerBase, tokenized: Any, batch_size: int = 8) -> dict[str, float]:
    """Mean cross-entropy per response token over a tokenized data set (``tokenize_generation``'s
    output: prompt tokens labelled -100) and its perplexity exp(loss). Summed over tokens, not
    averaged per batch, so batches with long responses count by their tokens."""
    _positive("batch_size", batch_size)
    collate = generation_collator(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(tokenized), batch_size):
            batch = collate([tokenized[i] for i in range(start, min(start + batch_size, len(tokenized)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]  # token t predicts token t + 1
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                       ignore_index=IGNORE_INDEX, reduction="sum")
            total += losses.item()
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no response tokens to score: every label is -100")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss)}
