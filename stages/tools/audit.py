"""`devsched audit`: compare the live state in Redis with PostgreSQL, entity by entity.

What is compared (each difference names its kind, the entity, the field and both
values):

- ``device``: present on both sides; pool, size (CPU, memory, storage) and version;
  the status Redis shows against the one PostgreSQL implies (``allocated`` when an
  active allocation is on the device, else the ``devices`` row's); the allocation
  holding it; within Redis, that it is in its pool's free set exactly when it is
  available; on either side, that no two active allocations share it.
- ``host``: within Redis, each host's count of active allocations (kept by the
  scripts for the least_loaded and bin_pack strategies) against the devices of that
  host an allocation holds.
- ``quota``: present on both sides; every field and the version.
- ``usage``: each user's usage in Redis against the sum of the user's active
  allocations in PostgreSQL (plus the one device slot each request in flight between
  quota and select holds), and the user's allocation entries against those
  allocations.
- ``allocation``: every allocation Redis holds against its row (device, user,
  status, expires-at, version, and the billed duration of a closed one); every
  active row against Redis; the expiry schedule (members and times) against the
  active rows.
- ``reservation``: every reservation booked or active on either side (Redis's
  ``rsv:<id>`` hashes, PostgreSQL's ``reservations`` rows) present on both, with its
  status, device, user, interval, allocation and version; in Redis, each one in its
  device's bookings.
- ``tenant``: the tenant registry of the global schedules (``{sched}``) against the
  active ``tenants`` rows: present, plan, the override in force (interval and until);
  ``schedule``: a schedule paused in Redis exactly when ``schedule_state`` says so.

Changes still on their way are not differences: the write-behind is behind Redis by
design. Every entity touched by a change that persist had not committed when the
audit read PostgreSQL, or made while the audit read Redis, is left out of the
comparison and counted in ``in_flight`` (the allocation, its device and its user;
a device; a quota's user). The order of the reads makes this exact: the newest
change id is noted first, then Redis is read, then the persist group's position,
then PostgreSQL, then every change from the earlier of the two on. So an audit
under load reports only real differences; once the write-behind drained nothing is
in flight. (A change that is made, persisted by every group and trimmed away
between those reads could still show as a difference; trimming runs every few
seconds and removes only whole old blocks, and a second audit tells.)
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pipeline.connections import text
from schemas.keys import GROUP_PERSIST, Keys
from schemas.messages import (
    AllocationChange,
    AllocationReplaced,
    DeviceUpserted,
    QuotaSet,
    ReservationChange,
    ScheduleChange,
    TenantChange,
    change_decoder,
)
from stages.tools.admin import USAGE_FIELDS, parse_user_state

READ_CHUNK = 500
"""Keys read per pipelined round trip."""
LISTED = 100
"""Differences listed in the report (all are counted)."""
QUOTA_FIELDS = ("status", "expires_at_ms", "max_devices", "max_cpu_per_device",
                "max_memory_mb_per_device", "total_cpu_cores", "total_memory_gb",
                "total_storage_gb", "version")
DEVICE_FIELDS = ("pool", "cpu_cores", "memory_mb", "storage_mb", "version")

Entity = tuple[str, str]
"""("device" | "user" | "allocation", id)."""


@dataclass(frozen=True)
class Difference:
    kind: str
    id: str
    field: str
    redis: Any
    pg: Any


@dataclass
class _RedisState:
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    free: dict[str, set[str]] = field(default_factory=dict)
    """pool -> device ids in its free set."""
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    allocations: dict[str, dict[str, str]] = field(default_factory=dict)
    schedule: dict[str, int] = field(default_factory=dict)
    host_active: dict[str, int] = field(default_factory=dict)
    """host -> active allocations, as the scripts count them (``Keys.host_active``)."""
    reservations: dict[str, dict[str, str]] = field(default_factory=dict)
    """Every reservation hash Redis holds (live ones, and ended ones until they expire)."""
    booked: dict[str, set[str]] = field(default_factory=dict)
    """device -> the reservations in its bookings."""
    tenants: dict[str, dict[str, str]] = field(default_factory=dict)
    """Registered tenants: their ``tenant:<id>`` hash (plan, override)."""
    paused: set[str] = field(default_factory=set)
    """Schedules paused in Redis."""


@dataclass
class _PgState:
    devices: dict[str, asyncpg.Record] = field(default_factory=dict)
    quotas: dict[str, asyncpg.Record] = field(default_factory=dict)
    allocations: dict[str, asyncpg.Record] = field(default_factory=dict)
    """The active rows and the rows of the allocations Redis holds."""
    total: int = 0
    active: int = 0
    reservations: dict[str, asyncpg.Record] = field(default_factory=dict)
    """The booked or active rows and the rows of the reservations Redis holds."""
    tenants: dict[str, asyncpg.Record] = field(default_factory=dict)
    """The active tenants."""
    paused: set[str] = field(default_factory=set)


def _ms(column: str) -> str:
    return f"round(extract(epoch FROM {column}) * 1000)::bigint"


PG_DEVICES = "SELECT id, pool, cpu_cores, memory_mb, storage_mb, status, version FROM devices"
PG_QUOTAS = f"""
SELECT user_id, status, {_ms("expires_at")} AS expires_at_ms, max_devices, max_cpu_per_device,
       max_memory_mb_per_device, total_cpu_cores, total_memory_gb, total_storage_gb, version
