"""Scores for generated text: exact match of a math problem's final answer (GSM8K's "#### N"), accuracy
of a yes/no or multiple-choice answer, ROUGE-L (``rouge-score``, Google's reference implementation)
and BLEU / chrF (``sacrebleu``, the reference implementation papers report).

Scales: ``exact_match``, ``choice_accuracy`` and ``rougeL`` are fractions in [0, 1]; ``bleu`` and
``chrf`` are on sacrebleu's 0-100 scale, as papers print them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation

from ..config import GENERATION_METRICS

_NUMBER = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\$?\s*\.\d+")
_GSM_ANSWER = re.compile(r"####\s*([^\n]*)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def normalize_number(text: str) -> str | None:
    """A number written one canonical way: no ``$``, thousands commas, spaces or trailing zeros
    after the point ("1,000.50" -> "1000.5", "$12.0" -> "12", "-0" -> "0"); None if it is no number."""
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "").removesuffix("%")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    out = format(value.normalize(), "f")
    return "0" if out in ("-0", "0") else out


def _last_number(text: str) -> str | None:
    numbers = [normalize_number(m) for m in _NUMBER.findall(text)]
    numbers = [n for n in numbers if n is not None]
    return numbers[-1] if numbers else None


def extract_final_answer(text: str) -> str | None:
    """The final answer of a worked solution: the number after GSM8K's "####", else inside the last
    ``\\boxed{}``, else the last number in the text (what a model that skips the marker ends on);
    normalised by ``normalize_number``. None when the text holds no number."""
    marked = _GSM_ANSWER.findall(text)
    if marked:
        return _last_number(marked[-1])
    boxed = _BOXED.findall(text)
    if boxed:
        return _last_number(boxed[-1])
    return _last_number(text)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The share of predictions whose final answer equals the reference's; a prediction without a
    number is wrong. References are solutions ending "#### N" or bare answers."""
    hits = [(p := extract_final_answer(pred)) is not None and p == extract_final_answer(ref)
            for pred, ref in zip(predictions, references)]
    return sum(hits) / len(hits)


def normalize_choice(text: str) -> str:
    """The answer a yes/no or multiple-choice response gives: its first word, lower-cased, without
    brackets or punctuation ("Yes, because ..." -> "yes", "(B) Paris" -> "b", "C." -> "c")."""
    words = re.findall(r"[^\W_]+", text.casefold())
    return words[0] if words else ""


def choice_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The share of predictions whose ``normalize_choice`` answer equals the reference's."""
    hits = [normalize_choice(p) == normalize_choice(r) for p, r in zip(predictions, references)]
    return sum(hits) / len(hits)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction (longest common subsequence of words, Porter-stemmed), as
    ``rouge-score`` computes it."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean of ``rouge_l_scores``."""
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenisation, 4-grams, brevity penalty), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (character 6-grams, beta 2; sacrebleu's defaults), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


_SCORERS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match, "choice_accuracy": choice_accuracy, "rougeL": rouge_l, "bleu": bleu, "chrf": chrf,
}


def compute_generation_metrics(metric: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The task's main score under ``"metric"`` and under its own name. Only the main one is computed:
    the others would cost time at every evaluation and mean little for the task (BLEU of a math
    solution, exact match of a summary)."""
    if metric not in _SCORERS:
        raise ValueError(f"unknown generation metric {metric!r}; known: {', '.join(GENERATION_METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: they must pair up one to one")
    if not references:
        raise ValueError("no references: a score needs at least one evaluation example")
    score = _SCORERS[metric](predictions, references)
    return {"metric": score, metric: score}
