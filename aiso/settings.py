"""Typed settings, read from ``AISO_*`` environment variables (and ``.env``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings", "store_url"]

_STORE_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
"""The async driver the store runs each database on."""
_REPLACED_DRIVERS = {"", "pysqlite"}
"""Drivers a URL may name that are swapped for the async one: none, or Python's own sqlite3."""


def store_url(url: str) -> str:
    """The task store's URL with its async driver: ``sqlite:///…`` and ``postgresql://…``
    (or ``postgres://…``) as people usually write them get ``aiosqlite`` and ``asyncpg``.
    Raises ``ValueError`` saying what is accepted for another database or driver."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    accepted = (
        "the task store is SQLite (sqlite+aiosqlite:///path/to/aiso.db) or PostgreSQL "
        "(postgresql+asyncpg://user:password@host:5432/database)"
    )
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"not a database URL; {accepted}") from None
    backend, _, driver = parsed.drivername.partition("+")
    backend = "postgresql" if backend == "postgres" else backend
    wanted = _STORE_DRIVERS.get(backend)
    if wanted is None:
        raise ValueError(f"{backend!r} is not supported; {accepted}")
    if driver != wanted and driver not in _REPLACED_DRIVERS:
        raise ValueError(f"the {backend} driver must be {wanted}, not {driver}; {accepted}")
    return parsed.set(drivername=f"{backend}+{wanted}").render_as_string(hide_password=False)


class Settings(BaseSettings):
    """Every knob of every aiso process; one class so ``aiso dev`` can pass them all on."""

    model_config = SettingsConfigDict(
        env_prefix="AISO_",
        env_file=".env",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """RabbitMQ URL. Default is the stock local broker with its loopback-only guest user."""

    database_url: str = "sqlite+aiosqlite:///.aiso/aiso.db"
    """SQLAlchemy async URL of the task store. SQLite under ``.aiso/`` needs no server for
    ``aiso dev``; use ``postgresql+asyncpg://…`` when more than one orchestrator runs. A URL
    without a driver (``sqlite:///…``, ``postgresql://…``) gets the async one."""

    @field_validator("database_url")
    @classmethod
    def _store_url(cls, url: str) -> str:
        return store_url(url)

    manifests: Path = Path("manifests")
    """Directory (or file) of AIService/Pipeline YAML read when ``registry`` is ``files``."""

    registry: str = Field(default="files", pattern="^(files|kubernetes)$")
    """Where pipelines and services come from: ``files`` (``aiso dev``) or ``kubernetes``."""

    namespace: str = "default"
    """Kubernetes namespace watched when ``registry`` is ``kubernetes``."""

    max_body_bytes: int = 10 * 1024 * 1024
    """Largest accepted request body in bytes. 10 MiB fits a few minutes of compressed audio
    inline; larger inputs should be passed as URLs."""

    wait_max_seconds: float = 60.0
    """Upper bound in seconds for ``?wait=``; longer waits hold a connection for nothing."""

    outbox_sweep_seconds: float = 2.0
    """Seconds between sweeps that publish outbox rows a crashed process left behind. Short,
    because a row left behind is a task that stands still until the sweep."""

    outbox_grace_seconds: float = 5.0
    """Age in seconds before another process may publish an outbox row: the writer normally
    publishes its own rows within milliseconds, so only orphans get this old."""

    orchestrator_prefetch: int = 64
    """Unacknowledged task/result messages one orchestrator holds. Enough to keep the store
    busy; small enough that a killed orchestrator hands back little work."""

    orchestrator_batch_size: int = Field(default=64, ge=1)
    """Most messages one orchestrator transaction applies. Batching only happens when messages
    are already waiting, so it adds no latency; 64 keeps one transaction short."""

    orchestrator_batch_workers: int = Field(default=1, ge=1)
    """Batches one orchestrator applies at once (each one transaction, then its publishes).
    One: while it waits for the broker's confirms the next messages pile up, so the next
    transaction carries more of them, and a message costs less CPU the more share a
    transaction (measured against two, on SQLite and on PostgreSQL: more throughput, less CPU
    per task). More orchestrator replicas are the way to scale out."""

    orchestrator_delivery_limit: int = Field(default=10, ge=1)
    """Deliveries of one message the orchestrator may fail to apply before it parks it in
    ``aiso.orchestrator.dead`` with the reason. Each failure is followed by a one-second
    pause, so 10 rides out a store restart, yet a message that can never apply (a corrupt
    row, a bug) stops being retried instead of failing every second forever."""

    task_retention_hours: float = 168.0
    """Finished tasks older than this many hours are deleted (one week by default)."""

    service_host: str = "0.0.0.0"
    """Interface the service runtime's HTTP server binds to."""

    service_port: int = 8000
    """Port of the service runtime's HTTP server (health, metrics, ``/v1/process``)."""

    shutdown_grace_seconds: float = 60.0
    """How long a service waits for in-flight work after SIGTERM before it exits anyway."""

    heartbeat_seconds: float = Field(default=5.0, gt=0)
    """Seconds between a service replica's heartbeats on ``aiso.events``. Gateways forget a
    replica silent for three intervals, so a dead one leaves ``GET /v1/services`` within
    15 s by default, while a few hundred replicas cost the broker a trickle of tiny messages."""

    api_keys: list[SecretStr] = Field(default_factory=list)
    """Client API keys for the gateway, as ``sha256:<hex>`` digests (or plain keys, which are
    hashed on load). Empty means no authentication, which suits ``aiso dev`` only."""

    admin_api_keys: list[SecretStr] = Field(default_factory=list)
    """Operator keys (same forms): also allowed on the dead-letter routes, which clients'
    keys are not (403)."""

    allow_private_urls: bool = False
    """Allow ``callback_url`` and URL payloads on private, loopback and link-local addresses.
    Off by default: a task submitter must not be able to reach the cluster network (SSRF)."""

    webhook_secret: SecretStr | None = None
    """``whsec_<base64>`` key that signs client webhooks (Standard Webhooks)."""

    webhook_timeout_seconds: float = 10.0
    """Seconds one webhook POST may take; a slow receiver is retried, not waited for."""

    webhook_horizon_seconds: float = 86400.0
    """How long, in seconds, a webhook is retried before it is abandoned (one day)."""

    webhook_backoff_seconds: list[float] = Field(
        default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0]
    )
    """Delay before each redelivery of a webhook; the last entry repeats."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return Settings()
