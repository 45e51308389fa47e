"""How far above its noise is the LLM demo's gain? Generates again, with the demo's greedy settings,
the headlines of the base model and of each method's adapter on the validation articles the demo scores of
bbc-headlines, and writes each method's mean ROUGE-L gain over the base model with its paired
standard error (per-article differences), the counts of articles that got better / worse, and the
first eight headlines of each.

    python benchmarks/demo_llm_paired.py demo-llm-out benchmarks/results/demo_llm_cpu/paired_gains.json
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import loradrop
from loradrop.generate_eval import GenerationEval, evaluate_generation
from loradrop.models import load_causal_lm
from loradrop.tasks.gen_metrics import rouge_l_scores
from loradrop.tasks.registry import load_task
from loradrop.training import DEMO_BUDGETS

SHOWN = 8


def main(demo_out: Path, target: Path) -> None:
    budget = DEMO_BUDGETS["bbc-headlines"]
    validation = load_task("bbc-headlines", seed=0)["validation"]

    def headlines(model: object, tokenizer: object) -> GenerationEval:
        return evaluate_generation(model, tokenizer, validation, "rougeL", budget.max_new_tokens,
                                   batch_size=budget.batch_size, max_examples=budget.generation_eval_examples)

    model, tokenizer = load_causal_lm(budget.model)
    base = headlines(model, tokenizer)
    base_scores = rouge_l_scores(base.predictions, base.references)  # per article; the demo's score is their mean
    report = {"references": base.references[:SHOWN],
              "base": {"rougeL": base.scores["metric"], "headlines": base.predictions[:SHOWN]}}
    for run in sorted(p for p in demo_out.iterdir() if (p / "adapter").is_dir()):
        tuned = headlines(loradrop.load_adapter(load_causal_lm(budget.model)[0], run / "adapter"), tokenizer)
        gains = [t - b for t, b in zip(rouge_l_scores(tuned.predictions, tuned.references), base_scores)]
        report[run.name] = {"rougeL": tuned.scores["metric"], "gain": statistics.fmean(gains),
                            "gain_se": statistics.stdev(gains) / math.sqrt(len(gains)),
                            "better": sum(g > 0 for g in gains), "worse": sum(g < 0 for g in gains),
                            "headlines": tuned.predictions[:SHOWN]}
    target.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
