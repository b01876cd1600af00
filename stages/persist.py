"""persist: the write-behind. Copies every state change into PostgreSQL in batches.

Per batch, at most one statement per table (arrays unnested into one upsert) in
one transaction, then the acks. Rows only move forward: an upsert applies only
when the incoming ``version`` is newer than the stored one, so a change that
arrives late, twice, or out of order (several persist workers) never overwrites
a newer row; a change may move an allocation to another device
(AllocationReplaced: the row's device_id follows). Device events and user events (DeviceEventApplied, UserEventApplied) carry the
device's or the user's whole record and are written as DeviceUpserted and QuotaSet
are, on the same version sequence (a user event also records the parts of the status
events keep, the event versions and the failed payments counted, for a rebuild). A
request joining or leaving the wait queue (WaiterChange) is kept in
``waiting_requests``, the newest version winning, so a rebuild re-queues the waiting ones.
Reservation changes (ReservationChange) are written to ``reservations`` the same way, by
version, and so are the tenants of the global schedules (TenantChange, to ``tenants``, a
deleted one kept as a row with status ``deleted``) and their pauses (ScheduleChange, to
``schedule_state``), so that a rebuild restores them. Within a batch only the newest change of each
entity is written,
and rows are written in key order: two persist workers whose batches share rows
lock them in the same order, so they wait for each other instead of deadlocking.
While PostgreSQL is down (or aborts a transaction for a retry: a deadlock with
some other writer, a serialization failure) the stage raises Transient: the
worker keeps the batch and retries it whole, and the stream holds the backlog;
nothing is acked before commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import asyncpg
import msgspec

from pipeline.worker import Entry
from schemas.keys import GROUP_PERSIST
from schemas.messages import (
    AllocationChange,
    Change,
    DeviceUpserted,
    QuotaSet,
    ReservationChange,
    ScheduleChange,
    TenantChange,
    UserEventApplied,
    WaiterChange,
    encoder,
)
from stages.changes import decode_changes, pg_batch, ts
from stages.context import StageContext

UPSERT_ALLOCATIONS = """
INSERT INTO device_allocations AS a (id, device_id, user_id, tenant_id, status, allocated_at,
    released_at, expires_at, duration_minutes, duration_seconds, metadata, version, end_reason)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
    $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::int[], $10::int[],
    $11::jsonb[], $12::bigint[], $13::text[]) ORDER BY 1
ON CONFLICT (id) DO UPDATE SET device_id = EXCLUDED.device_id, status = EXCLUDED.status,
    released_at = EXCLUDED.released_at, expires_at = EXCLUDED.expires_at,
    duration_minutes = EXCLUDED.duration_minutes, duration_seconds = EXCLUDED.duration_seconds,
    metadata = COALESCE(a.metadata, '{}'::jsonb) || EXCLUDED.metadata,
    version = EXCLUDED.version, end_reason = EXCLUDED.end_reason
WHERE a.version < EXCLUDED.version
"""

UPSERT_DEVICES = """
INSERT INTO devices AS d (id, name, pool, model, host, adb_host, adb_port, cpu_cores, memory_mb,
    storage_mb, status, version)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::int[], $8::int[], $9::int[], $10::int[], $11::text[], $12::bigint[]) ORDER BY 1
ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, pool = EXCLUDED.pool, model = EXCLUDED.model,
    host = EXCLUDED.host, adb_host = EXCLUDED.adb_host, adb_port = EXCLUDED.adb_port,
    cpu_cores = EXCLUDED.cpu_cores, memory_mb = EXCLUDED.memory_mb,
    storage_mb = EXCLUDED.storage_mb, status = EXCLUDED.status, version = EXCLUDED.version
WHERE d.version < EXCLUDED.version
"""

UPSERT_QUOTAS = """
INSERT INTO user_quotas AS q (user_id, status, expires_at, max_devices, max_cpu_per_device,
    max_memory_mb_per_device, total_cpu_cores, total_memory_gb, total_storage_gb, version,
    user_status, billing_status, user_event_version, billing_event_version, payment_failures,
    payment_failures_until)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int[], $5::int[], $6::int[],
    $7::int[], $8::int[], $9::int[], $10::bigint[], $11::text[], $12::text[], $13::bigint[],
    $14::bigint[], $15::int[], $16::timestamptz[]) ORDER BY 1
