"""``aiso operator``: reconcile AIService and Pipeline resources in a cluster."""

from __future__ import annotations

import typer
from pydantic import ValidationError

from aiso.cli.app import app, fail
from aiso.cli.logs import setup_logging
from aiso.devenv.settings import invalid_settings

__all__ = ["operator"]


@app.command("operator")
def operator(
    namespace: list[str] = typer.Option(
        [], "--namespace", "-n", help="Namespace to serve (repeatable)."
    ),
    all_namespaces: bool = typer.Option(
        False, "--all-namespaces", "-A", help="Serve every namespace (needs the ClusterRole)."
    ),
    liveness: str | None = typer.Option(
        None, help="Serve a liveness probe at this URL, e.g. http://0.0.0.0:8080/healthz."
    ),
) -> None:
    """Run the operator: AIServices become Deployments, Services, autoscalers and queues;
    Pipelines are validated against the AIServices. Settings: AISO_OPERATOR_* (docs/operator.md)."""
    if bool(namespace) == all_namespaces:
        raise fail("give either --namespace NS (one or more) or --all-namespaces")
    try:
        from aiso.operator.handlers import run  # reads AISO_OPERATOR_* on import
    except ImportError as exc:
        raise fail(f"the operator needs the extra: pip install 'aiso[operator]' ({exc})") from None
    except ValidationError as exc:
        raise invalid_settings(exc, "AISO_OPERATOR_") from None
    setup_logging("operator")
    run(namespace, liveness=liveness)
