"""Shared fixtures: a private RabbitMQ vhost per test session, and databases.

Tests run against the real servers that ``hack/servers.sh start`` brings up; nothing is mocked.
Each session gets its own vhost so queues left by an earlier run never leak into this one.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from aiso.store import Store, open_store

ROOT = Path(__file__).resolve().parent.parent


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """URL of a fresh vhost on the local broker; deleted at the end of the session."""
    vhost = f"aiso-test-{uuid.uuid4().hex[:8]}"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(
            f"RabbitMQ is not running or rabbitmqctl failed ({exc}); run hack/servers.sh start"
        )
    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    os.environ["AISO_AMQP_URL"] = url
    yield url
    _rabbitmqctl("delete_vhost", vhost)


POSTGRES_URL = os.environ.get(
    "AISO_TEST_POSTGRES_URL", "postgresql+asyncpg://aiso:aiso@127.0.0.1:5432/aiso"
)


def _postgres(sql: str, attempts: int = 1) -> None:
    """Run one statement with psql (not a driver: fixtures may run inside an event loop).

    ``attempts`` > 1 retries: dropping a database can race the server's own clean-up of the
    connections ``WITH (FORCE)`` just terminated.
    """
    dsn = POSTGRES_URL.replace("postgresql+asyncpg", "postgresql")
    for attempt in range(1, attempts + 1):
        done = subprocess.run(["psql", dsn, "-qc", sql], capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return
        if attempt < attempts:
            time.sleep(0.5 * attempt)
    raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    name = f"aiso_test_{uuid.uuid4().hex[:10]}"
    try:
        _postgres(f"CREATE DATABASE {name} TEMPLATE template0")
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        pytest.fail(f"cannot create a PostgreSQL database ({detail}); run hack/servers.sh start")
    yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    _postgres(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", attempts=5)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite database file."""
    return f"sqlite+aiosqlite:///{tmp_path / 'aiso.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """An open, migrated store on a fresh database: the test runs once on each kind."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    opened = await open_store(url)
    yield opened
    await opened.close()
