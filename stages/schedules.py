"""schedules: periodic work per tenant on a few global interval schedules (SPEC E1-E6).

Instead of one timer per tenant, each *kind* of work (:data:`KINDS`: ``interim_metering``,
``usage_report``) has one global schedule per interval *tier*; a tenant's plan names its
tier (DEVSCHED_PLAN_INTERVALS, by default basic 24h, standard 6h, premium 1h, enterprise
15m), an override (``devsched schedules override``) a custom interval until it expires.
A schedule holds batches of at most DEVSCHED_SCHEDULE_BATCH_CAPACITY tenants, each with
its own start offset (batch n: n x DEVSCHED_SCHEDULE_STAGGER_S after the period
boundary), so batches do not all fire together. The live state is in Redis under the
hash tag ``{sched}``, changed only by ``stages/lua/schedules.lua``, whose calls are
atomic: a tenant is in exactly one batch per kind while registered (a plan change moves
it in one call), a batch is claimed at most once per period across any number of timers
workers (its next run moves in the claiming step).

Runs: the tracked job ``schedules`` (stages/jobs.py, every tick) claims the due batches
and runs each one; every batch run has an execution record in ``job_executions``
(``job_name`` ``schedule:<batch>``). Each tenant of the batch is run on its own:

* ``interim_metering``: every active allocation of the tenant (PostgreSQL names the
  candidates, the allocation's hash in Redis confirms it is still active, read after
  the run's time T was taken) gets an interim ledger row covering its whole seconds
  from the end of its last interim row to T. The row is written under an exclusive
  advisory lock that bill's final-row statement takes shared (:data:`LEDGER_LOCK`): a
  final row already there stops the interim row, and the final row bills only what the
  interim rows have not (stages/bill.py), so the rows of an allocation add up to its
  exact length in seconds. The tenant's unexported interim rows are then handed to the
  billing export (its input stream ``<prefix>:sink:export:replay``) as usage entries
  with ``kind`` ``interim`` and their own ``entry_id``.
* ``usage_report``: one ``usage_reports`` row per pool the tenant used in the period and
  a total row (pool ``*``): devices used, allocations, device-seconds (the overlap of each
  allocation with the period). Keyed by (tenant, period end, pool): a re-run writes
  nothing new.

A tenant whose run fails enters the retry queue (one entry per tenant and kind), retried
after DEVSCHED_SCHEDULE_RETRY_BACKOFF_S x DEVSCHED_SCHEDULE_RETRY_FACTOR^tries (5, 15, 45
minutes), and after DEVSCHED_SCHEDULE_MAX_RETRIES failed retries is permanently failed
with its last error (``devsched schedules failed``; ``devsched schedules retry`` puts one
back). Both kinds are idempotent, so a retried or re-run tenant is safe.

A batch claim held past DEVSCHED_JOB_TIMEOUT_S belongs to a worker that died: the next
tick records it failed and runs the batch again for the same period (its usage report is
not missed), once; if that re-run dies too, the batch's tenants go to the retry queue for
that period. Each tenant change (and a schedule's pause or resume) is written behind
through the changes stream (TenantChange, ScheduleChange; the ``tenants`` and
``schedule_state`` tables), so ``devsched rebuild`` restores the registry: each tenant is
placed anew in its schedules' batches (:func:`restore`).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
from redis.asyncio import Redis

from pipeline.connections import text
from schemas.keys import GROUP_EVENTS, GROUP_EXPORT, Keys
from schemas.messages import UsageEntry
from schemas.rows import (
    BatchClaim,
    BatchFinish,
    BatchRenew,
    PlanTier,
    RetryClaim,
    RetryFinish,
    ScheduleControl,
    ScheduleRestore,
    SchedulesCall,
    SchedulesKeys,
    TenantFailure,
    TenantOp,
    TenantOverride,
    TenantRecord,
)
from schemas.schedules import ScheduleDump
from stages import metrics
from stages.context import StageContext
from stages.scripts import SCHEDULES
from stages.settings import Settings

log = logging.getLogger("devsched.schedules")

KINDS: tuple[str, ...] = ("interim_metering", "usage_report")
"""The kinds of periodic per-tenant work; one global schedule per kind and tier."""
LEDGER_LOCK = 0x64657673_6C656467
"""Advisory lock of the ledger: interim metering takes it exclusive, bill's final rows
shared, so an interim row and the final row of an allocation never miss each other."""
CLAIM_LIMIT = 100
"""Batches one claim takes (the rest are claimed at the next tick)."""
RETRY_LIMIT = 100
"""Retry items one tick takes."""
HANDOFF_LIMIT = 1_000
"""Unexported interim rows of a tenant handed to the export per run."""
REPLAY_MAXLEN = 100_000
"""Entries kept in the export's input stream (unexported rows are handed again later)."""
CRITICAL_FILL = 0.95
"""A schedule fuller than this is ``critical``."""
ERROR_MAX = 2_000
"""Characters of a tenant's error kept."""

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(raw: str) -> int:
    """``30m``, ``6h``, ``1d``, ``90s`` in milliseconds; anything else is refused."""
    match = _DURATION.match(raw)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {raw!r} (a positive whole number of s, m, h or d)")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def label(ms: int) -> str:
    """A tier's name from its interval, as schedules.lua makes it (``15m``, ``24h``)."""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1_000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def plan_tiers(settings: Settings) -> dict[str, int]:
    """DEVSCHED_PLAN_INTERVALS as plan -> interval ms (a bad value is refused)."""
    tiers: dict[str, int] = {}
    for part in settings.plan_intervals.split(","):
        if not part.strip():
            continue
        plan, sep, duration = part.partition("=")
        if not sep or not plan.strip():
            raise ValueError(f"DEVSCHED_PLAN_INTERVALS: expected plan=duration, got {part!r}")
        tiers[plan.strip()] = parse_duration(duration)
    if not tiers:
        raise ValueError("DEVSCHED_PLAN_INTERVALS names no plan")
    return tiers


