"""The ``loradrop`` command. Bad input exits with code 2 and one line on stderr."""

from __future__ import annotations

import typer

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LoRA-drop and DropLoRA on PEFT models.")


@app.callback()
def _root() -> None:
    """LoRA-drop and DropLoRA on PEFT models."""


@app.command()
def version() -> None:
    """Print loradrop's version."""
    typer.echo(__version__)


def main() -> None:
    app()