FROM user_quotas
"""
PG_ALLOCATIONS = f"""
SELECT id::text AS id, device_id, user_id, status, {_ms("expires_at")} AS expires_at_ms,
       duration_seconds, version, (metadata->>'cpu_cores')::int AS cpu_cores,
       (metadata->>'memory_mb')::int AS memory_mb, (metadata->>'storage_mb')::int AS storage_mb
FROM device_allocations WHERE status = 'allocated' OR id = ANY($1::uuid[])
"""
PG_RESERVATIONS = f"""
SELECT id::text AS id, device_id, user_id, status, {_ms("start_at")} AS start_ms,
       {_ms("end_at")} AS end_ms, allocation_id::text AS allocation_id, version
FROM reservations WHERE status IN ('booked', 'active') OR id = ANY($1::uuid[])
"""
PG_TENANTS = f"""
SELECT tenant_id, plan, override_ms, {_ms("override_until")} AS override_until_ms
FROM tenants WHERE status = 'active'
"""
PG_PAUSED = "SELECT schedule_id FROM schedule_state WHERE paused"
RESERVATION_FIELDS = ("status", "device_id", "user_id", "start_ms", "end_ms", "allocation_id",
                      "version")
LIVE_RESERVATION = ("booked", "active")
PG_COUNTS = """
SELECT count(*) AS total, count(*) FILTER (WHERE status = 'allocated') AS active
FROM device_allocations
"""


async def _hgetall_many(redis: Redis, names: list[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for i in range(0, len(names), READ_CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for name in names[i:i + READ_CHUNK]:
                pipe.hgetall(name)
            for raw in await pipe.execute():
                out.append({text(k): text(v) for k, v in raw.items()})
    return out


async def _read_redis(redis: Redis, keys: Keys) -> _RedisState:
    state = _RedisState()
    device_ids = sorted(text(m) for m in await redis.smembers(keys.devices))
    for device_id, fields in zip(device_ids, await _hgetall_many(
            redis, [keys.device(d) for d in device_ids])):
        state.devices[device_id] = fields
    pools = {text(p) for p in await redis.smembers(keys.pools)}
    pools |= {d.get("pool", "") for d in state.devices.values()} - {""}
    for pool in sorted(pools):
        state.free[pool] = {text(m) for m in await redis.zrange(keys.free(pool), 0, -1)}
    alloc_keys = [text(k) async for k in redis.scan_iter(match=keys.allocation("*"), count=1000)]
    for key, fields in zip(alloc_keys, await _hgetall_many(redis, alloc_keys)):
        if fields:  # expired between the scan and the read
            state.allocations[key.rsplit(":", 1)[1]] = fields
    scheduled: list[tuple[bytes, float]] = await redis.zrange(  # type: ignore[assignment]
        keys.expiry, 0, -1, withscores=True)
    state.schedule = {text(member): int(at) for member, at in scheduled}
    state.host_active = {text(h): int(n) for h, n in (await redis.hgetall(keys.host_active)).items()}
    rsv_keys = [text(k) async for k in redis.scan_iter(match=keys.reservation("*"), count=1000)]
    for key, fields in zip(rsv_keys, await _hgetall_many(redis, rsv_keys)):
        if fields:
            state.reservations[key.rsplit(":", 1)[1]] = fields
    for device_id in sorted({r.get("device_id", "") for r in state.reservations.values()}):
        state.booked[device_id] = {text(m) for m in
                                   await redis.zrange(keys.bookings(device_id), 0, -1)}
    tenant_ids = sorted(text(t) for t in await redis.hkeys(keys.sched_tenants))
    for tid, fields in zip(tenant_ids, await _hgetall_many(
            redis, [keys.sched(f"tenant:{t}") for t in tenant_ids])):
        state.tenants[tid] = fields
    for sid in sorted(text(m) for m in await redis.smembers(keys.sched("schedules"))):
        if await redis.hget(keys.sched(f"schedule:{sid}"), "paused") == b"1":
            state.paused.add(sid)
    return state


async def _read_users(redis: Redis, keys: Keys, user_ids: Iterable[str]) -> dict[str, Any]:
    ids = sorted(set(user_ids))
    raw = []
    for i in range(0, len(ids), READ_CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for uid in ids[i:i + READ_CHUNK]:
                pipe.hgetall(keys.user(uid))
            raw += await pipe.execute()
    return {uid: parse_user_state(r) for uid, r in zip(ids, raw) if r}


def _uuids(ids: Iterable[str]) -> list[uuid.UUID]:
    out = []
    for ident in ids:
        try:
            out.append(uuid.UUID(ident))
        except ValueError:
            continue  # not an id PostgreSQL could hold: reported as absent there
    return out


async def _read_pg(pg: asyncpg.Pool, allocation_ids: Iterable[str],
                   reservation_ids: Iterable[str] = ()) -> _PgState:
    ids = _uuids(allocation_ids)
    state = _PgState()
    async with pg.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                      readonly=True):
        state.devices = {r["id"]: r for r in await conn.fetch(PG_DEVICES)}
        state.quotas = {r["user_id"]: r for r in await conn.fetch(PG_QUOTAS)}
        state.allocations = {r["id"]: r for r in await conn.fetch(PG_ALLOCATIONS, ids)}
        counts = await conn.fetchrow(PG_COUNTS)
        state.reservations = {r["id"]: r for r in await conn.fetch(
            PG_RESERVATIONS, _uuids(reservation_ids))}
        state.tenants = {r["tenant_id"]: r for r in await conn.fetch(PG_TENANTS)}
        state.paused = {r[0] for r in await conn.fetch(PG_PAUSED)}
    state.total, state.active = counts["total"], counts["active"]
    return state


# ------------------------------------------------------------------ in flight


async def _last_change_id(redis: Redis, keys: Keys) -> str:
    last = await redis.xrevrange(keys.changes, count=1)
    return text(last[0][0]) if last else "0-0"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def _persist_position(redis: Redis, keys: Keys) -> str:
    """The first change id persist may not have committed: its oldest pending entry, or the
    one after the last it was given ("0-0": every change, when it has no group)."""
    try:
        groups = {text(g["name"]): g for g in await redis.xinfo_groups(keys.changes)}
    except ResponseError:  # no stream: nothing to persist
        return await _last_change_id(redis, keys)
    group = groups.get(GROUP_PERSIST)
    if group is None:
        return "0-0"
    ms, seq = _id_key(text(group["last-delivered-id"]))
    position = f"{ms}-{seq + 1}"
    if int(group["pending"]):
        summary = await redis.xpending(keys.changes, GROUP_PERSIST)
        oldest = text(summary["min"])
        if _id_key(oldest) < _id_key(position):
            position = oldest
    return position


@dataclass
class _InFlight:
    entities: set[Entity]
    backlog: int
    """Changes persist had not committed when PostgreSQL was read."""


async def _in_flight(redis: Redis, keys: Keys, mark: str, position: str) -> _InFlight:
    """Entities touched by changes from ``position`` on (not yet persisted) or after
    ``mark`` (made while the audit read Redis)."""
    start = min(_id_key(position), _id_key(mark))
    cursor = f"{start[0]}-{start[1]}"
    touched: set[Entity] = set()
    backlog = 0
    first = True
    while True:
        batch = await redis.xrange(keys.changes, min=cursor if first else "(" + cursor,
                                   count=READ_CHUNK)
        first = False
        if not batch:
            break
        for entry_id, fields in batch:
            eid = text(entry_id)
            cursor = eid
            if _id_key(eid) < _id_key(position) and _id_key(eid) <= _id_key(mark):
                continue  # persisted, and made before Redis was read
            if _id_key(eid) >= _id_key(position):
                backlog += 1
            try:
                change = change_decoder.decode((fields or {}).get(b"d", b""))
            except msgspec.DecodeError:
                continue
            if isinstance(change, AllocationChange):
                touched |= {("allocation", change.allocation_id), ("device", change.device_id),
                            ("user", change.user_id)}
                if isinstance(change, AllocationReplaced):
                    touched.add(("device", change.previous_device_id))
            elif isinstance(change, DeviceUpserted):
                touched.add(("device", change.device_id))
            elif isinstance(change, QuotaSet):
                touched.add(("user", change.user_id))
            elif isinstance(change, ReservationChange):
                touched.add(("reservation", change.reservation_id))
            elif isinstance(change, TenantChange):
                touched.add(("tenant", change.tenant_id))
            elif isinstance(change, ScheduleChange):
                touched.add(("schedule", change.schedule_id))
        if len(batch) < READ_CHUNK:
            break
    return _InFlight(touched, backlog)


# ------------------------------------------------------------------- compare


def _num(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _expected_status(pg_status: str, holder: str) -> str:
    if holder:
        return "allocated"
    return "available" if pg_status == "allocated" else pg_status


class _Differences:
    def __init__(self, in_flight: set[Entity]) -> None:
        self.in_flight = in_flight
        self.found: list[Difference] = []
        self.skipped: set[Entity] = set()

    def add(self, kind: str, entity: str, ident: str, name: str, redis: Any, pg: Any) -> None:
        if (entity, ident) in self.in_flight:
            self.skipped.add((entity, ident))
            return
        self.found.append(Difference(kind, ident, name, redis, pg))


def _compare_devices(out: _Differences, r: _RedisState, p: _PgState) -> None:
    pg_holders: dict[str, list[str]] = {}
    for aid, row in p.allocations.items():
        if row["status"] == "allocated":
            pg_holders.setdefault(row["device_id"], []).append(aid)
    redis_holders: dict[str, list[str]] = {}
    for aid, rec in r.allocations.items():
        if rec.get("status") == "allocated":
            redis_holders.setdefault(rec.get("device_id", ""), []).append(aid)
    for device_id in sorted(set(r.devices) | set(p.devices)):
        dev, row = r.devices.get(device_id), p.devices.get(device_id)
        if dev is None or row is None:
            out.add("device", "device", device_id, "present", dev is not None, row is not None)
            continue
        for name in DEVICE_FIELDS:
            if str(dev.get(name)) != str(row[name]):
                out.add("device", "device", device_id, name, dev.get(name), row[name])
        held_by = sorted(pg_holders.get(device_id, []))
        if len(held_by) > 1:
            out.add("device", "device", device_id, "active_allocations", None, held_by)
        holder = held_by[-1] if held_by else ""
        if dev.get("status") != _expected_status(row["status"], holder):
            out.add("device", "device", device_id, "status", dev.get("status"),
                    _expected_status(row["status"], holder))
        if dev.get("alloc", "") != holder:
            out.add("device", "device", device_id, "allocation", dev.get("alloc", ""), holder)
    for device_id, dev in r.devices.items():
        in_free = device_id in r.free.get(dev.get("pool", ""), set())
        if in_free != (dev.get("status") == "available"):
            out.add("device", "device", device_id, "free_pool", in_free,
                    dev.get("status") == "available")
        if len(redis_holders.get(device_id, [])) > 1:
            out.add("device", "device", device_id, "active_allocations",
                    sorted(redis_holders[device_id]), None)
    for pool, members in r.free.items():
        for device_id in sorted(members):
            if r.devices.get(device_id, {}).get("pool") != pool:
                out.add("device", "device", device_id, "free_pool", pool, None)


def _compare_hosts(out: _Differences, r: _RedisState) -> None:
    """The count of active allocations per host against the devices an allocation holds
    on that host."""
    held: Counter[str] = Counter(dev.get("host", "") for dev in r.devices.values()
                                 if dev.get("alloc"))
    for host in sorted(set(held) | set(r.host_active)):
        if r.host_active.get(host, 0) != held.get(host, 0):
            out.add("host", "host", host, "active_allocations", r.host_active.get(host, 0),
                    held.get(host, 0))


def _compare_quotas(out: _Differences, users: dict[str, Any], p: _PgState) -> None:
    with_quota = {uid for uid, s in users.items() if s.quota.get("status")}
    for uid in sorted(with_quota | set(p.quotas)):
        quota = users[uid].quota if uid in with_quota else None
        row = p.quotas.get(uid)
        if quota is None or row is None:
            out.add("quota", "user", uid, "present", quota is not None, row is not None)
            continue
        for name in QUOTA_FIELDS:
            mine, theirs = quota.get(name, ""), "" if row[name] is None else str(row[name])
            if mine != theirs:
                out.add("quota", "user", uid, name, mine, theirs)


def _compare_usage(out: _Differences, users: dict[str, Any], p: _PgState) -> None:
    active: dict[str, list[asyncpg.Record]] = {}
    for row in p.allocations.values():
        if row["status"] == "allocated":
            active.setdefault(row["user_id"], []).append(row)
    for uid in sorted(set(users) | set(active)):
        rows = active.get(uid, [])
        state = users.get(uid)
        usage = state.usage if state else dict.fromkeys(USAGE_FIELDS.values(), 0)
        holds = [h.split() for h in state.holds.values()] if state else []
        want = {
            # a hold is one device, or n for a batch's "cpu mem sto n"
            "devices": len(rows) + sum(int(h[3]) if len(h) > 3 else 1 for h in holds),
            "cpu": sum(r["cpu_cores"] for r in rows) + sum(int(h[0]) for h in holds),
            "mem": sum(r["memory_mb"] for r in rows) + sum(int(h[1]) for h in holds),
            "sto": sum(r["storage_mb"] for r in rows) + sum(int(h[2]) for h in holds),
        }
        for name, field_name in USAGE_FIELDS.items():
            if usage[field_name] != want[field_name]:
                out.add("usage", "user", uid, name, usage[field_name], want[field_name])
        mine = sorted(state.allocations) if state else []
        theirs = sorted(r["id"] for r in rows)
        if mine != theirs:
            out.add("usage", "user", uid, "allocations", mine, theirs)


def _compare_allocations(out: _Differences, r: _RedisState, p: _PgState) -> None:
    for aid, rec in sorted(r.allocations.items()):
        row = p.allocations.get(aid)
        if row is None:
            out.add("allocation", "allocation", aid, "present", True, False)
            continue
        pairs = [("device_id", rec.get("device_id"), row["device_id"]),
                 ("user_id", rec.get("user_id"), row["user_id"]),
                 ("status", rec.get("status"), row["status"]),
                 ("version", _num(rec.get("version")), row["version"])]
        if rec.get("status") == "allocated":
            pairs.append(("expires_at_ms", _num(rec.get("expires_at_ms")),
                          row["expires_at_ms"]))
        else:  # a closed one keeps only what a second release answers from
            pairs.append(("duration_seconds", _num(rec.get("duration_seconds")),
                          row["duration_seconds"]))
        for name, mine, theirs in pairs:
            if mine != theirs:
                out.add("allocation", "allocation", aid, name, mine, theirs)
    pg_active = {aid: row for aid, row in p.allocations.items() if row["status"] == "allocated"}
    for aid in sorted(set(pg_active) - set(r.allocations)):
        out.add("allocation", "allocation", aid, "present", False, True)
    for aid in sorted(set(pg_active) | set(r.schedule)):
        at, row = r.schedule.get(aid), pg_active.get(aid)
        if row is None or at != row["expires_at_ms"]:
            out.add("allocation", "allocation", aid, "schedule", at,
                    None if row is None else row["expires_at_ms"])


def _compare_reservations(out: _Differences, r: _RedisState, p: _PgState) -> None:
    live = {rid for rid, rec in r.reservations.items() if rec.get("status") in LIVE_RESERVATION}
    live |= {rid for rid, row in p.reservations.items() if row["status"] in LIVE_RESERVATION}
    for rid in sorted(live):
        rec, row = r.reservations.get(rid), p.reservations.get(rid)
        if rec is None or row is None:
            out.add("reservation", "reservation", rid, "present", rec is not None,
                    row is not None)
            continue
        for name in RESERVATION_FIELDS:
            mine = rec.get(name) or None
            theirs = None if row[name] is None else str(row[name])
            if mine != theirs:
                out.add("reservation", "reservation", rid, name, mine, theirs)
        in_bookings = rid in r.booked.get(rec.get("device_id", ""), set())
        if in_bookings != (rec.get("status") in LIVE_RESERVATION):
            out.add("reservation", "reservation", rid, "booking", in_bookings,
                    rec.get("status") in LIVE_RESERVATION)


def _compare_tenants(out: _Differences, r: _RedisState, p: _PgState, now_ms: int) -> None:
    for tid in sorted(set(r.tenants) | set(p.tenants)):
        h, row = r.tenants.get(tid), p.tenants.get(tid)
        if h is None or row is None:
            out.add("tenant", "tenant", tid, "present", h is not None, row is not None)
            continue
        until = _num(h.get("override_until_ms"))
        lasting = until is not None and until > now_ms
        pairs = [("plan", h.get("plan"), row["plan"]),
                 ("override_ms", _num(h.get("override_ms")) if lasting else None,
                  row["override_ms"] if (row["override_until_ms"] or 0) > now_ms else None),
                 ("override_until_ms", until if lasting else None,
                  row["override_until_ms"] if (row["override_until_ms"] or 0) > now_ms
                  else None)]
        for name, mine, theirs in pairs:
            if mine != theirs:
                out.add("tenant", "tenant", tid, name, mine, theirs)
    for sid in sorted(r.paused ^ p.paused):
        out.add("schedule", "schedule", sid, "paused", sid in r.paused, sid in p.paused)


async def audit(redis: Redis, keys: Keys, pg: asyncpg.Pool,
                now_ms: int | None = None) -> dict[str, Any]:
    """Compare Redis with PostgreSQL; the JSON report (see the module's docstring and the
    README). ``consistent`` is true when nothing differs outside what is in flight."""
    mark = await _last_change_id(redis, keys)
    r = await _read_redis(redis, keys)
    redis_user_ids = {text(u) for u in await redis.smembers(keys.users)}
    position = await _persist_position(redis, keys)
    p = await _read_pg(pg, r.allocations, r.reservations)
    user_ids = redis_user_ids | set(p.quotas)
    user_ids |= {rec["user_id"] for rec in r.allocations.values() if rec.get("user_id")}
    user_ids |= {row["user_id"] for row in p.allocations.values()}
    users = await _read_users(redis, keys, user_ids)
    flight = await _in_flight(redis, keys, mark, position)
    # a host's count is in flight with any device of that host
    hosts = {("host", r.devices[ident].get("host", "")) for entity, ident in flight.entities
             if entity == "device" and ident in r.devices}
    out = _Differences(flight.entities | hosts)
    _compare_devices(out, r, p)
    _compare_hosts(out, r)
    _compare_quotas(out, users, p)
    _compare_usage(out, users, p)
    _compare_allocations(out, r, p)
    _compare_reservations(out, r, p)
    _compare_tenants(out, r, p, int(time.time() * 1000) if now_ms is None else now_ms)
    mismatched = sorted({d.id for d in out.found if d.kind == "allocation"})
    by_kind = Counter(d.kind for d in out.found)
    return {
        "consistent": not out.found,
        "pg_allocations": p.total,
        "redis_allocations": len(r.allocations),
        "redis_active": len(r.schedule),
        "pg_active": p.active,
        "mismatched": mismatched[:20],
        "mismatched_count": len(mismatched),
        "redis_devices": len(r.devices),
        "pg_devices": len(p.devices),
        "redis_quotas": sum(1 for s in users.values() if s.quota.get("status")),
        "pg_quotas": len(p.quotas),
        "differences": [asdict(d) for d in out.found[:LISTED]],
        "difference_count": len(out.found),
        "differences_by_kind": {k: by_kind.get(k, 0)
                                for k in ("device", "quota", "usage", "allocation", "host",
                                          "reservation", "tenant", "schedule")},
        "redis_reservations": sum(1 for rec in r.reservations.values()
                                  if rec.get("status") in LIVE_RESERVATION),
        "pg_reservations": sum(1 for row in p.reservations.values()
                               if row["status"] in LIVE_RESERVATION),
        "redis_tenants": len(r.tenants),
        "pg_tenants": len(p.tenants),
        "backlog": flight.backlog,
        "in_flight": len(flight.entities),
        "in_flight_skipped": len(out.skipped),
    }
