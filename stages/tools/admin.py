"""Administrative operations: add devices, set quotas, read live state.

Adding a device and setting a quota go through admin.lua: the Redis state and a
change record on the changes stream in one step, so PostgreSQL receives them
by the same write-behind as allocations. The readers here (stats, devices, a
user's state) only read; the audit is in ``audit``, the rebuild in ``rebuild``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from pipeline.clock import Clock
from pipeline.connections import text
from pipeline.worker import groups_caught_up
from schemas.keys import GROUP_BILL, GROUP_NOTIFY, GROUP_PERSIST, Keys
from schemas.messages import DeviceSpec, QuotaSpec
from schemas.rows import AdminCall, AdminKeys
from stages.scripts import ADMIN

log = logging.getLogger("devsched.admin")


async def add_devices(redis: Redis, keys: Keys, clock: Clock, specs: list[DeviceSpec]) -> None:
    """Add or update each device (a device without a name is named by its id)."""
    script_keys = AdminKeys(changes=keys.changes)
    async with redis.pipeline(transaction=False) as pipe:
        for d in specs:
            named = msgspec.structs.replace(d, name=d.name or d.id)
            await ADMIN(pipe, script_keys, AdminCall(prefix=keys.prefix, now_ms=clock.now_ms(),
                                                     device=named))
        await ADMIN.load(redis)
        await pipe.execute()
    for d in specs:
        log.info("device added or updated", extra={"device_id": d.id, "pool": d.pool})


async def set_quotas(redis: Redis, keys: Keys, clock: Clock, quotas: list[QuotaSpec]) -> None:
    script_keys = AdminKeys(changes=keys.changes)
    async with redis.pipeline(transaction=False) as pipe:
        for q in quotas:
            await ADMIN(pipe, script_keys, AdminCall(prefix=keys.prefix, now_ms=clock.now_ms(),
                                                     quota=q))
        await ADMIN.load(redis)
        await pipe.execute()
    for q in quotas:
        log.info("quota set", extra={"user_id": q.user_id, "status": q.status})


TABLES = ("device_allocations, devices, user_quotas, billing_ledger, job_info, job_executions,"
          " stats_snapshots")
"""Every table the write-behind and the tracked jobs fill."""


async def write_behind_drained(redis: Redis, keys: Keys) -> bool:
    """Every change so far is in PostgreSQL, the ledger and the notifications stream."""
    return await groups_caught_up(redis, keys.changes, (GROUP_PERSIST, GROUP_BILL, GROUP_NOTIFY))


async def delete_keys(redis: Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (streams included); returns how many. UNLINK:
    large streams are freed in the background, not while other clients wait."""
    found = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
    for i in range(0, len(found), 500):
        await redis.unlink(*found[i:i + 500])
    return len(found)


async def empty_tables(pg: asyncpg.Pool) -> None:
    async with pg.acquire() as conn:
        await conn.execute(f"TRUNCATE {TABLES}")


@dataclass
class Stats:
    devices: int
    free: int
    active: int
    allocated_total: int
    released_total: int
    expired_total: int
    strategy: str = "resource_based"


async def stats(redis: Redis, keys: Keys) -> Stats:
    pools = [text(p) for p in await redis.smembers(keys.pools)]
    free = 0
    for pool in pools:
        free += int(await redis.zcard(keys.free(pool)))
    counters = {text(k): int(v) for k, v in (await redis.hgetall(keys.stats)).items()}
    return Stats(
        devices=int(await redis.scard(keys.devices)),
        free=free,
        active=int(await redis.zcard(keys.expiry)),
        allocated_total=counters.get("allocated", 0),
        released_total=counters.get("released", 0),
        expired_total=counters.get("expired", 0),
    )


@dataclass
class UserState:
    """A user's hash (``Keys.user``), read apart: the quota fields, the usage, the holds
    of requests in flight (request id -> "cpu mem sto") and the active allocations
    (allocation id -> "cpu mem sto")."""

    quota: dict[str, str]
    usage: dict[str, int]
    holds: dict[str, str]
    allocations: dict[str, str]


USAGE_FIELDS = {"used_devices": "devices", "used_cpu": "cpu", "used_mem": "mem", "used_sto": "sto"}


async def user_state(redis: Redis, keys: Keys, user_id: str) -> UserState:
    return parse_user_state(await redis.hgetall(keys.user(user_id)))


def parse_user_state(raw: Mapping[Any, Any]) -> UserState:
    """A user's hash as HGETALL returns it, read apart."""
    state = UserState({}, {name: 0 for name in USAGE_FIELDS.values()}, {}, {})
    for raw_field, raw_value in raw.items():
        field, value = text(raw_field), text(raw_value)
        kind, _, rest = field.partition(":")
        if kind == "hold" and rest:
            state.holds[rest] = value
        elif kind == "alloc" and rest:
            state.allocations[rest] = value
        elif field in USAGE_FIELDS:
            state.usage[USAGE_FIELDS[field]] = int(value)
        else:
            state.quota[field] = value
    return state


async def list_devices(
    redis: Redis, keys: Keys, *, pool: str | None = None, status: str | None = None,
    offset: int = 0, limit: int = 50,
) -> list[dict[str, str]]:
    ids = sorted(text(m) for m in await redis.smembers(keys.devices))
    out: list[dict[str, str]] = []
    for device_id in ids:
        raw = await redis.hgetall(keys.device(device_id))
        d = {text(k): text(v) for k, v in raw.items()}
        if pool and d.get("pool") != pool:
            continue
        if status and d.get("status") != status:
            continue
        out.append(d)
    return out[offset: offset + limit]
