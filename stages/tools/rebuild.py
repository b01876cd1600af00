"""`devsched rebuild`: load the live state from PostgreSQL into a Redis that lost it.

What it restores, from the write-behind tables:

- devices and their pools (``devices``), each free unless an active allocation
  holds it, with its version, so the next change continues above PostgreSQL's;
- quotas (``user_quotas``) with their versions, and each user's usage recomputed
  from the user's active allocations; the device and host of the user's newest
  allocation (what the affinity strategy prefers);
- the count of active allocations per host (``host_active``), from the devices an
  active allocation holds;
- active allocations (``device_allocations`` with status ``allocated``) and the
  expiry schedule; one whose expires-at passed while Redis was away is scheduled
  at that expires-at, so the next timer tick expires it and bills it to then;
- closed allocations still inside ``DEVSCHED_RELEASED_TTL_S`` (a second release
  answers ``already_released``), with the time left of that window;
- the stored answer of every allocation made inside ``DEVSCHED_IDEMPOTENCY_TTL_S``
  (the request id is in ``metadata``; the device's name and adb endpoint come from
  ``devices``), so a retried request gets its first answer, never a second device; a
  batch's answer is rebuilt from its allocations (an AllocatedBatch listing them, mode
  ``best_effort``, no failures: a batch's failures and mode are not in PostgreSQL), so
  a retried batch never gets a second set;
- the counters of ``devsched stats`` (allocations, releases, expiries);
- the wait queue (``waiting_requests``, written behind from each WaiterChange): every
  request still waiting joins the queue again in its place (its score), with its quota
  hold, its user's ``waiting`` count, its deadline and the allocation id it was given; a
  device written free is offered to it in the same step as a release would offer it, a
  wait that ended while Redis was away ends with ``failed`` ``timed_out`` at the next
  tick (or when a device is offered): each waiter gets its one final reply. A request
  PostgreSQL shows served (its allocation is there) is not queued again;
- what events keep of a user (``user_quotas``): the user service's and billing's parts
  of the status, the versions of the last user.* and billing.* events (so an older event
  stays stale), and the failed payments counted with the time that count has left;
- the tracked jobs' hashes (``job_info``): interval, paused or not, next run, retries
  and timeout; no claim (a run Redis lost is over; its execution record says so);
- reservations booked or active (``reservations``): each one's record, its booking of
  the device and its place in the timers' schedules (start, claim deadline, end), and
  the stored answer of each booked inside ``DEVSCHED_IDEMPOTENCY_TTL_S`` (a retried
  reserve request gets its first answer, never a second booking);
- the tenant registry of the global schedules (``tenants``, written behind from each
  TenantChange): each active tenant with its plan, its override while it lasts and the
  version of its last tenant event, placed anew in one batch of each kind's schedule of
  its interval as a new tenant is (batch numbers, offsets and next runs are made anew,
  not restored as they were); the schedules paused (``schedule_state``); the counter of
  their changes' versions above PostgreSQL's. Not restored: the retry queue and the
  permanently failed tenant runs (a retry's tries and back-off are not written behind;
  each failed batch run keeps its execution record with its error in
  ``job_executions``), and the event versions of deleted tenants.

It also bills what PostgreSQL shows closed but the ledger lacks: persist and bill
read the changes stream in groups of their own, so a change persist had committed may
have been lost with Redis before bill wrote its row (``billed``).

What it cannot restore: changes Redis had not yet handed to PostgreSQL when it was
lost (the write-behind backlog, at most the requests of the last moments before the
loss), holds of requests between the quota and select stages, stored answers of
refused requests and of releases (a release repeated after a rebuild answers
``already_released: true`` with the same figures), and the streams themselves.

How: ``rebuild.lua`` writes the state in chunks of ``CHUNK`` items, each call
atomic, in the order stats, allocations, answers, users, devices; see the script
for why a worker serving meanwhile never sees a device free that an allocation
holds, nor a quota without its usage. Every item replaces what its keys held,
and the keys of the live state are cleared first, so running it twice gives the
same state. The state marker (stages/state.py) says ``rebuilding`` from before the
clearing until the last item is written, then gets a new epoch: workers serve
nothing in between, and allocation ids made after never repeat ids made before. A Redis that holds live state is refused (:class:`StateNotEmpty`)
unless ``force``; with ``force`` the write-behind must have caught up first
(:class:`BacklogPending`): what is not yet in PostgreSQL would be lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import msgspec
from redis.asyncio import Redis

from pipeline.app import RecoveryError
from pipeline.clock import Clock, SystemClock
from pipeline.connections import pg_pool, redis_client, text
from pipeline.progress import Progress as ProgressLine
from schemas.keys import GROUP_PERSIST, Keys
from schemas.messages import (
    Allocated,
    AllocatedBatch,
    DeviceInfo,
    Reserved,
    WaiterChange,
    encoder,
)
from schemas.rows import (
    RebuildAllocation,
    RebuildAnswer,
    RebuildCall,
    RebuildDevice,
    RebuildJob,
    RebuildKeys,
    RebuildReservation,
    RebuildStats,
    RebuildUser,
    RebuildWaiter,
    TenantRecord,
)
from stages.schedules import restore as restore_schedules
from stages.scripts import REBUILD
from stages.settings import Settings
from stages.state import mark_rebuilding, mark_state, read_marker

CHUNK = 200
"""Items per script call: bounds how long one call holds Redis."""
DELETE_CHUNK = 500
"""Keys per UNLINK when clearing."""

Progress = Callable[[str], None]


class StateNotEmpty(RuntimeError):
    """Redis holds live state; rebuild replaces it only when forced."""


class BacklogPending(RuntimeError):
    """Changes are still on their way to PostgreSQL; a forced rebuild would lose them."""


@dataclass
class RebuildReport:
    """What a rebuild wrote."""

    devices: int = 0
    quotas: int = 0
    users: int = 0
    active: int = 0
    overdue: int = 0
    """Active allocations whose expires-at passed: the next timer tick expires them."""
    closed: int = 0
    answers: int = 0
    waiters: int = 0
    """Requests waiting in the queue when Redis lost it, queued again in their places."""
    jobs: int = 0
    """Tracked jobs whose hash was written from job_info (interval, paused, next run)."""
    cleared: int = 0
    """Keys of a former state (or of debris on an empty one) removed first."""
    billed: int = 0
    """Closed allocations PostgreSQL had but the ledger lacked (their bill change was
    lost with Redis): billed now, as the bill stage would have."""
    allocated_total: int = 0
    released_total: int = 0
    expired_total: int = 0
    reservations: int = 0
    """Reservations booked or active, written with their bookings."""
    tenants: int = 0
    """Tenants of the global schedules registered again and placed in their batches."""
    tenants_skipped: int = 0
    """Active tenants whose plan DEVSCHED_PLAN_INTERVALS no longer names: left out."""
    paused_schedules: int = 0
    """Global schedules written paused again."""


def _glob_escape(pattern: str) -> str:
    """``pattern`` with the characters SCAN MATCH reads as wildcards escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in pattern)


