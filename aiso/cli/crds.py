"""``aiso crds``: write (or check) the CRDs generated from ``aiso.resources``."""

from __future__ import annotations

from pathlib import Path

import typer

from aiso.cli.app import app, fail
from aiso.crdgen import check_crds, write_crds

__all__ = ["crds"]


@app.command("crds")
def crds(
    out: Path = typer.Option(Path("crds"), help="Directory the CRD YAML files go to."),
    check: bool = typer.Option(
        False, "--check", help="Write nothing; exit 1 listing the files that drifted."
    ),
) -> None:
    """Generate the AIService and Pipeline CRDs from the Pydantic models."""
    if check:
        drifted = check_crds(out)
        if drifted:
            names = ", ".join(str(p) for p in drifted)
            raise fail(f"CRDs out of date with aiso/resources.py: {names}; run `aiso crds`")
        typer.echo(f"CRDs in {out} are up to date")
        return
    for path in write_crds(out):
        typer.echo(f"wrote {path}")
