"""The ``loradrop`` command (typer + rich).

Bad input -- an unknown task, a missing column, an adapter that does not fit -- exits with code 2
and one line on stderr that says what to fix; typer's own usage errors do the same.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .config import LoraDropConfig, RunConfig, cli_fields, run_lora_defaults
from .run_dir import DirectoryInUse

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA-drop and DropLoRA on PEFT models.")
console = Console()

# -- options generated from the config dataclasses ---------------------------------------------------
def _option_type(hint: Any) -> Any:
    """The CLI type of a config field: a list of modules is one comma-separated string."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is str or (args and list[str] in args):
        return Optional[str] if type(None) in typing.get_args(hint) else str
    return Optional[args[0]] if args else hint


def _config_parameters(exclude: frozenset[str]) -> list[Parameter]:
    """One keyword parameter per CLI field of RunConfig and of its LoraDropConfig, with the field's
    help and the run's default: typer turns them into ``--option-name`` options."""
    run_lora = asdict(run_lora_defaults())
    params = []
    for cls in (RunConfig, LoraDropConfig):
        hints = typing.get_type_hints(cls)
        for f in cli_fields(cls):
            if f.name in exclude:
                continue
            names = ("--out",) if f.name == "output_dir" else ()
            default = run_lora[f.name] if cls is LoraDropConfig else f.default
            annotation = Annotated[_option_type(hints[f.name]), typer.Option(*names, help=f.metadata["help"])]
            params.append(Parameter(f.name, Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=Parameter.empty if default is MISSING else default))
    return params


def _with_config_options(exclude: frozenset[str] = frozenset()) -> Callable:
    """Gives a command taking ``**options`` an option for every config field (one edit adds a field
    to the dataclass, its validation and both commands)."""
    def decorate(command: Callable) -> Callable:
        own = [p for p in signature(command).parameters.values() if p.kind is not Parameter.VAR_KEYWORD]
        command.__signature__ = Signature(own + _config_parameters(exclude))
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        return command

    return decorate


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
    task: Annotated[str, typer.Option(help="rotten-tomatoes (MiniLM classifier) or bbc-headlines (SmolLM2 "
                                           "writes headlines)")] = "rotten-tomatoes",
    steps: Annotated[Optional[int], typer.Option(min=1, help="training steps per method (default: the task's "
                                                             "budget, 120 or 12)")] = None,
    train_examples: Annotated[Optional[int], typer.Option(min=32, help="training examples drawn from the task "
                                                                       "(default: 6400 or 640)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Fine-tune a bundled model with lora, lora-drop, droplora and lora-drop+droplora: MiniLM on
    rotten-tomatoes, or SmolLM2-135M-Instruct on bbc-headlines (scored against the base model);
    print the table and write out/report. Finished methods are not rerun."""
    from .tasks.registry import get_task
    from .training import DEMO_BUDGETS, run_demo, summary_row

    rows = run_demo(out, task=task, steps=steps, train_examples=train_examples, seed=seed)
    metric = get_task(task).metric
    names = {"method": "method", "sites_kept": "sites", "lora_params": "params", "adapter_bytes": "bytes",
             "metric": metric, "majority": "majority", "base": "base"}  # short headers: the table fits 80 columns
    shown = [{names[k]: v for k, v in summary_row(r).items() if k in names} for r in rows]
    _print_rows(shown, f"loradrop demo: {DEMO_BUDGETS[task].model} on {task}, validation {metric}")
    console.print(f"report: {out / 'report'} (results.md, importance_heatmap.png, output_norms.png)")


_TRAINING_ONLY = frozenset({"method", "epochs", "max_steps", "batch_size", "learning_rate", "eval_steps", "reinit",
                            "rank_dropout", "rank_dropout_granularity", "rank_dropout_rescale"})


@app.command()
@_fail_cleanly
@_with_config_options()
def train(
    importance_from: Annotated[Optional[Path], typer.Option(help="reuse the probe of another run directory")] = None,
    **options: Any,
) -> None:
    """Fine-tune one method; writes results.json, the compact adapter and the report figures."""
    from .training import _is_main, run, summary_row

    cfg = RunConfig.from_options(options)
    results = run(cfg, importance_from=importance_from)
    if _is_main():  # under torchrun / accelerate launch every rank gets here
        _print_rows([summary_row(results)], f"{cfg.method} on {results['task']}")


@app.command()
@_fail_cleanly
@_with_config_options(exclude=_TRAINING_ONLY)
def importance(**options: Any) -> None:
    """Run LoRA-drop's probe only: importance per layer and module type, the plan, a heatmap."""
    from .training import probe

    cfg = RunConfig.from_options(options)
    record = probe(cfg)
    rows = [{"type": t, "layer": int(layer), "importance": v,
             "retained": "yes" if int(layer) in record["plan"]["retained"][t] else ""}
            for t, scores in record["importance"].items() for layer, v in sorted(scores.items(), key=lambda x: int(x[0]))]
    _print_rows(rows, f"LoRA importance (T = {cfg.lora.threshold})")
    console.print(f"heatmap: {Path(cfg.output_dir) / 'importance_heatmap.png'}")


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
