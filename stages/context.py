"""What every stage of a process is built with: connections, settings, clock, key names.

The runtime builds one per serving process (``APP.context``) and hands it to each
stage's constructor; stages never open connections or read the clock themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis

from pipeline.clock import Clock
from pipeline.worker import Batching
from schemas.keys import Keys
from stages.settings import Settings


@dataclass
class StageContext:
    redis: Redis
    settings: Settings
    clock: Clock
    pg: asyncpg.Pool | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    """What a stage shares with its background task in this process (an HTTP sink's
    sender and breaker), by the stage's name."""

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.prefix)

    @property
    def write_behind(self) -> Batching:
        """How the stages behind the changes stream read: large batches, with a linger."""
        return Batching(self.settings.write_batch_size, self.settings.write_linger_ms)
