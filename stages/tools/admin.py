"""Administrative operations: add devices, set quotas, read live state.

Adding a device and setting a quota go through admin.lua: the Redis state and a
change record on the changes stream in one step, so PostgreSQL receives them
by the same write-behind as allocations. Both are refused (``StateMissing``) when
Redis holds no live state (no state marker, stages/state.py): a device added to a
Redis that lost its state would be free while a user may still hold it. Before
adding devices, `devsched devices add` also asks PostgreSQL
(:func:`held_in_database`): a device an active allocation holds there but not in
Redis (Redis lost the last moments of its writes) is refused, never made free. The readers here (stats, devices, a
user's state, the listings of devices, allocations and pools) only read; the audit is
in ``audit``, the rebuild in ``rebuild``. The strategy in force is set here too (one
HSET the select script reads at its next call).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pipeline.clock import Clock
from pipeline.connections import text
from pipeline.worker import groups_caught_up
from schemas.keys import GROUP_BILL, GROUP_NOTIFY, GROUP_PERSIST, Keys
from schemas.messages import DeviceSpec, QuotaSpec
from schemas.rows import AdminCall, AdminKeys
from stages.scripts import ADMIN
from stages.state import NO_STATE_ERROR, StateMissing

log = logging.getLogger("devsched.admin")


async def _run_admin(redis: Redis, keys: Keys, calls: list[AdminCall]) -> None:
    """admin.lua for each call, in one round trip; StateMissing when Redis has no state."""
    script_keys = AdminKeys(changes=keys.changes, state=keys.state)
    async with redis.pipeline(transaction=False) as pipe:
        for call in calls:
            await ADMIN(pipe, script_keys, call)
        await ADMIN.load(redis)
        try:
            await pipe.execute()
        except ResponseError as exc:
            if NO_STATE_ERROR in str(exc):  # a pipeline wraps the error in its own text
                raise StateMissing(keys, "the change is refused") from exc
            raise


async def add_devices(redis: Redis, keys: Keys, clock: Clock, specs: list[DeviceSpec]) -> None:
    """Add or update each device (a device without a name is named by its id)."""
    await _run_admin(redis, keys, [
        AdminCall(prefix=keys.prefix, now_ms=clock.now_ms(),
                  device=msgspec.structs.replace(d, name=d.name or d.id)) for d in specs])
    for d in specs:
        log.info("device added or updated", extra={"device_id": d.id, "pool": d.pool})


async def set_quotas(redis: Redis, keys: Keys, clock: Clock, quotas: list[QuotaSpec]) -> None:
    await _run_admin(redis, keys, [
        AdminCall(prefix=keys.prefix, now_ms=clock.now_ms(), quota=q) for q in quotas])
    for q in quotas:
        log.info("quota set", extra={"user_id": q.user_id, "status": q.status})


HELD_SQL = """
SELECT device_id, id::text AS allocation_id FROM device_allocations
WHERE status = 'allocated' AND device_id = ANY($1::text[])
"""


async def held_in_database(
    redis: Redis, keys: Keys, pg: asyncpg.Pool, device_ids: list[str],
) -> dict[str, str]:
    """Device id -> allocation id, for each of ``device_ids`` that an active allocation
    holds in PostgreSQL while Redis does not show that allocation on it (Redis lost
    it): adding such a device would make it free while a user holds it."""
    async with pg.acquire() as conn:
        rows = await conn.fetch(HELD_SQL, device_ids)
    lost: dict[str, str] = {}
    for row in rows:
        holder = await redis.hget(keys.device(row["device_id"]), "alloc")
        if holder is None or text(holder) != row["allocation_id"]:
            lost[row["device_id"]] = row["allocation_id"]
    return lost


TABLES = ("device_allocations, devices, user_quotas, billing_ledger, job_info, job_executions,"
          " stats_snapshots, waiting_requests, reservations, usage_reports, tenants,"
          " schedule_state")
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


STRATEGIES = ("resource_based", "least_loaded", "round_robin", "affinity", "bin_pack", "smart")
"""The allocation strategies select.lua knows (see its header); resource_based is the
default."""
DEFAULT_STRATEGY = "resource_based"
GLOBAL = "*"
"""The field of ``Keys.strategy`` that holds the global strategy."""


class UnknownStrategy(ValueError):
    """A strategy name select.lua does not know."""


async def set_strategy(redis: Redis, keys: Keys, name: str, pool: str | None = None) -> None:
    """Put ``name`` in force globally, or for ``pool`` (requests naming that pool); the
    select workers use it from their next batch, without a restart."""
    if name not in STRATEGIES:
        raise UnknownStrategy(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")
    await redis.hset(keys.strategy, pool or GLOBAL, name)
    log.info("strategy set", extra={"strategy": name, "pool": pool or GLOBAL})


@dataclass
class StrategiesInForce:
    """The global strategy and, for each known pool, the one its requests get (its own,
    else the global one); ``pool_overrides`` the pools that have their own."""

    strategy: str
    pools: dict[str, str]
    pool_overrides: dict[str, str]


async def strategies(redis: Redis, keys: Keys) -> StrategiesInForce:
    raw = {text(k): text(v) for k, v in (await redis.hgetall(keys.strategy)).items()}
    current = raw.pop(GLOBAL, DEFAULT_STRATEGY)
    pools = sorted({text(p) for p in await redis.smembers(keys.pools)} | set(raw))
    return StrategiesInForce(strategy=current, pools={p: raw.get(p, current) for p in pools},
                             pool_overrides=raw)


@dataclass
class Stats:
    devices: int
    free: int
    active: int
    allocated_total: int
    released_total: int
    expired_total: int
    strategy: str = DEFAULT_STRATEGY
    """The global strategy in force."""
    pool_strategies: dict[str, str] = field(default_factory=dict)
    """Pools with a strategy of their own."""
    breakers: dict[str, str] = field(default_factory=dict)
    """The circuit breaker of each HTTP sink that has sent (export, accounts, webhook):
    closed, open or half_open, as its process last published it."""


async def stats(redis: Redis, keys: Keys) -> Stats:
    pools = [text(p) for p in await redis.smembers(keys.pools)]
    free = 0
    for pool in pools:
        free += int(await redis.zcard(keys.free(pool)))
    counters = {text(k): int(v) for k, v in (await redis.hgetall(keys.stats)).items()}
    in_force = await strategies(redis, keys)
    return Stats(
        devices=int(await redis.scard(keys.devices)),
        free=free,
        active=int(await redis.zcard(keys.expiry)),
        allocated_total=counters.get("allocated", 0),
        released_total=counters.get("released", 0),
        expired_total=counters.get("expired", 0),
        strategy=in_force.strategy,
        pool_strategies=in_force.pool_overrides,
        breakers={text(k): text(v) for k, v in (await redis.hgetall(keys.sink_states)).items()},
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


# --- listings ---------------------------------------------------------------------------

LIST_SCAN_FACTOR = 10
"""A page of a filtered listing reads at most this many times its limit of devices (at
least LIST_SCAN_MIN): a selective filter gives short pages, never a read of the farm."""
LIST_SCAN_MIN = 500
LIST_READ_CHUNK = 200
"""Keys read per pipelined round trip."""


@dataclass
class DeviceRow:
    """A device as listed: its hash with numbers as numbers; ``allocation_id`` the
    active allocation holding it (None when free or down)."""

    id: str
    name: str
    pool: str
    model: str
    host: str
    adb_host: str
    adb_port: int
    cpu_cores: int
    memory_mb: int
    storage_mb: int
    status: str
    allocation_id: str | None
    version: int


@dataclass
class DevicePage:
    devices: list[DeviceRow]
    next_cursor: str | None
    """Pass it as ``cursor`` for the next page; None: the listing is complete."""


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _device_row(device_id: str, d: dict[str, str]) -> DeviceRow:
    return DeviceRow(
        id=device_id, name=d.get("name", device_id), pool=d.get("pool", ""),
        model=d.get("model", ""), host=d.get("host", ""), adb_host=d.get("adb_host", ""),
        adb_port=_int(d.get("adb_port")), cpu_cores=_int(d.get("cpu_cores")),
        memory_mb=_int(d.get("memory_mb")), storage_mb=_int(d.get("storage_mb")),
        status=d.get("status", ""), allocation_id=d.get("alloc") or None,
        version=_int(d.get("version")))


async def _hgetall_chunk(redis: Redis, names: list[str]) -> list[dict[str, str]]:
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(name)
        return [{text(k): text(v) for k, v in raw.items()} for raw in await pipe.execute()]


async def _device_index(redis: Redis, keys: Keys) -> None:
    """Fill the sorted index of device ids from the devices set when it is empty and the
    set is not (state written before the index existed); the scripts keep it after."""
    if int(await redis.zcard(keys.device_ids)) or not int(await redis.scard(keys.devices)):
        return
    ids = [text(m) for m in await redis.smembers(keys.devices)]
    for i in range(0, len(ids), 1000):
        await redis.zadd(keys.device_ids, dict.fromkeys(ids[i:i + 1000], 0))


async def list_devices(
    redis: Redis, keys: Keys, *, pool: str | None = None, status: str | None = None,
    model: str | None = None, min_cpu: int = 0, min_memory: int = 0,
    cursor: str | None = None, limit: int = 50,
) -> DevicePage:
    """One page of the devices listed (not deleted), in id order, filtered.

    The cursor is the last device id the previous page examined; the page goes on
    from the next id (ZRANGEBYLEX over ``Keys.device_ids``), so a page reads only the
    devices it examines: never more than ``max(LIST_SCAN_FACTOR * limit,
    LIST_SCAN_MIN)``. A device present through the whole listing is listed exactly once
    however the others change meanwhile (added, deleted, allocated); one added behind
    the cursor is not listed. A filtered page may hold fewer than ``limit`` devices (even
    none) while more follow: the listing ends when ``next_cursor`` is None."""
    await _device_index(redis, keys)
    budget = max(LIST_SCAN_FACTOR * limit, LIST_SCAN_MIN)
    found: list[DeviceRow] = []
    last = cursor
    while len(found) < limit and budget > 0:
        want = min(LIST_READ_CHUNK, budget)
        ids = [text(m) for m in await redis.zrangebylex(
            keys.device_ids, "(" + last if last else "-", "+", start=0, num=want)]
        if not ids:
            return DevicePage(found, None)
        budget -= len(ids)
        for device_id, d in zip(ids, await _hgetall_chunk(
                redis, [keys.device(i) for i in ids])):
            last = device_id
            if not d or d.get("status") == "deleted":
                continue
            row = _device_row(device_id, d)
            if ((pool and row.pool != pool) or (status and row.status != status)
                    or (model and row.model != model) or row.cpu_cores < min_cpu
                    or row.memory_mb < min_memory):
                continue
            found.append(row)
            if len(found) == limit:
                break
    more = await redis.zrangebylex(keys.device_ids, "(" + last if last else "-", "+",
                                   start=0, num=1)
    return DevicePage(found, last if more else None)


@dataclass
class AllocationRow:
    """An allocation as listed; ``source`` says where it was read: ``redis`` (the live
    state: the active ones) or ``postgresql`` (the history)."""

    allocation_id: str
    device_id: str
    user_id: str
    tenant_id: str | None
    status: str
    allocated_at_ms: int
    expires_at_ms: int
    released_at_ms: int | None
    duration_seconds: int | None
    cpu_cores: int
    memory_mb: int
    storage_mb: int
    pool: str
    end_reason: str | None
    source: str


@dataclass
class AllocationPage:
    allocations: list[AllocationRow]
    next_cursor: str | None
    """Pass it as ``cursor`` for the next page; None: the listing is complete."""
    source: str
    """``redis`` or ``postgresql``."""


def _allocation_from_redis(aid: str, a: dict[str, str]) -> AllocationRow:
    return AllocationRow(
        allocation_id=aid, device_id=a.get("device_id", ""), user_id=a.get("user_id", ""),
        tenant_id=a.get("tenant_id") or None, status=a.get("status", ""),
        allocated_at_ms=_int(a.get("allocated_at_ms")),
        expires_at_ms=_int(a.get("expires_at_ms")),
        released_at_ms=_int(a["released_at_ms"]) if a.get("released_at_ms") else None,
        duration_seconds=_int(a["duration_seconds"]) if a.get("duration_seconds") else None,
        cpu_cores=_int(a.get("cpu_cores")), memory_mb=_int(a.get("memory_mb")),
        storage_mb=_int(a.get("storage_mb")), pool=a.get("pool", ""),
        end_reason=a.get("end_reason") or None, source="redis")


ACTIVE = "allocated"
"""The status of an active allocation: listed from Redis; other statuses (``released``,
``expired``, ``all``) from PostgreSQL."""


def _ms(column: str) -> str:
    return f"round(extract(epoch FROM {column}) * 1000)::bigint"


HISTORY_SQL = f"""
SELECT id::text AS id, device_id, user_id, tenant_id, status,
       {_ms("allocated_at")} AS allocated_at_ms, {_ms("expires_at")} AS expires_at_ms,
       {_ms("released_at")} AS released_at_ms, duration_seconds, end_reason,
       (metadata->>'cpu_cores')::int AS cpu_cores, (metadata->>'memory_mb')::int AS memory_mb,
       (metadata->>'storage_mb')::int AS storage_mb, metadata->>'pool' AS pool