async def live_state_present(redis: Redis, keys: Keys) -> bool:
    """True when Redis holds live state: devices, quotas, active allocations or counters."""
    found = await redis.exists(keys.devices, keys.pools, keys.users, keys.expiry, keys.stats)
    return int(found) > 0


async def persist_behind(redis: Redis, keys: Keys) -> bool:
    """True when some change on the changes stream is not yet in PostgreSQL."""
    if not await redis.exists(keys.changes):
        return False
    groups = {text(g["name"]): g for g in await redis.xinfo_groups(keys.changes)}
    group = groups.get(GROUP_PERSIST)
    if group is None:
        return int(await redis.xlen(keys.changes)) > 0
    if int(group["pending"]):
        return True
    after = await redis.xrange(keys.changes, min="(" + text(group["last-delivered-id"]),
                               count=1)
    return bool(after)


async def clear_live_state(redis: Redis, keys: Keys) -> int:
    """Delete every key of the live state (``{pool}``, ``{u:ID}``, ``{jobs}`` and the global
    schedules' ``{sched}`` keys, the user set), never the streams, the strategy setting,
    the state marker nor the replies waiting for WAIT (DEVSCHED_REPLICAS_TO_ACK); returns
    how many. Everything cleared is restored from PostgreSQL, except what the module's
    docstring lists."""
    kept = {keys.strategy.encode(), keys.state.encode(), keys.replies_held.encode()}
    found = [k async for k in redis.scan_iter(match=_glob_escape(keys.prefix) + ":{*",
                                              count=1000)
             if k not in kept]
    found.append(keys.users.encode())
    removed = 0
    for i in range(0, len(found), DELETE_CHUNK):
        removed += int(await redis.unlink(*found[i:i + DELETE_CHUNK]))
    return removed