ON CONFLICT (user_id) DO UPDATE SET status = EXCLUDED.status, expires_at = EXCLUDED.expires_at,
    max_devices = EXCLUDED.max_devices, max_cpu_per_device = EXCLUDED.max_cpu_per_device,
    max_memory_mb_per_device = EXCLUDED.max_memory_mb_per_device,
    total_cpu_cores = EXCLUDED.total_cpu_cores, total_memory_gb = EXCLUDED.total_memory_gb,
    total_storage_gb = EXCLUDED.total_storage_gb, version = EXCLUDED.version,
    user_status = EXCLUDED.user_status, billing_status = EXCLUDED.billing_status,
    user_event_version = COALESCE(EXCLUDED.user_event_version, q.user_event_version),
    billing_event_version = COALESCE(EXCLUDED.billing_event_version, q.billing_event_version),
    payment_failures = COALESCE(EXCLUDED.payment_failures, q.payment_failures),
    payment_failures_until = CASE WHEN EXCLUDED.payment_failures IS NULL
        THEN q.payment_failures_until ELSE EXCLUDED.payment_failures_until END
WHERE q.version < EXCLUDED.version
"""
"""A quota set by command (QuotaSet) clears the two status parts (as admin.lua does in
Redis) and keeps the event versions and the payment-failure count (NULL in the arrays);
a user event (UserEventApplied) writes them all."""

UPSERT_WAITERS = """
INSERT INTO waiting_requests AS w (user_id, request_id, status, version, reason, queue_score,
    queued_at, wait_until, request)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],
    $6::bigint[], $7::timestamptz[], $8::timestamptz[], $9::jsonb[]) ORDER BY 1, 2
ON CONFLICT (user_id, request_id) DO UPDATE SET status = EXCLUDED.status,
    version = EXCLUDED.version, reason = EXCLUDED.reason, queue_score = EXCLUDED.queue_score,
    queued_at = EXCLUDED.queued_at, wait_until = EXCLUDED.wait_until,
    request = EXCLUDED.request, updated_at = NOW()
WHERE w.version < EXCLUDED.version
"""


UPSERT_RESERVATIONS = """
INSERT INTO reservations AS r (id, request_id, user_id, tenant_id, device_id, pool, start_at,
    end_at, status, allocation_id, reason, created_at, claimed_at, claim_by, ended_at, version)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::timestamptz[], $8::timestamptz[], $9::text[], $10::uuid[], $11::text[],
    $12::timestamptz[], $13::timestamptz[], $14::timestamptz[], $15::timestamptz[],
    $16::bigint[]) ORDER BY 1
ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status,
    allocation_id = EXCLUDED.allocation_id, reason = EXCLUDED.reason,
    claimed_at = EXCLUDED.claimed_at, claim_by = EXCLUDED.claim_by,
    ended_at = EXCLUDED.ended_at, version = EXCLUDED.version
WHERE r.version < EXCLUDED.version
"""


UPSERT_TENANTS = """
INSERT INTO tenants AS t (tenant_id, status, plan, override_ms, override_until, event_version,
    created_at, last_action, version, changed_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[],
    $6::bigint[], $7::timestamptz[], $8::text[], $9::bigint[], $10::timestamptz[]) ORDER BY 1
ON CONFLICT (tenant_id) DO UPDATE SET status = EXCLUDED.status,
    plan = COALESCE(EXCLUDED.plan, t.plan), override_ms = EXCLUDED.override_ms,
    override_until = EXCLUDED.override_until,
    event_version = COALESCE(EXCLUDED.event_version, t.event_version),
    created_at = COALESCE(EXCLUDED.created_at, t.created_at),
    last_action = EXCLUDED.last_action, version = EXCLUDED.version,
    changed_at = EXCLUDED.changed_at
