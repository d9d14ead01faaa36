"""aiso: run AI services on RabbitMQ and chain them into fault-tolerant pipelines."""

from aiso.contracts import (
    BaseMessage,
    Data,
    ErrorInfo,
    MessageType,
    PayloadType,
    ResultMessage,
    TaskMessage,
)

__all__ = [
    "BaseMessage",
    "Data",
    "ErrorInfo",
    "MessageType",
    "PayloadType",
    "ResultMessage",
    "TaskMessage",
    "__version__",
]

__version__ = "0.1.0"
