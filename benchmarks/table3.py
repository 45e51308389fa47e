"""LoRA-drop's Table 3: does the importance score carry information?

After full LoRA training (a finished ``--method lora`` run), evaluate the model with only the LoRA of
the k most important layers of each module type kept and the others' LoRA zeroed, against only the k
least important layers' kept, at equal k. If importance (the probe of a ``lora-drop`` run of the same
task and seed) says which layers' LoRA matters, keeping the important ones must score higher. Rows for
all layers kept (the trained model) and none (the base model) bound the range. ``--plan-from`` adds the
paper's own setting: per module type as many layers as that LoRA-drop run kept.

    python benchmarks/table3.py --run runs/bbc-headlines/lora-seed0 \\
        --importance runs/bbc-headlines/lora-drop-seed0/importance.json --counts 1 3 5 10 \\
        --plan-from runs/bbc-headlines/lora-drop-seed0 --out results/table3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from loradrop import load_adapter  # noqa: E402
from loradrop.config import RunConfig  # noqa: E402
from loradrop.report import write_json  # noqa: E402
from loradrop.sites import find_sites, lora_layers  # noqa: E402
from loradrop.training import _collator, _prepare  # noqa: E402


def score(model, cfg: RunConfig, task, data, tokenizer, tokenized) -> float:
    """The task metric on the run's validation split, as the run measured it."""
    model.eval()
    if task.label_kind == "generation":
        from loradrop.generate_eval import evaluate_generation

        return evaluate_generation(model, tokenizer, data["validation"], task.metric, cfg.max_new_tokens,
                                   batch_size=cfg.batch_size, max_examples=cfg.generation_eval_examples).scores["metric"]
    from transformers import Trainer, TrainingArguments

    from loradrop.tasks.metrics import compute_metrics

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=tmp, per_device_eval_batch_size=64, report_to=[],
                                                              use_cpu=not torch.cuda.is_available()),
                          eval_dataset=tokenized["validation"], data_collator=_collator(tokenizer, tokenized["validation"]),
                          compute_metrics=lambda p: compute_metrics(task, p.predictions, p.label_ids))
        return trainer.evaluate()["eval_metric"]


def keep_only(model, keep: dict[str, set[int]]) -> dict:
    """Zeroes lora_B of every site whose layer is not in ``keep[module type]``; returns the saved
    weights for ``restore``."""
    saved, layers = {}, lora_layers(model)
    for site in find_sites(model):
        if site.layer not in keep[site.module_type]:
            weight = layers[site.name].lora_B["default"].weight
            saved[site.name] = weight.detach().clone()
            with torch.no_grad():
                weight.zero_()
    return saved


def restore(model, saved: dict) -> None:
    layers = lora_layers(model)
    for name, weight in saved.items():
        with torch.no_grad():
            layers[name].lora_B["default"].weight.copy_(weight)


def table3(run: Path, importance_file: Path, counts: list[int], plan_counts: dict[str, int] | None = None) -> dict:
    """The metric with all, none, the k most and the k least important layers' LoRA kept, per k; with
    ``plan_counts`` also at a k per module type (LoRA-drop's own counts: the paper's setting), as k
    ``"lora-drop"``."""
    cfg = RunConfig.from_dict(json.loads((run / "run_config.json").read_text()))
    if cfg.method != "lora":
        raise SystemExit(f"{run} is a {cfg.method!r} run: Table 3 starts from full LoRA training (--method lora)")
    importance = {t: {int(k): v for k, v in s.items()}
                  for t, s in json.loads(importance_file.read_text())["importance"].items()}
    task, data, model, tokenizer, tokenized, _ = _prepare(cfg)
    model = load_adapter(model, run / "adapter")
    ranked = {t: sorted(s, key=s.get, reverse=True) for t, s in importance.items()}
    rows = [{"kept": "all", "k": None, "metric": score(model, cfg, task, data, tokenizer, tokenized)}]
    saved = keep_only(model, {t: set() for t in ranked})
    rows.append({"kept": "none", "k": 0, "metric": score(model, cfg, task, data, tokenizer, tokenized)})
    restore(model, saved)
    per_type = [(k, {t: k for t in ranked}) for k in counts] + ([("lora-drop", plan_counts)] if plan_counts else [])
    for k, n in per_type:
        for kept, layers in (("most important", {t: set(r[:n[t]]) for t, r in ranked.items()}),
                             ("least important", {t: set(r[len(r) - n[t]:]) for t, r in ranked.items()})):
            saved = keep_only(model, layers)
            rows.append({"kept": kept, "k": k, "metric": score(model, cfg, task, data, tokenizer, tokenized)})
            restore(model, saved)
    return {"run": str(run), "importance": str(importance_file), "task": task.name, "metric": task.metric,
            "seed": cfg.seed, "rows": rows}


def plan_counts(lora_drop_run: Path) -> dict[str, int]:
    """How many layers per module type a finished LoRA-drop run kept its own LoRA for."""
    plan = json.loads((lora_drop_run / "results.json").read_text())["plan"]
    return {t: len(layers) for t, layers in plan["retained"].items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True, help="a finished lora run (every site its own LoRA)")
    parser.add_argument("--importance", type=Path, required=True, help="importance.json of the same task and seed")
    parser.add_argument("--counts", type=int, nargs="+", required=True, help="k: layers kept per module type")
    parser.add_argument("--plan-from", type=Path, help="a finished lora-drop run: also keep its number of layers per type")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    record = table3(args.run, args.importance, args.counts, plan_counts(args.plan_from) if args.plan_from else None)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(record, args.out / f"table3_{record['task']}_seed{record['seed']}.json")
    for row in record["rows"]:
        print(row)


if __name__ == "__main__":
    main()
