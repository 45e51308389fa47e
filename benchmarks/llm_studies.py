"""DropLoRA's knobs, LoRA-drop's ablations (its Table 5) and its Table 3 on the bundled SmolLM2-135M
(30 layers, so selection has room to differ), one generation task, 3 seeds.

They run in one pool with that task's LLM-table runs (``llm_table.py``), which they compare against and
reuse: LoRA, the lora-drop probe, DropLoRA at p = 0.5 with token masks. Everything else is as the table.

- ``knobs``: DropLoRA at p in {0.1, 0.3, 0.5, 0.7} with token masks, and p = 0.5 with sample and step
  masks (``RankDropoutConfig`` says what each draws);
- ``ablations``: with the lora-drop probe of the same seed and the k that T = 0.9 gives per module type:
  importance (lora-drop), top-k (the k last layers), random, inverse (the k least important keep their
  own LoRA), inverse-share (the k most important share one, the others keep theirs) and no-share
  (lora-drop's kept layers, no LoRA elsewhere);
- ``table3``: each LoRA run evaluated with only the k most / k least important layers' LoRA kept, at
  k = 3, 5, 10, 15 for every module type and at LoRA-drop's own k per type (the paper's setting).

Writes to --out ``knobs.md/json/png``, ``ablations.md/json``, ``table3.md/json/png`` and learning curves:

    python benchmarks/llm_studies.py --out results/llm_studies --runs /tmp/llm-runs --workers 15
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_table  # noqa: E402
from reproduce import count_converged, learning_curves, run_rows  # noqa: E402

KNOBS = [(0.1, "token"), (0.3, "token"), (0.5, "token"), (0.7, "token"), (0.5, "sample"), (0.5, "step")]
ABLATIONS = ["lora-drop", "top-k", "random", "inverse", "inverse-share", "no-share"]
TABLE3_COUNTS = [3, 5, 10, 15]  # layers kept per module type, of 30


def knob_dir(runs: Path, task: str, p: float, granularity: str, seed: int) -> Path:
    """The table's own DropLoRA run is the (0.5, token) knob."""
    name = "droplora" if (p, granularity) == (0.5, "token") else f"droplora-p{p}-{granularity}"
    return runs / task / f"{name}-seed{seed}"


def plan_jobs(args: argparse.Namespace) -> list[list[dict]]:
    options = llm_table.options(args, args.task)
    groups = []
    for seed in args.seeds:
        groups += [[{"config": {**options, "seed": seed, "method": "droplora", "rank_dropout": p,
                                "rank_dropout_granularity": g, "output_dir": str(knob_dir(args.runs, args.task, p, g, seed))}}]
                   for p, g in KNOBS if (p, g) != (0.5, "token")]
    for seed in args.seeds:
        probe = str(args.runs / args.task / f"lora-drop-seed{seed}")
        groups += [[{"config": {**options, "seed": seed, "method": m,
                                "output_dir": str(args.runs / args.task / f"{m}-seed{seed}")},
                     "importance_from": probe, "after": probe}] for m in ABLATIONS if m != "lora-drop"]
    return groups


def run_table3(run: Path, lora_drop_run: Path) -> dict:
    import table3

    return table3.table3(run, lora_drop_run / "importance.json", TABLE3_COUNTS, table3.plan_counts(lora_drop_run))


def load(path: Path) -> dict | None:
    file = path / "results.json"
    return json.loads(file.read_text()) if file.is_file() else None


def study_rows(args: argparse.Namespace, dirs: dict[str, list[Path]]) -> tuple[list[dict], dict[str, list[dict]], list[str]]:
    """``reproduce.run_rows`` of the finished runs under each setting (``dirs`` must have ``lora``); the
    runs by setting; the runs not finished."""
    loaded = {label: [(p, load(p)) for p in paths] for label, paths in dirs.items()}
    runs = {label: [r for _, r in pairs if r] for label, pairs in loaded.items()}
    missing = [str(p) for pairs in loaded.values() for p, r in pairs if not r]
    return run_rows(runs, "setting"), runs, missing


