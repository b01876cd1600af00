"""Settings of the runtime, declared once, read from the environment.

Each field is declared with :func:`env` (its variable, its default, its lower
bound) and a docstring; :meth:`RuntimeSettings.from_env` reads every declared
field, so a default is written in one place. Values are validated at
construction: a bad value fails at start-up with the variable's name, never later
in a stage. An application adds its own settings by subclassing
:class:`RuntimeSettings` with more :func:`env` fields; the runtime only reads the
fields declared here.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Self, TypeVar

T = TypeVar("T")

FSYNC_POLICIES = ("always", "everysec", "no")
"""The values of redis-server's `appendfsync`."""


def env(name: str, default: T, *, minimum: float | None = None,
        choices: tuple[str, ...] = ()) -> T:
    """A settings field read from the variable ``name`` (``default`` when unset or empty);
    a number below ``minimum``, or a text outside ``choices`` (when given), is refused."""
    meta = {"env": name, "minimum": minimum, "choices": choices}
    if isinstance(default, Path):
        path = default
        return field(default_factory=lambda: path, metadata=meta)
    return field(default=default, metadata=meta)


def _parse(name: str, raw: str, default: object, minimum: float | None,
           choices: tuple[str, ...] = ()) -> object:
    if isinstance(default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(default, Path):
        return Path(raw).absolute()
    if isinstance(default, int | float):
        kind = type(default)
        try:
            value = kind(raw)
        except ValueError as exc:
            raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                             f"got {raw!r}") from exc
        if minimum is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum:g}, got {value}")
        return value
    if choices and raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


@dataclass(frozen=True)
class RuntimeSettings:
    """What the stream runtime needs; see the README's configuration table."""

    redis_url: str = env("REDIS_URL", "")
    """Redis to use; empty: start (or reuse) the embedded redis-server."""
    database_url: str = env("DATABASE_URL", "")
    """PostgreSQL to use; empty: start (or reuse) the embedded PostgreSQL."""
    data_dir: Path = env("DEVSCHED_DATA_DIR", Path(".devsched"))
    """Where embedded servers keep their data and sockets."""
    prefix: str = env("DEVSCHED_PREFIX", "ds")
    """First part of every Redis key and stream name."""
    batch_size: int = env("DEVSCHED_BATCH_SIZE", 256, minimum=1)
    """Entries read per XREADGROUP."""
    block_ms: int = env("DEVSCHED_BLOCK_MS", 200, minimum=1)
    """XREADGROUP BLOCK; kept far below the socket timeout."""
    socket_timeout_s: float = 5.0
    """Socket timeout of every Redis connection (redis-py's default; not configurable)."""
    claim_idle_ms: int = env("DEVSCHED_CLAIM_IDLE_MS", 15_000, minimum=1)
    """A pending entry idle this long is reclaimed from its consumer."""
    claim_every_ms: int = env("DEVSCHED_CLAIM_EVERY_MS", 2_000, minimum=1)
    """How often a worker runs XAUTOCLAIM."""
    max_deliveries: int = env("DEVSCHED_MAX_DELIVERIES", 5, minimum=1)
    """Deliveries before an entry is dead-lettered."""
    max_message_bytes: int = env("DEVSCHED_MAX_MESSAGE_BYTES", 65_536, minimum=256)
    """Larger inbound messages are refused as invalid."""
    metrics_port: int = env("DEVSCHED_METRICS_PORT", 0)
    """Prometheus exporter port of each worker process; 0 = off."""
    event_loop: str = env("DEVSCHED_EVENT_LOOP", "uvloop")
    """`uvloop` or `asyncio`: the event loop of the command's processes."""
    log_format: str = env("DEVSCHED_LOG_FORMAT", "text")
    """`text` (readable, with the record's fields as key=value) or `json` (one object a line)."""
    redis_fsync: str = env("DEVSCHED_REDIS_FSYNC", "everysec", choices=FSYNC_POLICIES)
    """`appendfsync` of the embedded redis-server's append-only file: `always` (every write
    on disk before its reply), `everysec` (at most about a second of writes lost when the
    machine or the server dies) or `no` (the operating system decides, up to ~30 s)."""

    @classmethod
    def from_env(cls) -> Self:
        """Every :func:`env` field of this class (and its bases) from the environment."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            name: str | None = f.metadata.get("env")
            raw = os.environ.get(name) if name else None
            if name is None or raw is None or raw == "":
                continue
            default = f.default
            if default is MISSING and f.default_factory is not MISSING:
                default = f.default_factory()
            values[f.name] = _parse(name, raw, default, f.metadata.get("minimum"),
                                    f.metadata.get("choices", ()))
        return cls(**values)

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Environment variable -> field name, for every declared field."""
        return {f.metadata["env"]: f.name for f in fields(cls) if f.metadata.get("env")}

    def with_urls(self, redis_url: str, database_url: str) -> Self:
        return replace(self, redis_url=redis_url, database_url=database_url)