def schedule_id(kind: str, interval_ms: int) -> str:
    return f"{kind}:{label(interval_ms)}"


# --- script calls -------------------------------------------------------------------


async def call(redis: Redis, settings: Settings, now_ms: int, **op: Any) -> Any:
    """One call of schedules.lua with the settings every call carries."""
    k = Keys(settings.prefix)
    return await SCHEDULES(redis, SchedulesKeys(tenants=k.sched_tenants, events=k.events,
                                                changes=k.changes),
                           SchedulesCall(
        prefix=settings.prefix, now_ms=now_ms,
        tiers=[PlanTier(plan=p, interval_ms=ms) for p, ms in plan_tiers(settings).items()],
        kinds=list(KINDS), capacity=settings.schedule_batch_capacity,
        stagger_ms=settings.schedule_stagger_s * 1000,
        backoff_ms=settings.schedule_retry_backoff_s * 1000,
        backoff_factor=settings.schedule_retry_factor,
        max_retries=settings.schedule_max_retries, event_ttl_s=settings.idempotency_ttl_s,
        group=GROUP_EVENTS, **op))


async def apply_tenants(redis: Redis, settings: Settings, now_ms: int,
                        ops: Sequence[TenantOp]) -> list[tuple[str, str]]:
    """Apply tenant changes (from the CLI or from events) in one atomic call; returns
    (tenant, status) per op: created, plan_changed, unchanged, deleted, not_found,
    duplicate, stale, unknown_plan."""
    if not ops:
        return []
    out = await call(redis, settings, now_ms, tenants=list(ops))
    return [(text(t), text(s)) for t, s in out]


async def set_override(redis: Redis, settings: Settings, now_ms: int, tenant_id: str,
                       every_ms: int | None, until_ms: int | None) -> bool:
    """Give a tenant a custom interval until ``until_ms`` (None: remove it now); False
    when the tenant is unknown."""
    [status] = await call(redis, settings, now_ms, override=TenantOverride(
        tenant_id=tenant_id, every_ms=every_ms, until_ms=until_ms))
    return text(status) == "ok"