def _ms(column: str) -> str:
    """SQL for a timestamptz column as integer milliseconds since the epoch (null stays)."""
    return f"round(extract(epoch FROM {column}) * 1000)::bigint"


DEVICES_SQL = """
SELECT id, name, pool, model, host, adb_host, adb_port, cpu_cores, memory_mb, storage_mb,
       status, version
FROM devices ORDER BY id
"""
QUOTAS_SQL = f"""
SELECT user_id, status, {_ms("expires_at")} AS expires_at_ms, max_devices, max_cpu_per_device,
       max_memory_mb_per_device, total_cpu_cores, total_memory_gb, total_storage_gb, version,
       user_status, billing_status, user_event_version, billing_event_version,
       payment_failures, {_ms("payment_failures_until")} AS payment_failures_until_ms
FROM user_quotas ORDER BY user_id
"""
WAITERS_SQL = """
SELECT w.request::text AS request
FROM waiting_requests w
WHERE w.status = 'waiting'
  AND NOT EXISTS (SELECT 1 FROM device_allocations a
                  WHERE a.user_id = w.user_id AND a.metadata->>'request_id' = w.request_id)
ORDER BY w.queue_score, w.user_id, w.request_id
"""
"""The requests waiting when Redis was lost, less those an allocation in PostgreSQL shows
served (the allocation's change was persisted, the waiter's leaving not yet)."""
JOBS_SQL = f"""
SELECT name, interval_ms, enabled, status, {_ms("last_run_at")} AS last_run_ms,
       {_ms("next_run_at")} AS next_run_ms, max_retries, timeout_ms
FROM job_info ORDER BY name
"""
ALLOCATIONS_SQL = f"""
SELECT a.id::text AS id, a.device_id, a.user_id, a.tenant_id, a.status,
       {_ms("a.allocated_at")} AS allocated_at_ms, {_ms("a.released_at")} AS released_at_ms,
       {_ms("a.expires_at")} AS expires_at_ms, a.duration_minutes, a.duration_seconds,
       a.metadata::text AS metadata, a.version, a.end_reason, d.name AS device_name, d.adb_host, d.adb_port
FROM device_allocations a LEFT JOIN devices d ON d.id = a.device_id
WHERE a.status = 'allocated' OR a.released_at > to_timestamp($1 / 1000.0)
   OR a.allocated_at > to_timestamp($2 / 1000.0)
ORDER BY a.allocated_at, a.id
"""
LAST_DEVICE_SQL = """
SELECT DISTINCT ON (a.user_id) a.user_id, a.device_id, d.host
FROM device_allocations a JOIN devices d ON d.id = a.device_id
ORDER BY a.user_id, a.allocated_at DESC, a.id DESC
"""
"""Each user's newest allocation's device and host: the affinity strategy's memory (two
allocations of one user in the same millisecond: the larger id counts as the newer)."""
COUNTS_SQL = """
SELECT count(*) AS allocated, count(*) FILTER (WHERE status = 'released') AS released,
       count(*) FILTER (WHERE status = 'expired') AS expired
FROM device_allocations
"""
BILL_MISSING_SQL = """
INSERT INTO billing_ledger (allocation_id, user_id, tenant_id, device_id, started_at, ended_at,
    duration_seconds, cpu_cores, memory_mb, end_reason, covered_from, covered_to, covered_to_s)
SELECT a.id, a.user_id, a.tenant_id, a.device_id, a.allocated_at, a.released_at,
       greatest(coalesce(a.duration_seconds, 0) - coalesce(i.s, 0), 0),
       (a.metadata->>'cpu_cores')::int, (a.metadata->>'memory_mb')::int, a.status,
       a.allocated_at + make_interval(secs => coalesce(i.s, 0)), a.released_at,
       coalesce(a.duration_seconds, 0)
FROM device_allocations a
LEFT JOIN LATERAL (SELECT sum(duration_seconds)::int AS s FROM billing_ledger l
                   WHERE l.allocation_id = a.id AND l.kind = 'interim') i ON TRUE
WHERE a.status <> 'allocated' AND a.released_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM billing_ledger l WHERE l.allocation_id = a.id
                  AND l.kind = 'final')
ORDER BY a.id
ON CONFLICT (allocation_id) WHERE kind = 'final' DO NOTHING
"""
HAS_STATE_SQL = """
SELECT EXISTS (SELECT 1 FROM devices) OR EXISTS (SELECT 1 FROM user_quotas)
    OR EXISTS (SELECT 1 FROM device_allocations WHERE status = 'allocated')
    OR EXISTS (SELECT 1 FROM tenants WHERE status = 'active')
"""