def table_text(title: str, notes: str, rows: list[dict], value_keys: tuple[str, ...], missing: list[str]) -> tuple[str, list[dict]]:
    from loradrop.report import aggregate_runs, results_table

    table = aggregate_runs(rows, group_by=("setting",), value_keys=value_keys)
    count_converged(table, rows, ("setting",))
    text = [f"# {title}", "", notes, "", *([f"Not finished (left out): {', '.join(missing)}", ""] if missing else []),
            results_table(table), "", "## Every run", "", results_table(rows), ""]
    return "\n".join(text), table


def summarise_knobs(args: argparse.Namespace) -> None:
    from loradrop.report import write_json

    dirs = {"lora": [args.runs / args.task / f"lora-seed{s}" for s in args.seeds]}
    dirs |= {f"p={p} {g}": [knob_dir(args.runs, args.task, p, g, s) for s in args.seeds] for p, g in KNOBS}
    rows, runs, missing = study_rows(args, dirs)
    notes = (f"SmolLM2-135M-Instruct on {args.task}, seeds {args.seeds}, the LLM table's settings (r = 64, "
             "lora_dropout 0.05); DropLoRA's rank-mask probability p and mask granularity; metric in %, mean ± std; "
             "`vs_lora`: minus LoRA's metric of the same seed (same split), mean ± std.")
    text, table = table_text("DropLoRA's knobs", notes, rows, ("metric", "vs_lora"), missing)
    (args.out / "knobs.md").write_text(text)
    write_json({"table": table, "rows": rows, "missing": missing}, args.out / "knobs.json")
    plot_knobs(table, args.out / "knobs.png", args.task)
    learning_curves(runs, f"{args.task}: DropLoRA's knobs, every run", runs["lora"][0]["metric_name"],
                    args.out / "learning_curves_knobs.png")
    print(text)


