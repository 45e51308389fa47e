"""The ``loradrop`` command (typer + rich).

Bad input -- an unknown task, a missing column, an adapter that does not fit -- exits with code 2
and one line on stderr that says what to fix; typer's own usage errors do the same.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .run_dir import DirectoryInUse

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA-drop and DropLoRA on PEFT models.")
console = Console()

# -- shared options ------------------------------------------------------------------------------
Task = Annotated[str, typer.Option(help="bundled task: rotten-tomatoes, tweet-sentiment, bbc-news")]
Data = Annotated[Optional[Path], typer.Option(help="your own CSV/TSV/JSONL/JSON file instead of --task")]
TextColumn = Annotated[str, typer.Option(help="column of the text in --data")]
PairColumn = Annotated[Optional[str], typer.Option(help="column of the second text of a pair in --data")]
LabelColumn = Annotated[str, typer.Option(help="column of the label in --data")]
Model = Annotated[str, typer.Option(help="'minilm' (bundled) or a transformers model folder / hub id")]
Targets = Annotated[Optional[str], typer.Option(help="comma-separated LoRA target modules (default by model type)")]
Seed = Annotated[int, typer.Option(help="random seed")]
Rank = Annotated[int, typer.Option(help="LoRA rank")]
Threshold = Annotated[float, typer.Option(help="LoRA-drop's cumulative importance T")]
SampleRatio = Annotated[float, typer.Option(help="probe sample ratio alpha")]
ProbeMaxSteps = Annotated[Optional[int], typer.Option(help="cap on probe steps")]
ProbeBatchSize = Annotated[int, typer.Option(help="probe batch size per process")]
MaxLength = Annotated[int, typer.Option(help="tokens per example")]
MaxTrainExamples = Annotated[Optional[int], typer.Option(help="use at most this many training examples")]


def _fail_cleanly(command: Callable) -> Callable:
    """Turns the errors that mean 'bad input' into exit code 2 and one line on stderr."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ValueError, ImportError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                DirectoryInUse) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def _targets(value: str | None) -> list[str] | None:
    if value is None:
        return None  # the model type's defaults
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--target-modules {value!r} names no module: pass comma-separated names, e.g. query,value "
                         "(leave the option out for the model type's defaults)")
    return names


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' load report, its loading progress bar and Python warnings would bury the command
    line's one-line error."""
    import transformers

    level, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()


def _print_rows(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="right" if isinstance(rows[0][column], (int, float)) else "left")
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else f"{v:.4f}" if isinstance(v, float) else str(v)
                        for v in row.values()))
    console.print(table)


@app.callback()
def _root() -> None:
    """LoRA-drop and DropLoRA on PEFT models."""


@app.command()
def version() -> None:
    """Print loradrop's version."""
    typer.echo(__version__)


@app.command()
@_fail_cleanly
def demo(
    out: Annotated[Path, typer.Option(help="where runs and the report go")] = Path("demo-out"),
    steps: Annotated[int, typer.Option(min=1, help="training steps per method")] = 300,
    train_examples: Annotated[int, typer.Option(min=32, help="training examples drawn from the task")] = 6400,
    seed: Seed = 0,
) -> None:
    """Fine-tune the bundled MiniLM on rotten-tomatoes with lora, lora-drop, droplora and
    lora-drop+droplora; print the table and write out/report. Finished methods are not rerun."""
    from .training import run_demo, summary_row

    rows = run_demo(out, steps=steps, train_examples=train_examples, seed=seed)
    names = {"method": "method", "sites_kept": "sites", "lora_params": "params", "adapter_bytes": "bytes",
             "metric": "accuracy", "majority": "majority"}  # short headers: the table fits 80 columns
    shown = [{names[k]: v for k, v in summary_row(r).items() if k in names} for r in rows]
    _print_rows(shown, "loradrop demo: MiniLM on rotten-tomatoes, validation accuracy")
    console.print(f"report: {out / 'report'} (results.md, importance_heatmap.png, output_norms.png)")


def _run_config(out: Path, **options: Any) -> Any:
    from .training import RunConfig

    data = options.pop("data")
    return RunConfig(output_dir=str(out), data=str(data) if data else None,
                     target_modules=_targets(options.pop("target_modules")), **options)