async def dump(redis: Redis, settings: Settings, now_ms: int, *,
               members: bool = True) -> dict[str, Any]:
    """The whole state of the schedules, read in one atomic call, decoded strictly
    (schemas.schedules.ScheduleDump), as plain data."""
    raw = await call(redis, settings, now_ms, dump=True, members=members)
    state: dict[str, Any] = msgspec.to_builtins(_dump_decoder.decode(raw))
    return state


_dump_decoder = msgspec.json.Decoder(ScheduleDump)


async def restore(redis: Redis, settings: Settings, now_ms: int, *,
                  tenants: Sequence[TenantRecord] = (), paused: Sequence[str] = (),
                  version: int = 0) -> tuple[int, int]:
    """Write tenants and paused schedules back from PostgreSQL (devsched rebuild): each
    tenant placed anew in a batch of each kind's schedule of its interval; returns
    (tenants restored, schedules paused). A tenant whose plan is no longer configured
    is left out."""
    done, held = await call(redis, settings, now_ms, restore=ScheduleRestore(
        tenants=list(tenants) or None, paused=list(paused) or None, version=version))
    return int(done), int(held)


def pairs(flat: Any) -> dict[str, str]:
    """A Lua HGETALL (a JSON list, or {} when empty) as a dict."""
    if not isinstance(flat, list):
        return {}
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


def as_list(value: Any) -> list[Any]:
    """cjson encodes an empty Lua table as {}: a list either way."""
    return value if isinstance(value, list) else []


# --- health -------------------------------------------------------------------------


def health_of(fill: float, settings: Settings) -> str:
    if fill > CRITICAL_FILL:
        return "critical"
    if fill > settings.schedule_warning_fill:
        return "warning"
    return "healthy"


