"""The worker-orchestrator: runs pipelines step by step, applying each result exactly once."""

from aiso.orchestrator.engine import Engine
from aiso.orchestrator.runner import Orchestrator, run
from aiso.orchestrator.timers import Timer, TimerKind

__all__ = ["Engine", "Orchestrator", "Timer", "TimerKind", "run"]