WHERE t.version < EXCLUDED.version
"""
"""A deleted tenant keeps its last plan (and event version) in its row."""

UPSERT_SCHEDULE_STATE = """
INSERT INTO schedule_state AS s (schedule_id, paused, version, changed_at)
SELECT * FROM unnest($1::text[], $2::bool[], $3::bigint[], $4::timestamptz[]) ORDER BY 1
ON CONFLICT (schedule_id) DO UPDATE SET paused = EXCLUDED.paused, version = EXCLUDED.version,
    changed_at = EXCLUDED.changed_at
WHERE s.version < EXCLUDED.version
"""


def metadata(change: AllocationChange, asked: AllocationChange | None = None) -> str:
    """The row's ``metadata``: the request id, pool and size, ``replace_on_failure``
    when set, and what the request asked (``min_cpu_cores``, ``min_memory_mb``,
    ``requested_model``) when the change carries it. Merged into the stored one (a later change that leaves a key out keeps it)."""
    meta: dict[str, object] = {"request_id": change.request_id, "pool": change.pool,
                               "cpu_cores": change.cpu_cores, "memory_mb": change.memory_mb,
                               "storage_mb": change.storage_mb}
    if change.replace_on_failure:
        meta["replace_on_failure"] = True
    asked = asked or change  # the change that made it, when the batch also closed it
    if asked.min_cpu_cores is not None:
        meta["min_cpu_cores"] = asked.min_cpu_cores
        meta["min_memory_mb"] = asked.min_memory_mb
    if asked.requested_model:
        meta["requested_model"] = asked.requested_model
    return msgspec.json.encode(meta).decode()


Versioned = TypeVar("Versioned", AllocationChange, DeviceUpserted, QuotaSet, WaiterChange,
                    ReservationChange, TenantChange, ScheduleChange)


def newest(items: dict[str, Versioned], key: str, item: Versioned) -> None:
    old = items.get(key)
    if old is None or old.version < item.version:
        items[key] = item


async def write_changes(conn: asyncpg.Connection, changes: Sequence[Change]) -> None:
    allocs: dict[str, AllocationChange] = {}
    asked: dict[str, AllocationChange] = {}
    devices: dict[str, DeviceUpserted] = {}
    quotas: dict[str, QuotaSet] = {}
    waiters: dict[str, WaiterChange] = {}
    reservations: dict[str, ReservationChange] = {}
    tenants: dict[str, TenantChange] = {}
    schedules: dict[str, ScheduleChange] = {}
    for c in changes:
        if isinstance(c, AllocationChange):
            newest(allocs, c.allocation_id, c)
            if c.min_cpu_cores is not None:
                asked[c.allocation_id] = c
        elif isinstance(c, DeviceUpserted):
            newest(devices, c.device_id, c)
        elif isinstance(c, QuotaSet):
            newest(quotas, c.user_id, c)
        elif isinstance(c, WaiterChange):
            newest(waiters, f"{c.user_id} {c.request_id}", c)
        elif isinstance(c, ReservationChange):
            newest(reservations, c.reservation_id, c)
        elif isinstance(c, TenantChange):
            newest(tenants, c.tenant_id, c)
        elif isinstance(c, ScheduleChange):
            newest(schedules, c.schedule_id, c)
    if allocs:
        rows = list(allocs.values())
        await conn.execute(
            UPSERT_ALLOCATIONS,
            [r.allocation_id for r in rows], [r.device_id for r in rows], [r.user_id for r in rows],
            [r.tenant_id for r in rows], [r.status for r in rows],
            [ts(r.allocated_at_ms) for r in rows], [ts(r.released_at_ms) for r in rows],
            [ts(r.expires_at_ms) for r in rows], [r.duration_minutes for r in rows],
            [r.duration_seconds for r in rows],
            [metadata(r, asked.get(r.allocation_id)) for r in rows],
            [r.version for r in rows], [r.reason for r in rows],
        )
    if devices:
        ds = list(devices.values())
        await conn.execute(
            UPSERT_DEVICES,
            [d.device_id for d in ds], [d.name for d in ds], [d.pool for d in ds],
            [d.model for d in ds], [d.host for d in ds], [d.adb_host for d in ds],
            [d.adb_port for d in ds], [d.cpu_cores for d in ds], [d.memory_mb for d in ds],
            [d.storage_mb for d in ds], [d.status for d in ds], [d.version for d in ds],
        )
    if quotas:
        qs = list(quotas.values())
        await conn.execute(
            UPSERT_QUOTAS,
            [q.user_id for q in qs], [q.status for q in qs], [ts(q.expires_at_ms) for q in qs],
            [q.max_devices for q in qs], [q.max_cpu_per_device for q in qs],
            [q.max_memory_mb_per_device for q in qs], [q.total_cpu_cores for q in qs],
            [q.total_memory_gb for q in qs], [q.total_storage_gb for q in qs],
            [q.version for q in qs], *_event_parts(qs),
        )
    if waiters:
        ws = list(waiters.values())
        await conn.execute(
            UPSERT_WAITERS,
            [w.user_id for w in ws], [w.request_id for w in ws], [w.status for w in ws],
            [w.version for w in ws], [w.reason for w in ws], [w.queue_score for w in ws],
            [ts(w.queued_at_ms) for w in ws], [ts(w.wait_until_ms) for w in ws],
            [encoder.encode(w).decode() for w in ws],
        )
    if reservations:
        await write_reservations(conn, list(reservations.values()))
    if tenants:
        ts_ = list(tenants.values())
        await conn.execute(
            UPSERT_TENANTS,
            [t.tenant_id for t in ts_], [t.status for t in ts_], [t.plan for t in ts_],
            [t.override_ms for t in ts_], [ts(t.override_until_ms) for t in ts_],
            [t.event_version for t in ts_], [ts(t.created_at_ms) for t in ts_],
            [t.action for t in ts_], [t.version for t in ts_], [ts(t.at_ms) for t in ts_],
        )
    if schedules:
        ss = list(schedules.values())
        await conn.execute(
            UPSERT_SCHEDULE_STATE,
            [s.schedule_id for s in ss], [s.paused for s in ss], [s.version for s in ss],
            [ts(s.at_ms) for s in ss],
        )


def _event_parts(qs: Sequence[QuotaSet]) -> tuple[list[object], ...]:
    """The columns of UPSERT_QUOTAS that only a user event sets (NULL for a QuotaSet)."""
    ev = [q if isinstance(q, UserEventApplied) else None for q in qs]
    return ([e and e.user_status for e in ev], [e and e.billing_status for e in ev],
            [e and e.user_event_version for e in ev], [e and e.billing_event_version for e in ev],
            [None if e is None else e.payment_failures for e in ev],
            [None if e is None else ts(e.payment_failures_until_ms) for e in ev])


async def write_reservations(conn: asyncpg.Connection, rs: list[ReservationChange]) -> None:
    """The newest change of each reservation, as its row (UPSERT_RESERVATIONS)."""
    await conn.execute(
        UPSERT_RESERVATIONS,
        [r.reservation_id for r in rs], [r.request_id for r in rs], [r.user_id for r in rs],
        [r.tenant_id for r in rs], [r.device_id for r in rs], [r.pool for r in rs],
        [ts(r.start_ms) for r in rs], [ts(r.end_ms) for r in rs], [r.status for r in rs],
        [r.allocation_id for r in rs], [r.reason for r in rs], [ts(r.created_at_ms) for r in rs],
        [ts(r.claimed_at_ms) for r in rs], [ts(r.claim_by_ms) for r in rs],
        [ts(r.ended_at_ms) for r in rs], [r.version for r in rs],
    )


class PersistStage:
    group = GROUP_PERSIST

    def __init__(self, ctx: StageContext) -> None:
        assert ctx.pg is not None, "persist needs PostgreSQL"
        self.ctx = ctx
        self.pg = ctx.pg
        self.batching = ctx.write_behind
        self.streams = [ctx.keys.changes]

    async def handle(self, entries: Sequence[Entry]) -> None:
        changes = decode_changes(entries)
        async with pg_batch(self.pg) as conn:
            await write_changes(conn, changes)
        await self.ctx.redis.xack(self.streams[0], self.group, *[e.id for e in entries])
