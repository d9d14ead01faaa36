"""The root ``aiso`` command; each sub-module of ``aiso.cli`` adds its commands to it."""

from __future__ import annotations

import typer

__all__ = ["app", "fail"]

app = typer.Typer(
    name="aiso",
    help="Run AI services and chain them into fault-tolerant pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` as an error and return the exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)