class _Meta(msgspec.Struct):
    """What persist keeps of an allocation in ``metadata``."""

    request_id: str
    pool: str
    cpu_cores: int
    memory_mb: int
    storage_mb: int
    replace_on_failure: bool = False


_meta = msgspec.json.Decoder(_Meta)
_waiter = msgspec.json.Decoder(WaiterChange)


def _waiter_item(w: WaiterChange) -> RebuildWaiter:
    return RebuildWaiter(
        request_id=w.request_id, user_id=w.user_id, tenant_id=w.tenant_id,
        reply_to=w.reply_to, min_cpu_cores=w.min_cpu_cores, min_memory_mb=w.min_memory_mb,
        duration_seconds=w.duration_seconds, pool=w.pool, model=w.model, hold=w.hold,
        allocation_id=w.allocation_id, replace_on_failure=w.replace_on_failure or None,
        priority=w.priority, wait_seconds=w.wait_seconds, queued_at_ms=w.queued_at_ms,
        wait_until_ms=w.wait_until_ms, idem_ttl=w.idem_ttl_s, reply_ttl=w.reply_ttl_s,
        queue_score=w.queue_score)


def _seconds_left(ttl_s: int, since_ms: int, now_ms: int) -> int:
    return ttl_s - (now_ms - since_ms) // 1000


@dataclass
class _Loaded:
    stats: RebuildStats
    allocations: list[RebuildAllocation]
    answers: list[RebuildAnswer]
    users: list[RebuildUser]
    devices: list[RebuildDevice]
    jobs: list[RebuildJob]
    report: RebuildReport


async def database_has_state(pg: asyncpg.Pool) -> bool:
    """True when PostgreSQL holds devices, quotas or active allocations."""
    async with pg.acquire() as conn:
        return bool(await conn.fetchval(HAS_STATE_SQL))


