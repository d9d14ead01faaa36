"""Migrating the task store from the command line, with errors a user can read."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from aiso.store import open_store

__all__ = ["StoreError", "migrate", "redact"]


class StoreError(Exception):
    """The store cannot be reached or migrated; the message is one line."""


def redact(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


async def migrate(url: str) -> None:
    """Bring the store at ``url`` to the newest schema. Done once by ``aiso dev`` before its
    children start, so they never race each other to migrate."""
    try:
        store = await open_store(url)
        await store.close()
    except Exception as exc:  # driver, network and migration errors all mean the same here
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StoreError(f"cannot prepare the task store at {redact(url)}: {reason}") from None