@app.command()
@_fail_cleanly
def train(
    out: Annotated[Path, typer.Option(help="run directory (rerun the same command to resume)")],
    method: Annotated[str, typer.Option(help="lora, lora-drop, droplora, lora-drop+droplora, inverse, random, top-k, no-share")] = "lora-drop",
    task: Task = "rotten-tomatoes",
    data: Data = None,
    text_column: TextColumn = "text",
    text_pair_column: PairColumn = None,
    label_column: LabelColumn = "label",
    model: Model = "minilm",
    target_modules: Targets = None,
    r: Rank = 8,
    threshold: Threshold = 0.9,
    sample_ratio: SampleRatio = 0.1,
    probe_max_steps: ProbeMaxSteps = None,
    probe_batch_size: ProbeBatchSize = 16,
    rank_dropout: Annotated[float, typer.Option(help="DropLoRA's p for the droplora methods")] = 0.5,
    fast_path: Annotated[bool, typer.Option(help="loradrop's fused LoRA forward (off: PEFT's own)")] = True,
    epochs: Annotated[float, typer.Option(help="training epochs")] = 3.0,
    max_steps: Annotated[Optional[int], typer.Option(help="stop after this many steps")] = None,
    batch_size: Annotated[int, typer.Option(help="batch size")] = 32,
    learning_rate: Annotated[float, typer.Option(help="learning rate")] = 1e-3,
    max_length: MaxLength = 128,
    max_train_examples: MaxTrainExamples = None,
    eval_steps: Annotated[Optional[int], typer.Option(help="evaluate every N steps (default: each epoch)")] = None,
    importance_from: Annotated[Optional[Path], typer.Option(help="reuse the probe of another run directory")] = None,
    seed: Seed = 0,
) -> None:
    """Fine-tune one method; writes results.json, the compact adapter and the report figures."""
    options = dict(locals())
    options.pop("importance_from")
    from .training import run, summary_row

    from .training import _is_main

    results = run(_run_config(options.pop("out"), **options), importance_from=importance_from)
    if _is_main():  # under torchrun / accelerate launch every rank gets here
        _print_rows([summary_row(results)], f"{method} on {results['task']}")


@app.command()
@_fail_cleanly
def importance(
    out: Annotated[Path, typer.Option(help="where importance.json and the figures go")],
    task: Task = "rotten-tomatoes",
    data: Data = None,
    text_column: TextColumn = "text",
    text_pair_column: PairColumn = None,
    label_column: LabelColumn = "label",
    model: Model = "minilm",
    target_modules: Targets = None,
    r: Rank = 8,
    threshold: Threshold = 0.9,
    sample_ratio: SampleRatio = 0.1,
    probe_max_steps: ProbeMaxSteps = None,
    probe_batch_size: ProbeBatchSize = 16,
    max_length: MaxLength = 128,
    max_train_examples: MaxTrainExamples = None,
    seed: Seed = 0,
) -> None:
    """Run LoRA-drop's probe only: importance per layer and module type, the plan, a heatmap."""
    options = dict(locals())
    from .training import probe

    record = probe(_run_config(options.pop("out"), **options))
    rows = [{"type": t, "layer": int(layer), "importance": v,
             "retained": "yes" if int(layer) in record["plan"]["retained"][t] else ""}
            for t, scores in record["importance"].items() for layer, v in sorted(scores.items(), key=lambda x: int(x[0]))]
    _print_rows(rows, f"LoRA importance (T = {threshold})")
    console.print(f"heatmap: {out / 'importance_heatmap.png'}")


@app.command()
@_fail_cleanly
def inspect(
    adapter: Annotated[Path, typer.Argument(help="a directory written by save_adapter / loradrop train")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Sites retained / shared / dropped per type, parameters, bytes on disk, the plan."""
    from .adapter_io import describe_adapter

    info = describe_adapter(adapter)
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    rows = [{"type": t, "retained": str(v["retained"]), "shared": str(v["shared"]), "dropped": str(v["dropped"])}
            for t, v in info["sites"].items()]
    if rows:
        _print_rows(rows, f"{adapter}: r = {info['r']}, base {info['base_model'].get('architecture')}")
    console.print(f"{info['trainable_parameters']:,} parameters, {info['bytes_on_disk']:,} bytes on disk, "
                  f"rank dropout: {info['rank_dropout'] or 'off'}")


@app.command()
@_fail_cleanly
def export(
    adapter: Annotated[Path, typer.Argument(help="a compact loradrop adapter directory")],
    out: Annotated[Path, typer.Argument(help="where the standard PEFT adapter goes")],
    base_model: Annotated[Optional[str], typer.Option(help="base model folder / hub id (default: the recorded one)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace OUT even when it is not an adapter loradrop wrote "
                                        "(never the current directory, its ancestors or the source)")] = False,
) -> None:
    """Write the adapter in the standard PEFT format (shared weights per site), for serving. An
    existing OUT is replaced only when loradrop wrote it (or with --force)."""
    from .adapter_io import export_peft, is_loradrop_output, load_adapter, load_base_model
    from .run_dir import check_replaceable, target_lock

    check_replaceable(out, force, is_loradrop_output, protect=(adapter,), how="pass --force")  # before the slow load
    with target_lock(out) if out.parent.is_dir() else contextlib.nullcontext():
        with _quiet_loading():
            model = load_adapter(load_base_model(adapter, base_model), adapter)
        export_peft(model, out, overwrite=force, protect=(adapter,))
    console.print(f"exported {adapter} -> {out} (loads with peft.PeftModel.from_pretrained)")


@app.command()
@_fail_cleanly
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories with results.json")],
) -> None:
    """A table across runs: mean ± std of the metric over seeds, per task and method."""
    from .report import aggregate_runs, results_table
    from .training import summary_row

    rows = []
    for run_dir in run_dirs:
        file = run_dir / "results.json"
        if not file.is_file():
            raise ValueError(f"{run_dir} has no results.json: is it a finished run directory?")
        rows.append(summary_row(json.loads(file.read_text())))
    typer.echo(results_table(aggregate_runs(rows, group_by=("task", "method"), value_keys=("metric", "lora_params"))))


def main() -> None:
    app()


if __name__ == "__main__":  # torchrun -m loradrop.cli train ...
    main()