async def load(pg: asyncpg.Pool, settings: Settings, now_ms: int) -> _Loaded:
    """Read what the live state is made of from PostgreSQL, as the script's items."""
    released_since = now_ms - settings.released_ttl_s * 1000
    answered_since = now_ms - settings.idempotency_ttl_s * 1000
    async with pg.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                      readonly=True):
        devices = await conn.fetch(DEVICES_SQL)
        quotas = await conn.fetch(QUOTAS_SQL)
        allocations = await conn.fetch(ALLOCATIONS_SQL, released_since, answered_since)
        counts = await conn.fetchrow(COUNTS_SQL)
        last_devices = await conn.fetch(LAST_DEVICE_SQL)
        waiting = await conn.fetch(WAITERS_SQL)
        jobs = await conn.fetch(JOBS_SQL)
    report = RebuildReport(devices=len(devices), quotas=len(quotas),
                           allocated_total=counts["allocated"],
                           released_total=counts["released"], expired_total=counts["expired"])
    alloc_items: list[RebuildAllocation] = []
    answers: list[RebuildAnswer] = []
    active_of_user: dict[str, list[str]] = {}
    holder: dict[str, str] = {}
    last_closed: dict[str, tuple[int, str]] = {}
    batches: dict[tuple[str, str], list[tuple[int, Allocated]]] = {}
    for row in allocations:
        meta = _meta.decode(row["metadata"])
        active = row["status"] == "allocated"
        released_at = row["released_at_ms"]
        if active or (released_at is not None and released_at > released_since):
            alloc_items.append(RebuildAllocation(
                allocation_id=row["id"], device_id=row["device_id"], user_id=row["user_id"],
                tenant_id=row["tenant_id"], request_id=meta.request_id, status=row["status"],
                allocated_at_ms=row["allocated_at_ms"], expires_at_ms=row["expires_at_ms"],
                duration_minutes=row["duration_minutes"], cpu_cores=meta.cpu_cores,
                memory_mb=meta.memory_mb, storage_mb=meta.storage_mb, pool=meta.pool,
                version=row["version"], released_at_ms=released_at,
                duration_seconds=row["duration_seconds"],
                end_reason=None if active else (row["end_reason"] or row["status"]),
                replace_on_failure=meta.replace_on_failure or None,
                ttl_s=max(1, _seconds_left(settings.released_ttl_s, released_at or now_ms,
                                           now_ms)),
            ))
            if active:
                report.active += 1
                report.overdue += int(row["expires_at_ms"] <= now_ms)
                active_of_user.setdefault(row["user_id"], []).append(row["id"])
                holder[row["device_id"]] = row["id"]  # newest last: ordered by allocated_at
            else:
                report.closed += 1
                seen = last_closed.get(row["device_id"])
                if seen is None or seen[0] <= released_at:
                    last_closed[row["device_id"]] = (released_at, row["id"])
        answer_left = _seconds_left(settings.idempotency_ttl_s, row["allocated_at_ms"], now_ms)
        if answer_left > 0 and row["device_name"] is not None:
            item = Allocated(
                request_id=meta.request_id, allocation_id=row["id"],
                device=DeviceInfo(id=row["device_id"], name=row["device_name"],
                                  status="allocated"),
                user_id=row["user_id"], allocated_at_ms=row["allocated_at_ms"],
                expires_at_ms=row["expires_at_ms"], adb_host=row["adb_host"],
                adb_port=row["adb_port"])
            batches.setdefault((row["user_id"], meta.request_id), []).append(
                (answer_left, item))
    # one allocation per request id: its own answer; several: a batch's (a best-effort
    # batch that got a single device comes back as a plain allocated answer)
    for (user_id, request_id), items in batches.items():
        if len(items) == 1:
            left, single = items[0]
            answers.append(RebuildAnswer(user_id=user_id, request_id=request_id,
                                         answer=encoder.encode(single).decode(), ttl_s=left))
            continue
        given = sorted((item for _left, item in items), key=lambda a: a.allocation_id)
        batch = AllocatedBatch(request_id=request_id, mode="best_effort",
                               success_count=len(given), failed_count=0, allocations=given,
                               failures=[])
        answers.append(RebuildAnswer(user_id=user_id, request_id=request_id,
                                     answer=encoder.encode(batch).decode(),
                                     ttl_s=min(left for left, _item in items)))
    report.answers = len(answers)
    users: dict[str, RebuildUser] = {
        q["user_id"]: RebuildUser(
            user_id=q["user_id"], allocations=[], status=q["status"],
            expires_at_ms=q["expires_at_ms"], max_devices=q["max_devices"],
            max_cpu_per_device=q["max_cpu_per_device"],
            max_memory_mb_per_device=q["max_memory_mb_per_device"],
            total_cpu_cores=q["total_cpu_cores"], total_memory_gb=q["total_memory_gb"],
            total_storage_gb=q["total_storage_gb"], version=q["version"],
            user_status=q["user_status"], billing_status=q["billing_status"],
            user_event_version=q["user_event_version"],
            billing_event_version=q["billing_event_version"],
            payment_failures=q["payment_failures"] or None,
            payment_failures_ttl_ms=_ttl_left(q["payment_failures_until_ms"], now_ms))
        for q in quotas
    }
    for row in waiting:
        w = _waiter.decode(row["request"])
        waiter_of = users.setdefault(w.user_id, RebuildUser(user_id=w.user_id, allocations=[]))
        waiter_of.waiters = [*(waiter_of.waiters or []), _waiter_item(w)]
        report.waiters += 1
    for user_id, ids in active_of_user.items():
        users.setdefault(user_id, RebuildUser(user_id=user_id, allocations=[])).allocations = ids
    for row in last_devices:
        user = users.get(row["user_id"])
        if user is not None:
            user.last_device, user.last_host = row["device_id"], row["host"]
    report.users = len(users)
    device_items = [RebuildDevice(
        device_id=d["id"], name=d["name"], pool=d["pool"], model=d["model"], host=d["host"],
        adb_host=d["adb_host"], adb_port=d["adb_port"], cpu_cores=d["cpu_cores"],
        memory_mb=d["memory_mb"], storage_mb=d["storage_mb"], status=d["status"],
        version=d["version"], allocation_id=holder.get(d["id"]),
        last_allocation_id=last_closed.get(d["id"], (0, None))[1],
    ) for d in devices]
    stats = RebuildStats(allocated=report.allocated_total, released=report.released_total,
                         expired=report.expired_total)
    job_items = [RebuildJob(
        name=j["name"], interval_ms=j["interval_ms"], paused=not j["enabled"],
        next_run_ms=j["next_run_ms"] if j["next_run_ms"] is not None else now_ms,
        max_retries=j["max_retries"], timeout_ms=j["timeout_ms"],
        status="idle" if j["status"] == "running" else j["status"],
        last_run_ms=j["last_run_ms"]) for j in jobs]
    report.jobs = len(job_items)
    return _Loaded(stats, alloc_items, answers, list(users.values()), device_items, job_items,
                   report)


