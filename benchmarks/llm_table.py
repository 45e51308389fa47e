"""The LLM comparison (LoRA-drop's Table 2, DropLoRA's Table 1 analogue) on the bundled SmolLM2.

Per generation task and seed: LoRA, LoRA-drop (T = 0.9), DropLoRA (p = 0.5, token masks,
lora_dropout 0.05 as the DropLoRA authors' code) and both, r = 64, alpha = 2r, on q, k, v, o, up, down
(LoRA-drop's NLG setting). The two LoRA-drop methods of a (task, seed) share one probe. Runs go in
parallel worker processes (one GPU holds them all); the summary goes to --out:

- ``llm_table.md`` / ``llm_table.json``: the task metric (mean ± std over seeds), the base model's
  score, LoRA parameters, adapter bytes, the retained fraction per module type, and whether each run
  converged (its best evaluation is not its last, or its last two differ by less than the seed std);
- ``learning_curves_<task>.png``: every run's metric at every evaluation;
- ``importance_<task>.png``: the probe's importance per layer and module type (seed 0).

    python benchmarks/llm_table.py --out results/llm_table --runs /tmp/llm-runs --workers 12 --tasks bbc-headlines

``llm_studies.py`` runs a task's table runs together with its studies; ``--summary-only`` summarises
finished runs (``--runs`` with one folder per task).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from reproduce import count_converged, learning_curves, run_group, run_rows  # noqa: E402

METHODS = ["lora", "lora-drop", "droplora", "lora-drop+droplora"]
# per task: the training budget, evaluation interval and generation cap (a headline is ~10 tokens, a GSM
# solution ~150, a review's answer one word); review-sentiment trains on 4,000 of its 11,751 snippets
TASKS = {"bbc-headlines": dict(epochs=4.0, eval_steps=40, max_new_tokens=32, generation_eval_examples=200,
                               batch_size=16, learning_rate=2e-4),
         "gsm": dict(epochs=20.0, eval_steps=20, max_new_tokens=320, generation_eval_examples=20,
                     batch_size=16, learning_rate=2e-4),
         "review-sentiment": dict(epochs=2.0, eval_steps=25, max_new_tokens=4, generation_eval_examples=400,
                                  batch_size=32, learning_rate=3e-4, max_train_examples=4000)}


def options(args: argparse.Namespace, task: str) -> dict:
    settings = dict(dtype="bfloat16", **TASKS[task])
    if args.max_steps:  # a smoke test, in float32: bf16 matmuls crawl on a CPU
        settings |= dict(max_steps=args.max_steps, eval_steps=1, max_train_examples=64, generation_eval_examples=8,
                         dtype="float32")
    return dict(model=args.model, task=task, r=64, lora_alpha=128, lora_dropout=0.05, rank_dropout=0.5,
                max_length=args.max_length, show_progress=False, **settings)


def plan_jobs(args: argparse.Namespace) -> list[list[dict]]:
    groups = []
    for task in args.tasks:
        for seed in args.seeds:
            probe = str(args.runs / task / f"lora-drop-seed{seed}")
            groups.append([{"config": {**options(args, task), "seed": seed, "method": method,
                                       "output_dir": str(args.runs / task / f"{method}-seed{seed}")},
                            "importance_from": probe if method == "lora-drop+droplora" else None}
                           for method in ("lora-drop", "lora-drop+droplora")])
            groups.extend([[{"config": {**options(args, task), "seed": seed, "method": method,
                                        "output_dir": str(args.runs / task / f"{method}-seed{seed}")}}]
                           for method in ("lora", "droplora")])
    return groups


def summarise(args: argparse.Namespace) -> None:
    from loradrop.report import aggregate_runs, importance_heatmap, results_table, write_json

    rows, full, missing = [], [], []
    text = ["# SmolLM2-135M-Instruct: LoRA, LoRA-drop, DropLoRA, both", ""]
    for task in args.tasks:
        files = {m: [args.runs / task / f"{m}-seed{s}" / "results.json" for s in args.seeds] for m in METHODS}
        missing += [str(f.parent) for fs in files.values() for f in fs if not f.is_file()]  # cut off by a time limit
        runs = {m: [json.loads(f.read_text()) for f in fs if f.is_file()] for m, fs in files.items()}
        metric = runs["lora"][0]["metric_name"]
        mine = [r for results in runs.values() for r in results]
        for row, r in zip(run_rows(runs, "method"), mine):
            fractions = {t: len(r["plan"]["retained"][t]) / len(r["plan"]["layers"][t]) for t in r["plan"]["layers"]}
            rows.append(row | {f"kept_{t}": f for t, f in sorted(fractions.items())})
        full += mine
        learning_curves(runs, f"SmolLM2-135M-Instruct on {task}: every run's evaluations", metric,
                        args.out / f"learning_curves_{task}.png")
        importance = json.loads((args.runs / task / f"lora-drop-seed{args.seeds[0]}" / "importance.json").read_text())
        importance_heatmap({t: {int(k): v for k, v in s.items()} for t, s in importance["importance"].items()},
                           args.out / f"importance_{task}.png", title=f"{task}: LoRA importance I / max I, seed 0")
    value_keys = ("metric", "vs_lora", "base", "lora_params", "adapter_bytes") + tuple(sorted(k for k in rows[0] if k.startswith("kept_")))
    table = aggregate_runs(rows, group_by=("task", "method"), value_keys=value_keys)
    count_converged(table, rows, ("task", "method"))
    budgets = "; ".join(f"{t}: lr {TASKS[t]['learning_rate']}, batch {TASKS[t]['batch_size']}, {TASKS[t]['epochs']:g} epochs"
                        + (f" of {TASKS[t]['max_train_examples']:,} examples" if "max_train_examples" in TASKS[t] else "")
                        for t in args.tasks)
    text += [f"Seeds {args.seeds}; r = 64, alpha = 128 on q, k, v, o, up, down; bf16 base; DropLoRA p = 0.5 (token "
             f"masks), lora_dropout 0.05; {budgets}; metric in %, mean ± std over seeds (`n` runs); `vs_lora`: minus "
             "LoRA's metric of the same seed, which also draws the validation split; `base` is the model before "
             "fine-tuning.", "",
             *([f"Not finished (left out): {', '.join(missing)}", ""] if missing else []), results_table(table), "",
             "## Every run", "", results_table(rows), ""]
    (args.out / "llm_table.md").write_text("\n".join(text))
    write_json({"table": table, "rows": rows, "runs": full, "missing": missing, "settings": {k: str(v) for k, v in vars(args).items()}},
               args.out / "llm_table.json")
    print("\n".join(text))


def arguments(workers: int) -> argparse.ArgumentParser:
    """The options this script and ``llm_studies.py`` share."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-steps", type=int, help="a smoke test: this many steps on 64 examples, 8 evaluated")
    parser.add_argument("--workers", type=int, default=workers)
    parser.add_argument("--summary-only", action="store_true")
    return parser


def main() -> None:
    parser = arguments(workers=12)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        run_groups(args.model, plan_jobs(args), args.workers)
    summarise(args)


def run_groups(model: str, groups: list[list[dict]], workers: int) -> None:
    """Runs job groups (``reproduce.run_group``) in parallel worker processes on the one GPU."""
    from loradrop.models import load_causal_lm

    load_causal_lm(model)  # a bundled model is converted once, before the workers start
    start = time.time()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(run_group, g) for g in groups]:
            for d in future.result():
                print(f"done {d} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