def save_plot(fig, ax, xlabel: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation metric (%)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_knobs(table: list[dict], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["setting"]: r for r in table}
    fig, ax = plt.subplots(figsize=(6, 4))
    lora = by["lora"]
    ax.axhspan(lora["metric"] - lora["metric_std"], lora["metric"] + lora["metric_std"], color="grey", alpha=0.3,
               label="LoRA (mean ± std)")
    token = [(p, by[f"p={p} token"]) for p, g in KNOBS if g == "token" and f"p={p} token" in by]
    ax.errorbar([p for p, _ in token], [r["metric"] for _, r in token], [r["metric_std"] for _, r in token],
                marker="o", capsize=3, label="token masks")
    for offset, granularity in ((0.015, "sample"), (0.03, "step")):
        if f"p=0.5 {granularity}" in by:
            r = by[f"p=0.5 {granularity}"]
            ax.errorbar([0.5 + offset], [r["metric"]], [r["metric_std"]], marker="s", capsize=3, linestyle="",
                        label=f"{granularity} masks, p = 0.5")
    save_plot(fig, ax, "rank-mask probability p", f"DropLoRA on SmolLM2-135M, {task}", path)


def summarise_ablations(args: argparse.Namespace) -> None:
    from loradrop.report import write_json

    dirs = {m: [args.runs / args.task / f"{m}-seed{s}" for s in args.seeds] for m in ["lora", *ABLATIONS]}
    rows, runs, missing = study_rows(args, dirs)
    for row in rows:
        row["own_loras"], _, row["sites"] = row.pop("sites_kept").partition("/")
    notes = (f"SmolLM2-135M-Instruct (30 layers) on {args.task}, seeds {args.seeds}, the LLM table's settings; "
             "each strategy keeps as many layers' own LoRA per module type as importance at T = 0.9 would (the "
             "lora-drop probe of the same seed), except inverse-share (the k most important share one LoRA, all "
             "others keep theirs). The library's `inverse` is the first reading: the k least important keep theirs. "
             "Metric in %, mean ± std; `vs_lora`: minus LoRA's metric of the same seed (same split), mean ± std.")
    text, table = table_text("LoRA-drop's ablations (Table 5)", notes, rows, ("metric", "vs_lora", "lora_params"), missing)
    (args.out / "ablations.md").write_text(text)
    write_json({"table": table, "rows": rows, "missing": missing}, args.out / "ablations.json")
    learning_curves(runs, f"{args.task}: selection strategies, every run", runs["lora"][0]["metric_name"],
                    args.out / "learning_curves_ablations.png")
    print(text)


def summarise_table3(args: argparse.Namespace, records: list[dict]) -> None:
    from loradrop.report import aggregate_runs, results_table, write_json

    rows = [{"kept": r["kept"], "k": r["k"], "seed": rec["seed"], "metric": 100 * r["metric"]}
            for rec in records for r in rec["rows"]]
    metric = {(r["kept"], r["k"], r["seed"]): r["metric"] for r in rows}
    paired = [{"kept": "most − least", "k": k, "seed": s, "metric": m - metric["least important", k, s]}
              for (kept, k, s), m in metric.items() if kept == "most important"]
    table = aggregate_runs(rows + paired, group_by=("kept", "k"), value_keys=("metric",))
    text = ["# LoRA-drop's Table 3: the LoRA of the most vs the least important layers", "",
            f"Each finished LoRA run of {args.task} (seeds {[r['seed'] for r in records]}) evaluated with only the k "
            "most or k least important layers' LoRA of each module type kept (importance: the lora-drop probe of the "
            "same seed), the others' lora_B zeroed; k `lora-drop` keeps as many per type as LoRA-drop did (where the "
            "run recorded it); `all` is the trained model re-evaluated from its saved adapter, `none` the base; "
            "`most − least` is the paired difference per seed. Metric in %, mean ± std over seeds.", "",
            results_table(table), ""]
    (args.out / "table3.md").write_text("\n".join(text))
    write_json({"table": table, "records": records}, args.out / "table3.json")
    plot_table3(table, args.out / "table3.png", args.task)
    print("\n".join(text))


def plot_table3(table: list[dict], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kept in ("most important", "least important"):  # the paired difference is in the table
        mine = sorted((r for r in table if r["kept"] == kept and isinstance(r["k"], int)), key=lambda r: r["k"])
        ax.errorbar([r["k"] for r in mine], [r["metric"] for r in mine], [r["metric_std"] for r in mine], marker="o",
                    capsize=3, label=f"{kept} k layers kept")
    for kept, style in (("all", "--"), ("none", ":")):
        row = next(r for r in table if r["kept"] == kept)
        ax.axhline(row["metric"], color="grey", linestyle=style, label=f"{kept} kept")
    save_plot(fig, ax, "k (layers with LoRA per module type)", f"Table 3 analogue, SmolLM2-135M, {task}", path)


def main() -> None:
    parser = llm_table.arguments(workers=15)
    parser.add_argument("--task", default="review-sentiment", choices=list(llm_table.TASKS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from loradrop.report import write_json

    table3_file = args.out / "table3_records.json"
    if not args.summary_only:
        args.tasks = [args.task]
        llm_table.run_groups(args.model, llm_table.plan_jobs(args) + plan_jobs(args), args.workers)
        pairs = [(args.runs / args.task / f"lora-seed{s}", args.runs / args.task / f"lora-drop-seed{s}") for s in args.seeds]
        with ProcessPoolExecutor(len(pairs), mp_context=multiprocessing.get_context("spawn")) as pool:
            records = list(pool.map(run_table3, *zip(*pairs)))
        write_json(records, table3_file)
    summarise_knobs(args)
    summarise_ablations(args)
    if table3_file.is_file():
        summarise_table3(args, json.loads(table3_file.read_text()))


if __name__ == "__main__":
    main()
