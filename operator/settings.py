"""Settings of ``aiso operator``, read from ``AISO_OPERATOR_*`` environment variables.

The broker URL is the exception: the operator reads the same ``AISO_AMQP_URL`` as every other
aiso process (``AISO_OPERATOR_AMQP_URL`` wins when both are set), because it declares the same
queues the services consume.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

import aiso

__all__ = ["OperatorSettings"]


class OperatorSettings(BaseSettings):
    """Every knob of the operator; the builders get this object, so it is all they depend on."""

    model_config = SettingsConfigDict(
        env_prefix="AISO_OPERATOR_", extra="ignore", use_attribute_docstrings=True, frozen=True
    )

    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        validation_alias=AliasChoices("AISO_OPERATOR_AMQP_URL", "AISO_AMQP_URL"),
    )
    """RabbitMQ URL the operator declares and deletes service queues with."""

    default_image: str = f"aiso:{aiso.__version__}"
    """Container image of an AIService that names none (``spec.image``)."""

    broker_secret: str = "aiso-broker"
    """Secret, in each AIService's namespace, holding the AMQP URL its replicas use. The
    operator never reads it: pods get it as ``AISO_AMQP_URL`` through a ``secretKeyRef``, and
    KEDA through a TriggerAuthentication."""

    broker_secret_key: str = "url"
    """Key of the AMQP URL in ``broker_secret``."""

    termination_margin_seconds: int = Field(default=30, ge=0)
    """Added to an AIService's ``timeoutSeconds`` to make its pods' termination grace period:
    on SIGTERM a replica stops consuming and finishes in-flight work, which takes at most one
    step deadline, then needs a moment to publish results and exit."""

    autoscaler: Literal["auto", "hpa", "keda"] = "auto"
    """``auto`` uses KEDA when its ScaledObject CRD is installed at operator start, else an
    ``autoscaling/v2`` HorizontalPodAutoscaler."""

    status_interval_seconds: float = Field(default=10.0, gt=0)
    """How often each AIService's queue depth and consumer count are refreshed in its status."""

    resync_interval_seconds: float = Field(default=300.0, gt=0)
    """How often every AIService's children are re-applied even without an event, as a safety
    net behind the event-driven drift repair (an unchanged apply writes nothing)."""

    queue_delete_retries: int = Field(default=6, ge=0)
    """Retries of a queue deletion that finds messages or consumers, before the AIService is
    let go and its queues are kept (policy ``DeleteIfEmpty``)."""

    queue_delete_delay_seconds: float = Field(default=10.0, gt=0)
    """Seconds between those retries: time for replicas to finish and the queue to drain."""
