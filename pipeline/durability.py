"""What the runtime demands of the Redis that holds the live state, checked at start.

Redis here is the state itself, not a cache in front of it, so two of its settings
decide whether state can be lost without anyone noticing:

- ``maxmemory-policy`` must be ``noeviction``. Any other policy lets a full Redis
  delete keys to make room: a record, a schedule entry or a stored answer would
  vanish with no error and no trace, and every later decision would rest on the
  hole. With ``noeviction`` a full Redis refuses writes instead, which the workers
  see as errors and retry. :func:`check_redis` refuses any other policy with
  :class:`UnsafeRedisError`, whose message names the setting, its value and the
  fix; every worker process checks before it serves, and so does every command
  that touches Redis.
- Persistence: a server that keeps nothing on disk (``appendonly no`` and no
  ``save`` points) loses everything when it restarts, and one with snapshots only
  loses what changed since the last snapshot. Both are allowed (a scratch test
  server) but logged as a warning; the embedded server always runs with an
  append-only file.

The check reads ``INFO`` (answered even where ``CONFIG`` is disabled, as on managed
services) and ``CONFIG GET save`` where it is allowed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pipeline.connections import redis_client
from pipeline.settings import RuntimeSettings

log = logging.getLogger("devsched.durability")

REQUIRED_POLICY = "noeviction"
"""The only ``maxmemory-policy`` under which Redis never drops a key by itself."""
EX_CONFIG = 78
"""Exit status of a process that refuses its configuration (sysexits' EX_CONFIG): the
supervisor does not restart such a worker, as it would only refuse again."""


class UnsafeRedisError(RuntimeError):
    """The Redis server is configured so that it could lose state silently."""

    def __init__(self, setting: str, value: str, wanted: str, why: str) -> None:
        self.setting = setting
        self.value = value
        self.wanted = wanted
        super().__init__(
            f"refusing this Redis: {setting} is {value!r}, must be {wanted!r} ({why}). "
            f"Fix: `CONFIG SET {setting} {wanted}` and `CONFIG REWRITE`, or "
            f"`{setting} {wanted}` in redis.conf (on a managed service: its parameter "
            f"group / configuration), then start again."
        )


@dataclass(frozen=True)
class RedisDurability:
    """What a server says about how it keeps data."""

    maxmemory_policy: str
    append_only: bool
    """An append-only file is written (every write logged; synced per ``appendfsync``)."""
    snapshots: bool | None
    """RDB ``save`` points are set; None when ``CONFIG`` is not allowed to say."""

    @property
    def persistent(self) -> bool:
        return self.append_only or bool(self.snapshots)


async def inspect_redis(redis: Redis) -> RedisDurability:
    """How the server behind ``redis`` keeps data (reads only)."""
    memory = await redis.info("memory")
    persistence = await redis.info("persistence")
    try:
        save = (await redis.config_get("save")).get("save", "")
        snapshots: bool | None = bool(str(save).strip())
    except ResponseError:  # CONFIG renamed or disabled
        snapshots = None
    return RedisDurability(
        maxmemory_policy=str(memory.get("maxmemory_policy", REQUIRED_POLICY)),
        append_only=int(persistence.get("aof_enabled", 0)) == 1,
        snapshots=snapshots,
    )


async def check_redis(redis: Redis) -> RedisDurability:
    """Refuse a server that may evict keys; warn about one that keeps nothing on disk."""
    found = await inspect_redis(redis)
    if found.maxmemory_policy != REQUIRED_POLICY:
        raise UnsafeRedisError(
            "maxmemory-policy", found.maxmemory_policy, REQUIRED_POLICY,
            "any other policy lets a full Redis delete live state without an error")
    if not found.append_only:
        if found.snapshots:
            log.warning("Redis writes snapshots only (appendonly no): a crash loses every "
                        "change since the last snapshot; set appendonly yes")
        elif found.snapshots is None:
            log.warning("Redis has no append-only file (appendonly no) and its snapshot "
                        "settings cannot be read: a restart may lose the live state; set "
                        "appendonly yes")
        else:
            log.warning("Redis keeps nothing on disk (appendonly no, no save points): a "
                        "restart loses the live state; set appendonly yes")
    return found


async def check_redis_of(settings: RuntimeSettings) -> RedisDurability:
    """:func:`check_redis` on the settings' Redis, through a connection of its own."""
    redis = redis_client(settings, max_connections=1)
    try:
        return await check_redis(redis)
    finally:
        await redis.aclose()
