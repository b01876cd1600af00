"""One settings object, built once from the environment.

Every knob of the runtime and the stages is read here and nowhere else, so the
README's configuration table and this file are the whole story. Values are
validated at construction: a bad value fails at start-up with the variable's
name, never later in a stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Runtime configuration; see the README's configuration table."""

    redis_url: str = ""
    """REDIS_URL; empty means: start (or reuse) the embedded redis-server."""
    database_url: str = ""
    """DATABASE_URL; empty means: start (or reuse) the embedded PostgreSQL."""
    data_dir: Path = field(default_factory=lambda: Path(".devsched"))
    """DEVSCHED_DATA_DIR: where embedded servers keep their data and sockets."""
    prefix: str = "ds"
    """DEVSCHED_PREFIX: first part of every Redis key and stream name."""
    batch_size: int = 256
    """DEVSCHED_BATCH_SIZE: entries read per XREADGROUP."""
    write_batch_size: int = 1_000
    """DEVSCHED_WRITE_BATCH_SIZE: entries per XREADGROUP of the write-behind stages."""
    write_linger_ms: int = 50
    """DEVSCHED_WRITE_LINGER_MS: after a batch that was not full, a write-behind stage
    waits this long before reading again, so it writes few large batches, not many
    small ones (its work is behind the reply, so waiting costs no request latency)."""
    block_ms: int = 200
    """DEVSCHED_BLOCK_MS: XREADGROUP BLOCK; kept far below the socket timeout."""
    socket_timeout_s: float = 5.0
    """Socket timeout of every Redis connection (redis-py's default)."""
    claim_idle_ms: int = 15_000
    """DEVSCHED_CLAIM_IDLE_MS: a pending entry idle this long is reclaimed."""
    claim_every_ms: int = 2_000
    """DEVSCHED_CLAIM_EVERY_MS: how often a worker runs XAUTOCLAIM."""
    max_deliveries: int = 5
    """DEVSCHED_MAX_DELIVERIES: deliveries before an entry is dead-lettered."""
    max_message_bytes: int = 65_536
    """DEVSCHED_MAX_MESSAGE_BYTES: larger requests are refused as invalid."""
    idempotency_ttl_s: int = 86_400
    """DEVSCHED_IDEMPOTENCY_TTL_S: how long a request id's answer is kept."""
    released_ttl_s: int = 86_400
    """DEVSCHED_RELEASED_TTL_S: how long a closed allocation stays in Redis."""
    tick_ms: int = 1_000
    """DEVSCHED_TICK_MS: timer tick period."""
    expire_batch: int = 500
    """DEVSCHED_EXPIRE_BATCH: allocations expired per script call."""
    trim_every_ticks: int = 10
    """DEVSCHED_TRIM_EVERY_TICKS: streams are trimmed every N ticks."""
    quota_fail_open: bool = False
    """DEVSCHED_QUOTA_FAIL_OPEN: admit users with no quota record (default: refuse)."""
    metrics_port: int = 0
    """DEVSCHED_METRICS_PORT: Prometheus exporter port; 0 = off."""
    reply_ttl_s: int = 3_600
    """DEVSCHED_REPLY_TTL_S: a reply stream nobody reads expires after this."""

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            redis_url=_env("REDIS_URL", ""),
            database_url=_env("DATABASE_URL", ""),
            data_dir=Path(_env("DEVSCHED_DATA_DIR", ".devsched")).absolute(),
            prefix=_env("DEVSCHED_PREFIX", "ds"),
            batch_size=_int("DEVSCHED_BATCH_SIZE", 256, minimum=1),
            write_batch_size=_int("DEVSCHED_WRITE_BATCH_SIZE", 1_000, minimum=1),
            write_linger_ms=_int("DEVSCHED_WRITE_LINGER_MS", 50),
            block_ms=_int("DEVSCHED_BLOCK_MS", 200, minimum=1),
            claim_idle_ms=_int("DEVSCHED_CLAIM_IDLE_MS", 15_000, minimum=1),
            claim_every_ms=_int("DEVSCHED_CLAIM_EVERY_MS", 2_000, minimum=1),
            max_deliveries=_int("DEVSCHED_MAX_DELIVERIES", 5, minimum=1),
            max_message_bytes=_int("DEVSCHED_MAX_MESSAGE_BYTES", 65_536, minimum=256),
            idempotency_ttl_s=_int("DEVSCHED_IDEMPOTENCY_TTL_S", 86_400, minimum=1),
            released_ttl_s=_int("DEVSCHED_RELEASED_TTL_S", 86_400, minimum=1),
            tick_ms=_int("DEVSCHED_TICK_MS", 1_000, minimum=10),
            expire_batch=_int("DEVSCHED_EXPIRE_BATCH", 500, minimum=1),
            trim_every_ticks=_int("DEVSCHED_TRIM_EVERY_TICKS", 10, minimum=1),
            quota_fail_open=_bool("DEVSCHED_QUOTA_FAIL_OPEN", False),
            metrics_port=_int("DEVSCHED_METRICS_PORT", 0),
            reply_ttl_s=_int("DEVSCHED_REPLY_TTL_S", 3_600, minimum=1),
        )

    def with_urls(self, redis_url: str, database_url: str) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(redis_url=redis_url, database_url=database_url)
        return Settings(**values)
