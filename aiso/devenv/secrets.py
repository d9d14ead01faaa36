"""The webhook signing secret of a local platform: kept in ``.aiso/`` so restarts reuse it.

A cluster gets ``AISO_WEBHOOK_SECRET`` from a Secret; ``aiso dev`` makes one the first time
it runs, so webhooks are signed on a laptop exactly as in production and a receiver being
developed against it can verify them (``aiso.webhooks.verify``).
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

__all__ = ["SECRET_FILE", "webhook_secret"]

SECRET_FILE = Path(".aiso/webhook-secret")


def webhook_secret(path: Path = SECRET_FILE) -> str:
    """The ``whsec_…`` secret stored at ``path``, created (readable by the owner only) if
    missing or empty."""
    if path.exists():
        stored = path.read_text().strip()
        if stored:
            return stored
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    return secret
