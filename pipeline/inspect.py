"""What the streams, their consumer groups and the Redis server look like right now.

Read-only, for an operator's status view: per stream its length and the age of its
oldest entry; per consumer group its lag (entries not yet delivered), pending count,
the age of its oldest pending entry and of its oldest entry not yet acked (pending or
not yet delivered: how far behind the group is, in time), its consumers and how long
each has been idle; the Redis server's version and persistence settings. Ages come
from entry ids (an id starts with the ms Redis added the entry at) against ``now_ms``.

Lag is Redis's own (``XINFO GROUPS``, 7.0+) when it has one; otherwise (6.2, or a
stream whose deletions keep Redis from knowing) it is counted by reading ids past the
group's last delivered one, at most ``LAG_COUNT_MAX`` (then reported as that much, a
floor). Each call costs a few commands per stream and group, never a scan of keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pipeline.connections import text

LAG_COUNT_MAX = 10_000
"""Most entries counted by hand for a group's lag when Redis does not report it."""


def id_ms(entry_id: object) -> int:
    """The ms part of a stream entry id."""
    return int(text(entry_id).partition("-")[0])


def age_s(now_ms: int, entry_id: object | None) -> float | None:
    """How long ago (s) the entry ``entry_id`` was added; None without one."""
    if entry_id is None:
        return None
    return round(max(0, now_ms - id_ms(entry_id)) / 1000, 3)


@dataclass
class ConsumerState:
    name: str
    pending: int
    idle_s: float
    """Since its last read or claim."""


@dataclass
class GroupState:
    name: str
    lag: int
    """Entries not yet delivered to the group."""
    pending: int
    """Delivered, not yet acked."""
    oldest_pending_age_s: float | None
    backlog: int
    """lag + pending: entries the group has not finished."""
    behind_s: float
    """Age of the oldest entry the group has not acked (0 when it has none)."""
    last_delivered_id: str
    consumers: list[ConsumerState] = field(default_factory=list)


@dataclass
class StreamState:
    name: str
    exists: bool
    length: int = 0
    oldest_age_s: float | None = None
    newest_age_s: float | None = None
    groups: list[GroupState] = field(default_factory=list)


async def _lag(redis: Redis, stream: str, group: dict[Any, Any]) -> int:
    reported = group.get("lag")
    if reported is not None:
        return int(reported)
    last = text(group["last-delivered-id"])
    after: Any = await redis.xrange(stream, f"({last}", "+", count=LAG_COUNT_MAX)
    return len(after)


async def group_state(redis: Redis, stream: str, group: dict[Any, Any], now_ms: int
                      ) -> GroupState:
    name = text(group["name"])
    last = text(group["last-delivered-id"])
    lag = await _lag(redis, stream, group)
    summary = await redis.xpending(stream, name)
    pending = int(summary.get("pending") or 0)
    oldest_pending = summary.get("min") if pending else None
    oldest_unacked: object | None = oldest_pending
    if lag:
        first_new = await redis.xrange(stream, f"({last}", "+", count=1)
        if first_new and (oldest_unacked is None or id_ms(first_new[0][0]) < id_ms(oldest_unacked)):
            oldest_unacked = first_new[0][0]
    consumers = [
        ConsumerState(text(c["name"]), int(c["pending"]), round(int(c["idle"]) / 1000, 3))
        for c in await redis.xinfo_consumers(stream, name)
    ]
    return GroupState(
        name=name, lag=lag, pending=pending,
        oldest_pending_age_s=age_s(now_ms, oldest_pending), backlog=lag + pending,
        behind_s=age_s(now_ms, oldest_unacked) or 0.0, last_delivered_id=last,
        consumers=consumers,
    )


async def stream_state(redis: Redis, stream: str, now_ms: int) -> StreamState:
    """One stream and each of its consumer groups."""
    if not await redis.exists(stream):
        return StreamState(stream, exists=False)
    length = int(await redis.xlen(stream))
    first = await redis.xrange(stream, count=1)
    last = await redis.xrevrange(stream, count=1)
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        groups = []
    return StreamState(
        name=stream, exists=True, length=length,
        oldest_age_s=age_s(now_ms, first[0][0]) if first else None,
        newest_age_s=age_s(now_ms, last[0][0]) if last else None,
        groups=[await group_state(redis, stream, g, now_ms) for g in groups],
    )


async def streams_state(redis: Redis, streams: Sequence[str], now_ms: int) -> list[StreamState]:
    return [await stream_state(redis, s, now_ms) for s in streams]


REDIS_PERSISTENCE = ("appendonly", "appendfsync", "save", "maxmemory-policy", "maxmemory")
"""The server settings that decide what a crash loses and whether keys may be evicted."""


async def redis_server(redis: Redis) -> dict[str, Any]:
    """The Redis server's version, role, memory and persistence settings (a server that
    refuses CONFIG, as managed ones may, shows ``config: unavailable``)."""
    info = await redis.info("server")
    memory = await redis.info("memory")
    persistence = await redis.info("persistence")
    out: dict[str, Any] = {
        "version": info.get("redis_version"),
        "uptime_s": info.get("uptime_in_seconds"),
        "used_memory": memory.get("used_memory"),
        "aof_enabled": bool(persistence.get("aof_enabled")),
        "aof_last_write_status": persistence.get("aof_last_write_status"),
        "rdb_last_save_time": persistence.get("rdb_last_save_time"),
    }
    try:
        for name in REDIS_PERSISTENCE:
            got = await redis.config_get(name)
            out[name] = text(got.get(name)) if got.get(name) is not None else None
    except ResponseError:
        out["config"] = "unavailable"
    return out