def _ttl_left(until_ms: int | None, now_ms: int) -> int | None:
    """Milliseconds left until ``until_ms`` (None when none is left or none was set)."""
    if until_ms is None or until_ms <= now_ms:
        return None
    return until_ms - now_ms


RESERVATIONS_SQL = f"""
SELECT r.id::text AS reservation_id, r.request_id, r.user_id, r.tenant_id, r.device_id, r.pool,
       {_ms("r.start_at")} AS start_ms, {_ms("r.end_at")} AS end_ms, r.status,
       r.allocation_id::text AS allocation_id, {_ms("r.created_at")} AS created_at_ms,
       {_ms("r.claimed_at")} AS claimed_at_ms, {_ms("r.claim_by")} AS claim_by_ms, r.version,
       d.name AS device_name
FROM reservations r LEFT JOIN devices d ON d.id = r.device_id
WHERE r.status IN ('booked', 'active') OR r.created_at >= to_timestamp($1 / 1000.0)
ORDER BY r.id
"""
"""The live reservations, and every one booked inside the idempotency window (for its
answer)."""


async def load_reservations(pg: asyncpg.Pool, settings: Settings,
                            now_ms: int) -> tuple[list[RebuildReservation], list[RebuildAnswer]]:
    """The reservations to write (booked or active) and the stored answers of those booked
    inside the idempotency window (a ``reserved`` reply, as select gave it)."""
    answered_since = now_ms - settings.idempotency_ttl_s * 1000
    async with pg.acquire() as conn:
        rows = await conn.fetch(RESERVATIONS_SQL, answered_since)
    items, answers = [], []
    for r in rows:
        if r["status"] in ("booked", "active"):
            items.append(RebuildReservation(
                reservation_id=r["reservation_id"], request_id=r["request_id"],
                user_id=r["user_id"], tenant_id=r["tenant_id"], device_id=r["device_id"],
                pool=r["pool"], start_ms=r["start_ms"], end_ms=r["end_ms"], status=r["status"],
                allocation_id=r["allocation_id"], created_at_ms=r["created_at_ms"],
                claimed_at_ms=r["claimed_at_ms"], claim_by_ms=r["claim_by_ms"],
                version=r["version"]))
        left = _seconds_left(settings.idempotency_ttl_s, r["created_at_ms"], now_ms)
        if left > 0:
            reply = Reserved(request_id=r["request_id"], reservation_id=r["reservation_id"],
                             user_id=r["user_id"], device_id=r["device_id"],
                             device_name=r["device_name"] or r["device_id"], pool=r["pool"],
                             start_ms=r["start_ms"], end_ms=r["end_ms"], status="booked")
            answers.append(RebuildAnswer(user_id=r["user_id"], request_id=r["request_id"],
                                         answer=encoder.encode(reply).decode(), ttl_s=left))
    return items, answers