def schedule_views(state: Mapping[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """Each schedule as ``schedules list``/``show`` print it, with its health."""
    tiers = plan_tiers(settings)
    cap = settings.schedule_batch_capacity
    views = []
    for sched in as_list(state.get("schedules")):
        h = pairs(sched.get("hash"))
        interval = int(h.get("interval_ms") or 0)
        batches = []
        for b in as_list(sched.get("batches")):
            bh = pairs(b.get("hash"))
            size = int(bh.get("size") or 0)
            batch: dict[str, Any] = {
                "batch": b["ref"], "number": int(b["number"]), "size": size,
                "fill": round(size / cap, 4), "offset_ms": int(bh.get("offset_ms") or 0),
                "next_run_ms": int(bh["next_run_ms"]) if bh.get("next_run_ms") else None,
                "last_run_ms": int(bh["last_run_ms"]) if bh.get("last_run_ms") else None,
                "last_status": bh.get("last_status") or None,
                "running": bh.get("running") or None,
            }
            if "members" in b:
                batch["tenants"] = sorted(as_list(b["members"]))
            batches.append(batch)
        tenants = int(h.get("tenants") or 0)
        fill = tenants / (cap * len(batches)) if batches else 0.0
        nexts = [b["next_run_ms"] for b in batches if b["next_run_ms"] is not None]
        lasts = [b["last_run_ms"] for b in batches if b["last_run_ms"] is not None]
        views.append({
            "schedule": sched["id"], "kind": h.get("kind"), "tier": h.get("tier"),
            "interval_ms": interval,
            "plans": sorted(p for p, ms in tiers.items() if ms == interval),
            "fixed": h.get("fixed") == "1", "paused": h.get("paused") == "1",
            "tenants": tenants, "batch_count": len(batches), "capacity": cap * len(batches),
            "fill": round(fill, 4), "health": health_of(fill, settings),
            "last_run_ms": max(lasts) if lasts else None,
            "next_run_ms": min(nexts) if nexts else None,
            "batches": batches,
        })
    views.sort(key=lambda v: (v["kind"] or "", v["interval_ms"]))
    return views


def retry_views(state: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(waiting retries, permanently failed), as ``schedules failed`` prints them."""
    waiting = []
    for r in as_list(state.get("retry")):
        h = pairs(r.get("hash"))
        waiting.append({"item": r["item"], "kind": h.get("kind"), "tenant_id": h.get("tenant_id"),
                        "tries": int(h.get("tries") or 0), "error": h.get("error"),
                        "due_ms": int(r["due_ms"])})
    failed = sorted(as_list(state.get("failed")),
                    key=lambda f: (f.get("kind", ""), f.get("tenant_id", "")))
    return waiting, failed


def publish_health(state: Mapping[str, Any], settings: Settings) -> None:
    """The schedules' gauges: per schedule fill and health, retry queue, alert."""
    for view in schedule_views(state, settings):
        metrics.SCHEDULE_FILL.labels(view["schedule"]).set(view["fill"])
        metrics.SCHEDULE_HEALTH.labels(view["schedule"]).set(
            {"healthy": 0, "warning": 1, "critical": 2}[view["health"]])
    waiting, failed = retry_views(state)
    metrics.SCHEDULE_RETRY_QUEUE.labels("waiting").set(len(waiting))
    metrics.SCHEDULE_RETRY_QUEUE.labels("failed").set(len(failed))
    metrics.SCHEDULE_RETRY_ALERT.set(
        1 if len(waiting) + len(failed) > settings.schedule_retry_alert else 0)


# --- the work of one tenant ---------------------------------------------------------


ACTIVE_OF_TENANT = """
SELECT id::text FROM device_allocations WHERE tenant_id = $1 AND status = 'allocated'
"""
INSERT_INTERIM = """
INSERT INTO billing_ledger (allocation_id, user_id, tenant_id, device_id, started_at, ended_at,
    duration_seconds, cpu_cores, memory_mb, end_reason, kind, covered_from, covered_to,
    covered_to_s)
SELECT u.id, u.uid, u.tid, u.dev, u.st, u.st + make_interval(secs => u.to_s),
       u.to_s - coalesce(i.s, 0), u.cpu, u.mem, 'interim', 'interim',
       u.st + make_interval(secs => coalesce(i.s, 0)), u.st + make_interval(secs => u.to_s),
       u.to_s
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::int[],
            $7::int[], $8::int[]) AS u(id, uid, tid, dev, st, to_s, cpu, mem)
LEFT JOIN LATERAL (SELECT sum(duration_seconds)::int AS s FROM billing_ledger l
                   WHERE l.allocation_id = u.id AND l.kind = 'interim') i ON TRUE
WHERE u.to_s > coalesce(i.s, 0)
  AND NOT EXISTS (SELECT 1 FROM billing_ledger f WHERE f.allocation_id = u.id AND f.kind = 'final')
ORDER BY u.id
ON CONFLICT (entry_id) DO NOTHING
"""
"""Each allocation's interim row from the end of its last one to the run's time, unless
its final row exists (then the final row bills it all)."""
UNEXPORTED_INTERIM = f"""
SELECT entry_id, allocation_id::text, user_id, tenant_id, device_id, started_at, covered_from,
       covered_to, duration_seconds
FROM billing_ledger
WHERE tenant_id = $1 AND kind = 'interim' AND exported_at IS NULL
ORDER BY covered_to LIMIT {HANDOFF_LIMIT}
"""
USAGE_REPORT = """
INSERT INTO usage_reports (tenant_id, period_start, period_end, pool, devices_used, allocations,
    device_seconds)
SELECT $1, $2, $3, coalesce(pool, '*'), count(DISTINCT device_id), count(*),
       coalesce(sum(seconds), 0)
FROM (SELECT device_id, coalesce(metadata->>'pool', 'default') AS pool,
             greatest(0, floor(extract(epoch FROM
                 least(coalesce(released_at, $3), $3) - greatest(allocated_at, $2))))::bigint
                 AS seconds
      FROM device_allocations
      WHERE tenant_id = $1 AND allocated_at < $3 AND (released_at IS NULL OR released_at > $2)
     ) used
GROUP BY GROUPING SETS ((pool), ())
ON CONFLICT (tenant_id, period_end, pool) DO NOTHING
"""
"""The tenant's usage in [period start, period end): one row per pool and the total
(pool ``*``), written once per period."""

ALLOC_READ = ("status", "allocated_at_ms", "user_id", "device_id", "cpu_cores", "memory_mb")


def _ts(ms: int) -> Any:
    from stages.jobs import ts
    return ts(ms)


async def meter_tenant(ctx: StageContext, tenant_id: str) -> int:
    """Interim ledger rows for the tenant's active allocations up to now, handed to the
    billing export; returns rows written."""
    pg = ctx.pg
    assert pg is not None, "interim metering needs PostgreSQL"
    now = ctx.clock.now_ms()
    async with pg.acquire() as conn:
        ids = [r[0] for r in await conn.fetch(ACTIVE_OF_TENANT, tenant_id)]
    rows = []
    if ids:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for aid in ids:
                pipe.hmget(ctx.keys.allocation(aid), *ALLOC_READ)
            found = await pipe.execute()
        for aid, values in zip(ids, found, strict=True):
            status, at, uid, dev, cpu, mem = (text(v) if v is not None else None for v in values)
            if status != "allocated" or at is None or uid is None or dev is None:
                continue  # closed meanwhile: its final row bills it
            covered = (now - int(at)) // 1000
            if covered > 0:
                rows.append((aid, uid, tenant_id, dev, _ts(int(at)), covered, int(cpu or 0),
                             int(mem or 0)))
    written = 0
    if rows:
        async with pg.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", LEDGER_LOCK)
            status = await conn.execute(INSERT_INTERIM, *[list(col) for col in zip(*rows,
                                                                                 strict=True)])
            written = int(status.split()[-1])
    await hand_to_export(ctx, tenant_id)
    return written


def _ms(value: Any) -> int:
    return int(value.timestamp() * 1000)


async def hand_to_export(ctx: StageContext, tenant_id: str) -> int:
    """The tenant's interim rows not yet accepted by the billing service, as usage
    entries on the export's input stream (sent again until accepted; the service dedupes
    by ``entry_id``). Nothing when the export is off."""
    if not ctx.settings.billing_url or ctx.pg is None:
        return 0
    async with ctx.pg.acquire() as conn:
        rows = await conn.fetch(UNEXPORTED_INTERIM, tenant_id)
    if not rows:
        return 0
    stream = ctx.keys.sink_replay(GROUP_EXPORT)
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for r in rows:
            entry = UsageEntry(
                entry_id=r["entry_id"], kind="interim", allocation_id=r["allocation_id"],
                user_id=r["user_id"], tenant_id=r["tenant_id"], device_id=r["device_id"],
                started_at_ms=_ms(r["started_at"]), ended_at_ms=_ms(r["covered_to"]),
                covered_from_ms=_ms(r["covered_from"]), covered_to_ms=_ms(r["covered_to"]),
                billed_seconds=r["duration_seconds"], reason="interim")
            pipe.xadd(stream, {"d": orjson.dumps(_entry_dict(entry))}, maxlen=REPLAY_MAXLEN,
                      approximate=True)
        await pipe.execute()
    return len(rows)


def _entry_dict(entry: UsageEntry) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(entry)
    return out


async def report_tenant(ctx: StageContext, tenant_id: str, period_start_ms: int,
                        period_end_ms: int) -> int:
    """The tenant's usage report rows of the period; returns rows written."""
    assert ctx.pg is not None, "usage reports need PostgreSQL"
    async with ctx.pg.acquire() as conn:
        status = await conn.execute(USAGE_REPORT, tenant_id, _ts(period_start_ms),
                                    _ts(period_end_ms))
    return int(status.split()[-1])


async def run_tenant(ctx: StageContext, kind: str, tenant_id: str, interval_ms: int,
                     period_end_ms: int) -> int:
    """One tenant's work of ``kind``; raises when it fails."""
    if kind == "interim_metering":
        return await meter_tenant(ctx, tenant_id)
    if kind == "usage_report":
        return await report_tenant(ctx, tenant_id, period_end_ms - interval_ms, period_end_ms)
    raise ValueError(f"unknown schedule kind {kind!r}")


# --- batch runs and retries ---------------------------------------------------------


@dataclass(frozen=True)
class BatchRun:
    batch: str
    schedule: str
    kind: str
    interval_ms: int
    period_end_ms: int
    execution_id: str
    tenants: list[str]


@dataclass(frozen=True)
class BatchOutcome:
    batch: str
    execution_id: str
    status: str
    processed: int
    tenants: int
    failed: list[tuple[str, str]]
    duration_ms: int


async def claim_batches(ctx: StageContext, schedule: str | None = None) -> list[BatchRun]:
    """The due batches this worker claimed (or every batch of ``schedule``, now); a stale
    claim found on the way is recorded failed."""
    from stages.jobs import END, KILLED, _record, ts

    s = ctx.settings
    now = ctx.clock.now_ms()
    prefix = str(uuid.uuid4())[:-4]
    answer = await call(ctx.redis, s, now, claim=BatchClaim(
        execution_prefix=prefix, limit=CLAIM_LIMIT, timeout_ms=s.job_timeout_s * 1000,
        lease_ms=s.job_lease_s * 1000, schedule=schedule))
    runs = []
    for ref, sid, kind, interval, period_end, eid, stale, stale_started, members in answer:
        if text(stale):
            started = int(stale_started)
            metrics.JOB_RUNS.labels("schedule", "failed").inc()
            await _record(ctx, "killed batch", END, _uuid(text(stale)), f"schedule:{text(ref)}",
                          ts(started), ts(now), max(0, now - started), 0, "failed", KILLED, 0,
                          schedule is not None)
        if text(eid):
            runs.append(BatchRun(text(ref), text(sid), text(kind), int(interval),
                                 int(period_end), text(eid), sorted(text(m) for m in members)))
    return runs


def _uuid(execution_id: str) -> uuid.UUID:
    """A batch run's execution id as the uuid of its record (a stable digest)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, execution_id)


async def run_batch(ctx: StageContext, run: BatchRun, *, manual: bool = False) -> BatchOutcome:
    """Run every tenant of a claimed batch, record the run, end the claim; the tenants
    that failed go to the retry queue in the same call that ends it."""
    from stages.jobs import END, START, _record, run_leased, ts

    name = f"schedule:{run.batch}"
    eid = _uuid(run.execution_id)
    started = ctx.clock.now_ms()
    await _record(ctx, f"start {name}", START, eid, name, ts(started), 0, manual)
    t0 = time.monotonic()
    processed, failed = 0, []

    ran: list[str] = []

    async def tenants() -> None:
        nonlocal processed
        for tenant in run.tenants:
            try:
                processed += await run_tenant(ctx, run.kind, tenant, run.interval_ms,
                                              run.period_end_ms)
                ran.append(tenant)
            except Exception as exc:  # noqa: BLE001  the tenant goes to the retry queue
                error = f"{type(exc).__name__}: {exc}"[:ERROR_MAX]
                failed.append((tenant, error))
                log.warning("tenant run failed: %s", error,
                            extra={"tenant_id": tenant, "batch": run.batch})

    async def renew(lease_ms: int) -> bool:
        [outcome] = await call(ctx.redis, ctx.settings, ctx.clock.now_ms(), renew=BatchRenew(
            batch=run.batch, execution_id=run.execution_id, lease_ms=lease_ms))
        return text(outcome) == "ok"

    _, stopped = await run_leased(ctx, name, renew, tenants())
    if stopped:
        # the tenants it did not get to go to the retry queue (when the claim was taken
        # over, the finish below finds it lost and queues nothing: the new run has them)
        seen = set(ran) | {t for t, _ in failed}
        failed += [(t, stopped) for t in run.tenants if t not in seen]
    duration = int((time.monotonic() - t0) * 1000)
    status = "failed" if failed or stopped else "succeeded"
    summary = (f"{len(failed)} of {len(run.tenants)} tenants failed; first: {failed[0][0]}: "
               f"{failed[0][1]}"[:ERROR_MAX] if failed else stopped)
    metrics.JOB_RUNS.labels("schedule", status).inc()
    metrics.SCHEDULE_TENANT_RUNS.labels(run.kind, "succeeded").inc(len(run.tenants) - len(failed))
    metrics.SCHEDULE_TENANT_RUNS.labels(run.kind, "failed").inc(len(failed))
    await _record(ctx, f"end {name}", END, eid, name, ts(started), ts(started + duration),
                  duration, processed, status, summary, 0, manual)
    await call(ctx.redis, ctx.settings, ctx.clock.now_ms(), finish=BatchFinish(
        batch=run.batch, execution_id=run.execution_id, status=status,
        period_end_ms=run.period_end_ms,
        failed=[TenantFailure(tenant_id=t, error=e) for t, e in failed] or None))
    return BatchOutcome(run.batch, run.execution_id, status, processed, len(run.tenants),
                        failed, duration)


async def run_retries(ctx: StageContext, item: str | None = None) -> list[tuple[str, str]]:
    """Run the due retry items (or the one named); returns (item, outcome) with outcome
    ``done``, ``retry`` (backed off) or ``failed`` (permanently)."""
    s = ctx.settings
    token = str(uuid.uuid4())
    taken = await call(ctx.redis, s, ctx.clock.now_ms(), retry_claim=RetryClaim(
        limit=RETRY_LIMIT, lease_ms=s.job_timeout_s * 1000, token=token, item=item))
    tiers = plan_tiers(s)
    out = []
    for name, kind, tenant, _tries, period_end in taken:
        kind_s, tenant_s = text(kind), text(tenant)
        interval = await _interval_of(ctx, tenant_s, tiers)
        error = None
        try:
            await run_tenant(ctx, kind_s, tenant_s, interval, int(period_end))
        except Exception as exc:  # noqa: BLE001  backed off, or permanently failed
            error = f"{type(exc).__name__}: {exc}"[:ERROR_MAX]
            log.warning("tenant retry failed: %s", error, extra={"tenant_id": tenant_s})
        [outcome] = await call(ctx.redis, s, ctx.clock.now_ms(), retry_finish=RetryFinish(
            item=text(name), token=token, status="failed" if error else "succeeded",
            error=error))
        metrics.SCHEDULE_TENANT_RUNS.labels(kind_s, "retried_" + text(outcome)).inc()
        out.append((text(name), text(outcome)))
    return out


async def _interval_of(ctx: StageContext, tenant_id: str, tiers: Mapping[str, int]) -> int:
    plan, every, until = await ctx.redis.hmget(ctx.keys.sched(f"tenant:{tenant_id}"),
                                               "plan", "override_ms", "override_until_ms")
    if every and until and int(until) > ctx.clock.now_ms():
        return int(every)
    return tiers.get(text(plan) if plan else "", min(tiers.values()))


async def run_schedules(ctx: StageContext) -> int:
    """The tracked job ``schedules`` (every tick): run the due batches, then the due
    retries, then publish the health gauges; returns tenants processed."""
    processed = 0
    for run in await claim_batches(ctx):
        outcome = await run_batch(ctx, run)
        processed += outcome.tenants
    processed += len(await run_retries(ctx))
    publish_health(await dump(ctx.redis, ctx.settings, ctx.clock.now_ms(), members=False),
                   ctx.settings)
    return processed


async def control(redis: Redis, settings: Settings, now_ms: int, action: str,
                  schedule: str | None = None, item: str | None = None) -> Any:
    """pause, resume, rebalance (one schedule or all), requeue (a retry item)."""
    return await call(redis, settings, now_ms, control=ScheduleControl(
        action=action, schedule=schedule, item=item))
