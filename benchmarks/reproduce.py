"""The papers' comparisons on the bundled model and every bundled classification task.

Per task and seed: LoRA, LoRA-drop (T = 0.9), its ablations (no-share, inverse, random, top-k),
DropLoRA (p = 0.5) and LoRA-drop + DropLoRA. Every LoRA-drop variant of a (task, seed) reuses one
probe, so the ablations differ only in how they select. Then a threshold sweep on one task and the
importance's stability across sample ratios (same probe steps for every ratio, as the paper).
Runs go in parallel worker processes; the summary (tables, plots, JSON) goes to --out.

    python benchmarks/reproduce.py --out results/ --runs /tmp/runs --workers 12
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

METHODS = ["lora-drop", "lora", "no-share", "inverse", "inverse-share", "random", "top-k", "droplora", "lora-drop+droplora"]
TASKS = ["rotten-tomatoes", "tweet-sentiment", "bbc-news"]
THRESHOLDS = [0.7, 0.8, 0.95]  # 0.9 is lora-drop and 1.0 is lora, run above
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def base_options(args: argparse.Namespace) -> dict:
    return dict(model=args.model, max_train_examples=args.max_train_examples, epochs=args.epochs,
                eval_steps=args.eval_steps, batch_size=32, learning_rate=1e-3, max_length=128, show_progress=False)


def run_group(jobs: list[dict]) -> list[str]:
    """Runs a list of jobs (``config``; ``importance_from``: a run whose probe to reuse; ``after``: a run
    whose importance.json to wait for, written by another worker; ``probe_only``) in order in one
    process; returns run dirs."""
    import torch

    from loradrop.config import RunConfig
    from loradrop.training import probe, run

    torch.set_num_threads(1)
    done = []
    for job in jobs:
        if job.get("after"):  # another worker's probe this job reuses
            wait_for(Path(job["after"]))
        cfg = RunConfig.from_options(dict(job["config"]))
        if job.get("probe_only"):
            if not (Path(cfg.output_dir) / "importance.json").exists():
                probe(cfg)
        else:
            run(cfg, importance_from=Path(job["importance_from"]) if job.get("importance_from") else None)
        done.append(cfg.output_dir)
    return done


def plan_jobs(args: argparse.Namespace) -> list[list[dict]]:
    groups = []
    opts = base_options(args)
    for task in args.tasks:
        for seed in args.seeds:
            first = str(args.runs / task / f"lora-drop-seed{seed}")
            group = []
            for method in METHODS:
                out = str(args.runs / task / f"{method}-seed{seed}")
                group.append({"config": {**opts, "task": task, "seed": seed, "method": method, "output_dir": out},
                              "importance_from": None if method == "lora-drop" else first})
            groups.append(group)
    task = args.tasks[0]
    for seed in args.seeds:  # the threshold sweep reuses the lora-drop probe of its seed, which runs first
        first = str(args.runs / task / f"lora-drop-seed{seed}")
        groups.append([{"config": {**opts, "task": task, "seed": seed, "method": "lora-drop", "threshold": t,
                                   "output_dir": str(args.runs / "threshold" / f"T{t}-seed{seed}")},
                        "importance_from": first, "after": first} for t in THRESHOLDS])
    groups.extend([{"config": {**opts, "task": task, "seed": 0, "method": "lora-drop", "sample_ratio": a,
                                "probe_epochs": 1000.0, "probe_max_steps": args.ratio_probe_steps,
                                "output_dir": str(args.runs / "ratio" / f"alpha{a}")}, "probe_only": True}]
                  for a in RATIOS)
    return groups


def wait_for(path: Path, timeout: float = 900) -> None:
    start = time.time()
    while not (path / "importance.json").exists():
        if time.time() - start > timeout:
            raise TimeoutError(f"{path} never wrote importance.json")
        time.sleep(2)


def converged(history: list[dict], seed_std: float) -> bool:
    """The issue's rule: the best evaluation is not the last one, or the last two evaluations differ
    by less than the seed standard deviation."""
    metrics = [e["metric"] for e in history]
    best_not_last = metrics.index(max(metrics)) < len(metrics) - 1
    flat = len(metrics) >= 2 and abs(metrics[-1] - metrics[-2]) < seed_std
    return best_not_last or flat


def run_rows(runs: dict[str, list[dict]], label: str) -> list[dict]:
    """One row per run (results.json) of each label (``runs`` must have ``lora``): ``summary_row`` with
    the metric and its floor (``base`` / ``majority``) in %, ``vs_lora`` (minus LoRA's metric of the same
    seed, which also draws the validation split, so this paired difference is the sharp comparison),
    ``converged`` (the rule within the label's seeds) and the best and last evaluated steps; the label
    goes under the key ``label``."""
    from loradrop.training import summary_row

    lora = {r["seed"]: 100 * r["metric"] for r in runs["lora"]}
    rows = []
    for name, results in runs.items():
        std = statistics.stdev([r["metric"] for r in results]) if len(results) > 1 else 0.0
        for r in results:
            row = {label: name, **summary_row(r)}
            floor = "base" if "base" in row else "majority"
            rows.append({**row, "metric": 100 * r["metric"], "vs_lora": 100 * r["metric"] - lora[r["seed"]],
                         floor: 100 * row[floor], "converged": converged(r["eval_history"], std),
                         "best_step": r["best_step"], "last_step": r["eval_history"][-1]["step"]})
    return rows


def count_converged(table: list[dict], rows: list[dict], keys: tuple[str, ...]) -> None:
    """Adds to each aggregated row how many of its runs (those equal on ``keys``) converged, as "n/m"."""
    for row in table:
        mine = [r for r in rows if all(r[k] == row[k] for k in keys)]
        row["converged"] = f"{sum(r['converged'] for r in mine)}/{len(mine)}"


def learning_curves(runs: dict[str, list[dict]], title: str, metric: str, path: Path) -> None:
    """Every run's metric at every evaluation, one colour per label of ``runs``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, results), colour in zip(runs.items(), plt.get_cmap("tab10").colors):
        for i, result in enumerate(results):
            steps = [e["step"] for e in result["eval_history"]]
            ax.plot(steps, [100 * e["metric"] for e in result["eval_history"]], color=colour, alpha=0.8,
                    label=label if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric} (validation, %)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(args: argparse.Namespace) -> None:
    from scipy.stats import spearmanr

    from loradrop.report import aggregate_runs, importance_heatmap, results_table, sample_ratio_heatmap, write_json

    def results(path: Path) -> dict:
        return json.loads((path / "results.json").read_text())

    rows, full = [], []
    for task in args.tasks:
        runs = {m: [results(args.runs / task / f"{m}-seed{s}") for s in args.seeds] for m in METHODS}
        full += [r for mine in runs.values() for r in mine]
        rows += run_rows(runs, "method")
        learning_curves(runs, f"{args.model} on {task}: every run's evaluations", "accuracy",
                        args.out / f"learning_curves_{task}.png")
    main = aggregate_runs(rows, group_by=("task", "method"), value_keys=("metric", "vs_lora", "lora_params", "adapter_bytes"))
    count_converged(main, rows, ("task", "method"))
    sweep = []
    task = args.tasks[0]
    for seed in args.seeds:
        for t, path in [(t, args.runs / "threshold" / f"T{t}-seed{seed}") for t in THRESHOLDS] + [
                (0.9, args.runs / task / f"lora-drop-seed{seed}"), (1.0, args.runs / task / f"lora-seed{seed}")]:
            r = results(path)
            kept = {k: len(v) for k, v in r["plan"]["retained"].items()}
            sweep.append({"threshold": t, **{f"layers_{k}": v for k, v in kept.items()}, "metric": 100 * r["metric"]})
    sweep_table = aggregate_runs(sorted(sweep, key=lambda x: x["threshold"]), group_by=("threshold",),
                                 value_keys=tuple(k for k in sweep[0] if k != "threshold"))
    ratios = {a: json.loads((args.runs / "ratio" / f"alpha{a}" / "importance.json").read_text())["importance"]
              for a in RATIOS}
    types = sorted(ratios[1.0])
    stability = []
    for a in RATIOS:
        row = {"alpha": a}
        for t in types:
            layers = sorted(ratios[1.0][t], key=int)
            row[f"spearman_{t}_vs_alpha1"] = float(spearmanr([ratios[a][t][k] for k in layers],
                                                             [ratios[1.0][t][k] for k in layers]).statistic)
        stability.append(row)
    for t in types:
        sample_ratio_heatmap({a: {int(k): v for k, v in ratios[a][t].items()} for a in RATIOS},
                             args.out / f"sample_ratio_{t}.png", module_type=t)
    per_task = {task: {t: {int(k): v for k, v in s.items()} for t, s in
                       json.loads((args.runs / task / "lora-drop-seed0" / "importance.json").read_text())["importance"].items()}
                for task in args.tasks}
    importance_heatmap(per_task, args.out / "importance_by_task.png", title="LoRA importance I / max I, seed 0")
    text = ["# Reproduction on the bundled model", "",
            f"Model: {args.model}; {args.epochs} epochs on at most {args.max_train_examples} training examples, "
            f"batch 32, lr 1e-3, r = 8 on query/value, 128 tokens, evaluated "
            f"{f'every {args.eval_steps} steps' if args.eval_steps else 'once per epoch'}; seeds {args.seeds}. Metric: validation accuracy (%), mean ± std over seeds; `vs_lora`: minus "
            "LoRA's accuracy of the same seed (which also draws the split); `converged`: runs whose best evaluation "
            "is not their last or whose last two differ by less than the seed std.", "", "## Methods", "",
            results_table(main), "", "## Every run", "", results_table(rows), "",
            "## Threshold sweep (" + args.tasks[0] + ")", "", results_table(sweep_table), "",
            "## Importance stability across sample ratios (" + args.tasks[0] + ", seed 0, "
            f"{args.ratio_probe_steps} probe steps each)", "", results_table(stability), ""]
    (args.out / "reproduce.md").write_text("\n".join(text))
    write_json({"methods": main, "runs": full, "threshold": sweep_table, "sample_ratio": stability,
                "sample_ratio_importance": ratios}, args.out / "reproduce.json")
    print("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-train-examples", type=int, default=8000)
    parser.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: each epoch); the "
                        "learning curves and the convergence rule need several evaluations")
    parser.add_argument("--ratio-probe-steps", type=int, default=150)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        groups = plan_jobs(args)
        start = time.time()
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_group, g) for g in groups]
            for future in futures:
                for d in future.result():
                    print(f"done {d} ({time.time() - start:.0f} s)", flush=True)
    summarise(args)


if __name__ == "__main__":
    main()