TENANTS_SQL = f"""
SELECT tenant_id, plan, override_ms, {_ms("override_until")} AS override_until_ms,
       event_version, {_ms("created_at")} AS created_at_ms
FROM tenants WHERE status = 'active' ORDER BY tenant_id
"""
PAUSED_SQL = "SELECT schedule_id FROM schedule_state WHERE paused ORDER BY schedule_id"
SCHEDULE_VERSION_SQL = """
SELECT greatest((SELECT max(version) FROM tenants), (SELECT max(version) FROM schedule_state))
"""


async def load_schedules(pg: asyncpg.Pool) -> tuple[list[TenantRecord], list[str], int]:
    """The active tenants, the paused schedules and the highest version of their changes."""
    async with pg.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                      readonly=True):
        tenants = await conn.fetch(TENANTS_SQL)
        paused = [r[0] for r in await conn.fetch(PAUSED_SQL)]
        version = await conn.fetchval(SCHEDULE_VERSION_SQL)
    return ([TenantRecord(tenant_id=t["tenant_id"], plan=t["plan"],
                          override_ms=t["override_ms"],
                          override_until_ms=t["override_until_ms"],
                          event_version=t["event_version"],
                          created_at_ms=t["created_at_ms"]) for t in tenants],
            paused, int(version or 0))