FROM device_allocations
WHERE ($1::text IS NULL OR user_id = $1) AND ($2::text IS NULL OR status = $2)
  AND ($3::bigint IS NULL OR (allocated_at, id) < (to_timestamp($3 / 1000.0), $4::uuid))
ORDER BY allocated_at DESC, id DESC
LIMIT $5
"""
"""One page of the history, newest first, after the cursor (allocated-at, id)."""


async def _active_page(redis: Redis, keys: Keys, user: str | None, cursor: str | None,
                       limit: int) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
    """Active allocations from Redis: a user's in id order (the allocation ids of the
    user's hash; cursor: the last id), else all by expires-at then id (the expiry
    schedule; cursor: ``<expires_at_ms>:<id>``)."""
    if user is not None:
        state = await user_state(redis, keys, user)
        ids = sorted(a for a in state.allocations if cursor is None or a > cursor)
        page = ids[:limit]
        rows = await _hgetall_chunk(redis, [keys.allocation(a) for a in page]) if page else []
        return list(zip(page, rows)), page[-1] if len(ids) > limit else None
    members: list[tuple[str, int]] = []
    if cursor:
        at_text, _, after = cursor.partition(":")
        at = int(at_text)
        # the same expires-at as the cursor (allocations of one batch share it), ids after it
        same = await redis.zrangebyscore(keys.expiry, at, at)
        members = [(text(m), at) for m in same if text(m) > after]
        lower = f"({at}"
    else:
        lower = "-inf"
    if len(members) <= limit:
        more: list[tuple[bytes, float]] = await redis.zrangebyscore(  # type: ignore[assignment]
            keys.expiry, lower, "+inf", start=0, num=limit + 1 - len(members), withscores=True)
        members += [(text(m), int(s)) for m, s in more]
    taken = members[:limit]
    rows = await _hgetall_chunk(redis, [keys.allocation(a) for a, _ in taken]) if taken else []
    following = f"{taken[-1][1]}:{taken[-1][0]}" if len(members) > limit else None
    return [(aid, row) for (aid, _), row in zip(taken, rows)], following


async def list_allocations(
    redis: Redis, keys: Keys, pg: asyncpg.Pool | None = None, *, user: str | None = None,
    status: str = ACTIVE, cursor: str | None = None, limit: int = 50,
) -> AllocationPage:
    """One page of allocations. ``status`` ``allocated`` (the default): the active ones,
    from Redis (the live state; a user's in id order, all of them by expires-at then id).
    ``released``, ``expired`` or ``all``: the history, from PostgreSQL (what the
    write-behind has copied, newest first by allocated-at then id; needs ``pg``). The
    cursor is opaque: pass ``next_cursor`` back; each allocation is listed once per
    listing (keyset pagination, no offsets)."""
    if status == ACTIVE:
        found, following = await _active_page(redis, keys, user, cursor, limit)
        rows = [_allocation_from_redis(aid, a) for aid, a in found if a]
        return AllocationPage(rows, following, "redis")
    if pg is None:
        raise ValueError("the history of allocations is read from PostgreSQL: pass pg")
    at: int | None = None
    after: str | None = None
    if cursor:
        at_text, _, after = cursor.partition(":")
        at = int(at_text)
    async with pg.acquire() as conn:
        records = await conn.fetch(HISTORY_SQL, user, None if status == "all" else status, at,
                                   after, limit + 1)
    rows = [AllocationRow(
        allocation_id=r["id"], device_id=r["device_id"], user_id=r["user_id"],
        tenant_id=r["tenant_id"], status=r["status"], allocated_at_ms=r["allocated_at_ms"],
        expires_at_ms=r["expires_at_ms"], released_at_ms=r["released_at_ms"],
        duration_seconds=r["duration_seconds"], cpu_cores=r["cpu_cores"] or 0,
        memory_mb=r["memory_mb"] or 0, storage_mb=r["storage_mb"] or 0, pool=r["pool"] or "",
        end_reason=r["end_reason"], source="postgresql") for r in records[:limit]]
    following = (f"{rows[-1].allocated_at_ms}:{rows[-1].allocation_id}"
                 if len(records) > limit else None)
    return AllocationPage(rows, following, "postgresql")


DOWN_STATUSES = ("failed", "stopped", "error")


@dataclass
class PoolUse:
    """A pool's devices by status and the share of them allocated."""

    pool: str
    devices: int
    free: int
    allocated: int
    maintenance: int
    down: int
    """failed, stopped or error."""
    share_used: float
    """allocated / devices (0 for an empty pool), rounded to 4 places."""
    strategy: str


async def pools(redis: Redis, keys: Keys) -> list[PoolUse]:
    """Utilisation per pool, from the live state: every listed device's pool and status
    (one read of two fields per device, pipelined), the free count from the pool's free
    set, and the strategy in force there."""
    await _device_index(redis, keys)
    counts: dict[str, Counter[str]] = {}
    last: str | None = None
    while True:
        ids = [text(m) for m in await redis.zrangebylex(
            keys.device_ids, "(" + last if last else "-", "+", start=0, num=LIST_READ_CHUNK)]
        if not ids:
            break
        last = ids[-1]
        async with redis.pipeline(transaction=False) as pipe:
            for device_id in ids:
                pipe.hmget(keys.device(device_id), "pool", "status")
            for pool_name, status in await pipe.execute():
                if pool_name is not None and text(status) != "deleted":
                    counts.setdefault(text(pool_name), Counter())[text(status)] += 1
    in_force = await strategies(redis, keys)
    names = sorted(set(counts) | {text(p) for p in await redis.smembers(keys.pools)})
    out = []
    for name in names:
        c = counts.get(name, Counter())
        total = sum(c.values())
        out.append(PoolUse(
            pool=name, devices=total, free=int(await redis.zcard(keys.free(name))),
            allocated=c["allocated"], maintenance=c["maintenance"],
            down=sum(c[s] for s in DOWN_STATUSES),
            share_used=round(c["allocated"] / total, 4) if total else 0.0,
            strategy=in_force.pools.get(name, in_force.strategy)))
    return out


# --- the wait queue ---------------------------------------------------------------------

QUEUE_LIST_MAX = 1000
"""Most waiters ``devsched queue`` reads (the head of the queue)."""


@dataclass
class Waiter:
    """One allocate request waiting in the queue (``wait_seconds``), in serving order."""

    position: int
    """1: the first a freed device it fits goes to."""
    request_id: str
    user_id: str
    pool: str | None
    model: str | None
    min_cpu_cores: int
    min_memory_mb: int
    priority: int
    queued_at_ms: int
    waited_ms: int
    """How long it has waited so far."""
    wait_until_ms: int
    """When it times out."""


class _WaiterRecord(msgspec.Struct):
    """The fields of a waiter's record (select.lua writes it) that a listing shows."""

    request_id: str
    user_id: str
    min_cpu_cores: int
    min_memory_mb: int
    priority: int
    queued_at_ms: int
    wait_until_ms: int
    pool: str | bool = False
    model: str | bool = False


async def queue(redis: Redis, keys: Keys, clock: Clock, pool: str | None = None,
                limit: int = QUEUE_LIST_MAX) -> list[Waiter]:
    """The waiters in serving order (the first ``limit`` of the queue; ``pool``: only
    those asking for that pool), with their position in the whole queue."""
    members = [text(m) for m in await redis.zrange(keys.queue, 0, limit - 1)]
    if not members:
        return []
    raws = await redis.hmget(keys.waiters, members)
    now = clock.now_ms()
    out = []
    decoder = msgspec.json.Decoder(_WaiterRecord)
    for position, raw in enumerate(raws, start=1):
        if raw is None:
            continue
        w = decoder.decode(raw)
        w_pool = w.pool if isinstance(w.pool, str) else None
        if pool is not None and w_pool != pool:
            continue
        out.append(Waiter(
            position=position, request_id=w.request_id, user_id=w.user_id, pool=w_pool,
            model=w.model if isinstance(w.model, str) else None,
            min_cpu_cores=w.min_cpu_cores, min_memory_mb=w.min_memory_mb, priority=w.priority,
            queued_at_ms=w.queued_at_ms, waited_ms=max(0, now - w.queued_at_ms),
            wait_until_ms=w.wait_until_ms))
    return out