async def rebuild(
    redis: Redis, keys: Keys, pg: asyncpg.Pool, settings: Settings, clock: Clock, *,
    force: bool = False, progress: Progress | None = None,
) -> RebuildReport:
    """Load the live state from PostgreSQL into Redis (see the module's docstring)."""
    say = progress or (lambda _line: None)
    if await live_state_present(redis, keys):
        if not force:
            raise StateNotEmpty(
                "Redis already holds live state (devices, quotas, allocations or counters "
                f"under the prefix {keys.prefix!r}); rebuild replaces it only with --force")
        if await persist_behind(redis, keys):
            raise BacklogPending(
                "changes on the changes stream are not yet in PostgreSQL; rebuilding now "
                "would lose them. Let the write-behind catch up (`devsched run`, or "
                "`devsched worker persist`) and try again")
    loaded = await load(pg, settings, clock.now_ms())
    reservations, reservation_answers = await load_reservations(pg, settings, clock.now_ms())
    tenants, paused, schedule_version = await load_schedules(pg)
    report = loaded.report
    report.reservations = len(reservations)
    say(f"loaded from PostgreSQL: {report.devices} devices, {report.quotas} quotas, "
        f"{report.active} active allocations ({report.overdue} past their expiry), "
        f"{report.closed} recently closed, {report.answers} stored answers, "
        f"{report.waiters} waiting requests, {report.jobs} tracked jobs")
    await mark_rebuilding(redis, keys, now_ms=clock.now_ms())  # nothing served from now on
    report.cleared = await clear_live_state(redis, keys)
    if report.cleared:
        say(f"cleared {report.cleared} keys of the former state")
    script_keys = RebuildKeys(users=keys.users, stats=keys.stats, changes=keys.changes,
                              jobs_known=keys.jobs_known)
    p, now = keys.prefix, clock.now_ms
    await REBUILD(redis, script_keys, RebuildCall(prefix=p, now_ms=now(), stats=loaded.stats))
    calls: tuple[tuple[str, int, Callable[[int], RebuildCall]], ...] = (
        ("jobs", len(loaded.jobs), lambda i: RebuildCall(
            prefix=p, now_ms=now(), jobs=loaded.jobs[i:i + CHUNK])),
        ("allocations", len(loaded.allocations), lambda i: RebuildCall(
            prefix=p, now_ms=now(), allocations=loaded.allocations[i:i + CHUNK])),
        ("answers", len(loaded.answers), lambda i: RebuildCall(
            prefix=p, now_ms=now(), answers=loaded.answers[i:i + CHUNK])),
        ("users", len(loaded.users), lambda i: RebuildCall(
            prefix=p, now_ms=now(), users=loaded.users[i:i + CHUNK])),
        # before the devices: a device written free is offered to the waiters, who must
        # not be given one that a restored booking needs
        ("reservations", len(reservations), lambda i: RebuildCall(
            prefix=p, now_ms=now(), reservations=reservations[i:i + CHUNK])),
        ("reservation answers", len(reservation_answers), lambda i: RebuildCall(
            prefix=p, now_ms=now(), answers=reservation_answers[i:i + CHUNK])),
        ("devices", len(loaded.devices), lambda i: RebuildCall(
            prefix=p, now_ms=now(), devices=loaded.devices[i:i + CHUNK])),
    )
    bar = ProgressLine("rebuild", unit="items written")
    for kind, count, chunk in calls:
        done = 0
        for i in range(0, count, CHUNK):
            done += int(await REBUILD(redis, script_keys, chunk(i)))
            bar.add(min(CHUNK, count - i), f"{kind} {done:,}/{count:,}")
        bar.clear()
        say(f"wrote {done} {kind}")
    for i in range(0, max(len(tenants), 1), CHUNK):
        done, held = await restore_schedules(
            redis, settings, now(), tenants=tenants[i:i + CHUNK],
            paused=paused if i + CHUNK >= len(tenants) else (), version=schedule_version)
        report.tenants += done
        report.paused_schedules += held
    report.tenants_skipped = len(tenants) - report.tenants
    say(f"wrote {report.tenants} tenants, {report.paused_schedules} paused schedules"
        + (f" ({report.tenants_skipped} tenants left out: plan no longer configured)"
           if report.tenants_skipped else ""))
    async with pg.acquire() as conn:
        report.billed = int((await conn.execute(BILL_MISSING_SQL)).split()[-1])
    if report.billed:
        say(f"billed {report.billed} closed allocations the ledger lacked")
    epoch = await mark_state(redis, keys, by="rebuild", now_ms=clock.now_ms())
    say(f"state marker written (epoch {epoch})")
    say("rebuild done" + (f"; {report.overdue} allocations expire at the next timer tick"
                          if report.overdue else ""))
    return report


async def recover(settings: Settings) -> None:
    """What `devsched up` and `devsched run` run after migrating, so that the workers find
    a live state with its marker (stages/state.py):

    - the marker is there: nothing to do;
    - PostgreSQL holds no state: mark the state as it is (a new install, or one made
      before markers existed with nothing in PostgreSQL yet);
    - else Redis holds no live state (it came back empty), a rebuild was cut short (the
      marker says ``rebuilding``), or Redis holds a state made before markers existed:
      rebuild it from PostgreSQL.

    A rebuild it cannot run (changes not yet persisted) is :class:`RecoveryError`."""
    keys = Keys(settings.prefix)
    redis = redis_client(settings)
    pg = await pg_pool(settings)
    clock = SystemClock()

    def say(line: str) -> None:
        print(f"rebuild: {line}", flush=True)

    try:
        marker = await read_marker(redis, keys)
        if "epoch" in marker:
            return
        pg_state = await database_has_state(pg)
        redis_state = await live_state_present(redis, keys)
        if not pg_state:  # nothing to bring back, nothing to compare with
            await mark_state(redis, keys, by="up", now_ms=clock.now_ms())
            return
        if "rebuilding" in marker:
            print("a rebuild was cut short: running it again", flush=True)
        elif redis_state:
            print("Redis holds live state but no state marker: rebuilding it from PostgreSQL",
                  flush=True)
        else:
            print("Redis holds no live state and PostgreSQL does: rebuilding it", flush=True)
        try:
            await rebuild(redis, keys, pg, settings, clock, force=True, progress=say)
        except BacklogPending as exc:
            raise RecoveryError(str(exc)) from exc
    finally:
        await pg.close()
        await redis.aclose()
