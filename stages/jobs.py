"""Tracked timer jobs: the registry, one run of a job, and its record.

Each tick the timers stage asks :func:`run_due` to run what is due. The decision is
jobs.lua's (one call for every job): a job is claimed at most once per period, so any
number of timers workers handling the same tick, or a redelivered tick, run it once.
The claim carries a deadline (start + the job's timeout); a claim found past it is
a run whose worker died: its execution is recorded ``failed`` and the job retried
under a new claim, up to its max retries. A run that raises or outlives its timeout
is ``failed`` and retried at the next tick, up to the same bound. Every job is
idempotent (expiring closes only what is still open, a snapshot is keyed by its
period, a purge deletes only what is past the retention: closed allocations, requests
that left the queue and ended reservations after DEVSCHED_PURGE_RETENTION_DAYS, usage
reports after DEVSCHED_USAGE_REPORT_RETENTION_DAYS), so a retried run is safe.

The record: ``job_executions`` gets a ``running`` row when a run starts and its end
(duration, processed count, status, error) when it ends; ``job_info`` the job's
state after each run. The live state (next run, paused, interval, the claim) is in
Redis (``Keys.job``); PostgreSQL only records it. A job that needs only Redis
(expire, trim) runs while PostgreSQL is down: its record is then lost, with a
warning in the log (the effect is not). Executions are kept
``DEVSCHED_JOB_HISTORY_RETENTION_DAYS`` days and at most
``DEVSCHED_JOB_HISTORY_MAX_PER_JOB`` per job (the ``prune_history`` job).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from pipeline.connections import REDIS_DOWN, text
from pipeline.trim import trim
from schemas.messages import JobRunResult
from schemas.rows import (
    ExpireCall,
    ExpireKeys,
    JobClaim,
    JobControl,
    JobFinish,
    JobRenew,
    JobsCall,
    JobsKeys,
)
from stages import metrics
from stages.context import StageContext
from stages.reservations import activate_reservations, cancel_no_shows, complete_reservations
from stages.scripts import EXPIRE
from stages.scripts import JOBS as JOBS_LUA
from stages.settings import Settings
from stages.smart import refresh_model

log = logging.getLogger("devsched.jobs")

PG_DOWN: tuple[type[BaseException], ...] = (asyncpg.PostgresError, asyncpg.InterfaceError,
                                            OSError)
"""What a write of a job's record may raise while PostgreSQL is unavailable."""
PURGE_BATCH = 10_000
"""Rows one purge statement deletes (a purge repeats until fewer are left)."""
ERROR_MAX = 2_000
"""Characters of a run's error kept."""
T = TypeVar("T")

KILLED = "worker died: still running past its timeout"
END_BACKOFF_S = (0.05, 2.0)
"""The first and the longest pause between two tries to end a claim while Redis is away
(a restart, a failover); it tries for a lease (``DEVSCHED_JOB_LEASE_S``): past it the
claim is stale anyway. A claim left behind holds the job off until it goes stale, and
an expire held off leaves ended allocations open."""
"""The error of a run found holding its claim past the deadline."""


@dataclass(frozen=True)
class Job:
    """One tracked job: what it runs and its default interval (the live interval is in
    Redis once the job was first seen; ``devsched jobs set-interval`` changes it)."""

    name: str
    run: Callable[[StageContext], Awaitable[int]]
    """Does the work; returns how many things it handled."""
    default_interval_ms: Callable[[Settings], int]
    description: str
    starts_now: bool = False
    """First run at once (expire); otherwise at the end of the first interval."""

    def first_run_ms(self, settings: Settings, now_ms: int) -> int:
        if self.starts_now:
            return now_ms
        interval = self.default_interval_ms(settings)
        return now_ms // interval * interval + interval


# --- the jobs -----------------------------------------------------------------------


async def expire_due(ctx: StageContext) -> int:
    """End every wait of the queue that is over (``timed_out``) and close every allocation
    whose expires-at has passed; returns how many allocations."""
    s = ctx.settings
    total = 0
    while True:
        count, seen, closed, late = await EXPIRE(ctx.redis, ExpireKeys(changes=ctx.keys.changes),
                                           ExpireCall(prefix=s.prefix, now_ms=ctx.clock.now_ms(),
                                                      limit=s.expire_batch,
                                                      released_ttl_s=s.released_ttl_s))
        total += int(count)
        if log.isEnabledFor(logging.INFO):
            for i in range(0, len(closed), 3):
                log.info("allocation expired", extra={
                    "allocation_id": text(closed[i]), "user_id": text(closed[i + 1]),
                    "device_id": text(closed[i + 2])})
        if int(seen) < s.expire_batch and int(late) < s.expire_batch:
            break
    if total:
        metrics.AUTO_RELEASE.labels("expired").inc(total)
    return total


async def trim_streams(ctx: StageContext) -> int:
    """Trim every stream below what all its groups have acked; returns entries removed."""
    k = ctx.keys
    removed = 0
    for stream in (k.requests, k.admitted, k.changes, k.ticks, k.job_requests, k.events,
                   k.notifications, k.dead):
        removed += await trim(ctx.redis, stream)
    return removed


def _pg(ctx: StageContext) -> asyncpg.Pool:
    if ctx.pg is None:
        raise RuntimeError("this job needs PostgreSQL")
    return ctx.pg


def ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


async def stats_snapshot(ctx: StageContext) -> int:
    """Write the statistics of the live state as the row of the current snapshot period
    (its start); a second run in the same period writes nothing. Returns rows written."""
    from stages.tools.admin import stats

    state = await ctx.redis.hget(ctx.keys.job("stats_snapshot"), "interval_ms")
    interval = int(state) if state else 3_600_000
    taken = ctx.clock.now_ms() // interval * interval
    s = await stats(ctx.redis, ctx.keys)
    async with _pg(ctx).acquire() as conn:
        status = await conn.execute(
            "INSERT INTO stats_snapshots (taken_at, devices, free, active, allocated_total,"
            " released_total, expired_total) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (taken_at) DO NOTHING",
            ts(taken), s.devices, s.free, s.active, s.allocated_total, s.released_total,
            s.expired_total)
    return int(status.split()[-1])


PURGE_ALLOCATIONS = f"""
DELETE FROM device_allocations WHERE id IN (
    SELECT id FROM device_allocations
    WHERE status IN ('released', 'expired') AND released_at IS NOT NULL AND released_at < $1
    LIMIT {PURGE_BATCH})
"""
"""Closed allocations past the retention; an active one (status allocated) never."""


PURGE_WAITERS = f"""
DELETE FROM waiting_requests WHERE (user_id, request_id) IN (
    SELECT user_id, request_id FROM waiting_requests
    WHERE status = 'left' AND wait_until < $1 LIMIT {PURGE_BATCH})
"""
"""Requests that left the wait queue past the retention (their wait would have ended by
then: the time is the changes', as for allocations); a waiting one never."""


PURGE_RESERVATIONS = f"""
DELETE FROM reservations WHERE id IN (
    SELECT id FROM reservations
    WHERE status IN ('completed', 'cancelled', 'no_show')
      AND coalesce(ended_at, end_at) < $1
    LIMIT {PURGE_BATCH})
"""
"""Ended reservations (completed, cancelled, no_show) past the retention, by when they
ended; a booked or active one never."""


PURGE_USAGE_REPORTS = f"""
DELETE FROM usage_reports WHERE (tenant_id, period_end, pool) IN (
    SELECT tenant_id, period_end, pool FROM usage_reports WHERE period_end < $1
    LIMIT {PURGE_BATCH})
"""
"""Usage reports whose period ended before DEVSCHED_USAGE_REPORT_RETENTION_DAYS."""


async def purge(ctx: StageContext) -> int:
    """Delete released/expired allocation rows that ended, rows of requests that left the
    wait queue, and ended reservations (completed, cancelled, no_show), more than
    DEVSCHED_PURGE_RETENTION_DAYS ago (never an active allocation, a waiting request nor
    a booked or active reservation), and usage reports whose period ended more than
    DEVSCHED_USAGE_REPORT_RETENTION_DAYS ago; returns rows deleted."""
    now = ctx.clock.now_ms()
    cutoff = ts(now - ctx.settings.purge_retention_days * 86_400_000)
    reports_cutoff = ts(now - ctx.settings.usage_report_retention_days * 86_400_000)
    total = 0
    async with _pg(ctx).acquire() as conn:
        for statement, before in ((PURGE_ALLOCATIONS, cutoff), (PURGE_WAITERS, cutoff),
                                  (PURGE_RESERVATIONS, cutoff),
                                  (PURGE_USAGE_REPORTS, reports_cutoff)):
            while True:
                n = int((await conn.execute(statement, before)).split()[-1])
                total += n
                if n < PURGE_BATCH:
                    break
    return total


PRUNE_OLD = "DELETE FROM job_executions WHERE status <> 'running' AND ended_at < $1"
"""Finished executions past the retention."""
PRUNE_BEYOND = """
DELETE FROM job_executions e USING (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY job_name ORDER BY started_at DESC) AS n
        FROM job_executions WHERE status <> 'running') ranked
    WHERE n > $1) beyond
WHERE e.id = beyond.id
"""
"""Each job's finished executions beyond the newest N."""


async def prune_history(ctx: StageContext) -> int:
    """Keep each job's finished executions for the retention and at most the maximum
    count (the newest); returns rows deleted."""
    s = ctx.settings
    cutoff = ts(ctx.clock.now_ms() - s.job_history_retention_days * 86_400_000)
    async with _pg(ctx).acquire() as conn:
        old = int((await conn.execute(PRUNE_OLD, cutoff)).split()[-1])
        beyond = int((await conn.execute(PRUNE_BEYOND, s.job_history_max_per_job)).split()[-1])
    return old + beyond


async def run_schedules(ctx: StageContext) -> int:
    """The global interval schedules' due batches and retries (stages/schedules.py)."""
    from stages.schedules import run_schedules as run

    return await run(ctx)


JOBS: Mapping[str, Job] = {j.name: j for j in (
    Job("expire", expire_due, lambda s: s.tick_ms,
        "close the allocations past their expires-at (every tick)", starts_now=True),
    Job("activate_reservations", activate_reservations, lambda s: s.tick_ms,
        "turn the reservations whose start came into allocations (every tick)", starts_now=True),
    Job("cancel_no_shows", cancel_no_shows, lambda s: s.tick_ms,
        "end the reservations not claimed within DEVSCHED_RESERVATION_GRACE_S (every tick)",
        starts_now=True),
    Job("complete_reservations", complete_reservations, lambda s: s.tick_ms,
        "complete the reservations whose allocation ended (every tick)", starts_now=True),
    Job("trim", trim_streams, lambda s: s.tick_ms * s.trim_every_ticks,
        "trim the streams below what every group acked"),
    Job("stats_snapshot", stats_snapshot, lambda s: 3_600_000,
        "write the live statistics to stats_snapshots (hourly)"),
    Job("purge", purge, lambda s: 86_400_000,
        "delete closed allocation and reservation rows older than"
        " DEVSCHED_PURGE_RETENTION_DAYS, usage reports older than"
        " DEVSCHED_USAGE_REPORT_RETENTION_DAYS (daily)"),
    Job("prune_history", prune_history, lambda s: 600_000,
        "keep job executions within their retention and maximum count"),
    Job("schedules", run_schedules, lambda s: s.tick_ms,
        "run the due batches of the global schedules and the tenants' retries (every tick)",
        starts_now=True),
    Job("refresh_model", refresh_model, lambda s: 600_000,
        "recompute the smart strategy's model from PostgreSQL's history (stages/smart.py)"),
)}
"""Every tracked job, in the order a tick claims them (they then run together)."""


# --- a run and its record -----------------------------------------------------------


@dataclass(frozen=True)
class RunOutcome:
    job: str
    execution_id: str
    started_ms: int
    status: str
    processed: int
    error: str | None
    duration_ms: int


def claim_of(job: Job, settings: Settings, now_ms: int, *, manual: bool = False) -> JobClaim:
    return JobClaim(name=job.name, execution_id=str(uuid.uuid4()),
                    interval_ms=job.default_interval_ms(settings),
                    first_run_ms=job.first_run_ms(settings, now_ms),
                    max_retries=settings.job_max_retries,
                    timeout_ms=settings.job_timeout_s * 1000,
                    lease_ms=settings.job_lease_s * 1000, manual=manual)


def control_of(job: Job, settings: Settings, now_ms: int, action: str,
               interval_ms: int | None = None) -> JobControl:
    return JobControl(name=job.name, action=action,
                      default_interval_ms=job.default_interval_ms(settings),
                      first_run_ms=job.first_run_ms(settings, now_ms),
                      max_retries=settings.job_max_retries,
                      timeout_ms=settings.job_timeout_s * 1000, interval_ms=interval_ms)


def hash_of(flat: Sequence[Any]) -> dict[str, str]:
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


async def _record(ctx: StageContext, what: str, sql: str, *args: object) -> None:
    """One write of the record; with PostgreSQL away it is lost, with a warning."""
    if ctx.pg is None:
        return
    try:
        async with ctx.pg.acquire() as conn:
            await conn.execute(sql, *args)
    except PG_DOWN as exc:
        log.warning("job record not written (%s): %s", what, exc)


START = ("INSERT INTO job_executions (id, job_name, started_at, status, attempt, manual)"
         " VALUES ($1, $2, $3, 'running', $4, $5) ON CONFLICT (id) DO NOTHING")
END = ("INSERT INTO job_executions (id, job_name, started_at, ended_at, duration_ms,"
       " processed_count, status, error, attempt, manual)"
       " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
       " ON CONFLICT (id) DO UPDATE SET ended_at = EXCLUDED.ended_at,"
       " duration_ms = EXCLUDED.duration_ms, processed_count = EXCLUDED.processed_count,"
       " status = EXCLUDED.status, error = EXCLUDED.error"
       " WHERE job_executions.status = 'running'")
INFO = ("INSERT INTO job_info (name, interval_ms, enabled, status, last_run_at, next_run_at,"
        " retries, max_retries, timeout_ms, updated_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NOW())"
        " ON CONFLICT (name) DO UPDATE SET interval_ms = EXCLUDED.interval_ms,"
        " enabled = EXCLUDED.enabled, status = EXCLUDED.status,"
        " last_run_at = EXCLUDED.last_run_at, next_run_at = EXCLUDED.next_run_at,"
        " retries = EXCLUDED.retries, max_retries = EXCLUDED.max_retries,"
        " timeout_ms = EXCLUDED.timeout_ms, updated_at = NOW()")


def _opt_ts(value: str | None) -> datetime | None:
    return ts(int(value)) if value else None


async def record_info(ctx: StageContext, name: str, state: Mapping[str, str]) -> None:
    """Write the job's state (its Redis hash) to job_info."""
    await _record(ctx, f"job_info {name}", INFO, name, int(state["interval_ms"]),
                  state.get("paused") != "1", state.get("status", "idle"),
                  _opt_ts(state.get("last_run_ms")), _opt_ts(state.get("next_run_ms")),
                  int(state.get("retries") or 0), int(state["max_retries"]),
                  int(state["timeout_ms"]))


async def record_killed(ctx: StageContext, name: str, execution_id: str,
                        started_ms: int) -> None:
    """The run ``execution_id`` held its claim past its deadline: recorded failed."""
    now = ctx.clock.now_ms()
    log.warning("job run found dead: recorded failed",
                extra={"job": name, "execution_id": execution_id})
    metrics.JOB_RUNS.labels(name, "failed").inc()
    await _record(ctx, f"killed {name}", END, uuid.UUID(execution_id), name, ts(started_ms),
                  ts(now), max(0, now - started_ms), 0, "failed", KILLED, 0, False)


async def execute(ctx: StageContext, job: Job, execution_id: str, attempt: int,
                  manual: bool) -> RunOutcome:
    """Run ``job`` under the claim ``execution_id`` (taken by jobs.lua), record it, and
    end the claim."""
    started = ctx.clock.now_ms()
    eid = uuid.UUID(execution_id)
    await _record(ctx, f"start {job.name}", START, eid, job.name, ts(started), attempt, manual)
    t0 = time.monotonic()
    processed, error = 0, None

    async def renew(lease_ms: int) -> bool:
        [outcome] = await jobs_script(ctx, JobsCall(
            prefix=ctx.settings.prefix, now_ms=ctx.clock.now_ms(),
            renew=JobRenew(name=job.name, execution_id=execution_id, lease_ms=lease_ms)))
        return text(outcome) == "ok"

    try:
        done, error = await run_leased(ctx, job.name, renew, job.run(ctx))
        processed, status = done or 0, "failed" if error else "succeeded"
    except Exception as exc:  # noqa: BLE001  the run failed: recorded and retried
        status, error = "failed", f"{type(exc).__name__}: {exc}"[:ERROR_MAX]
        log.warning("job run failed: %s", error, extra={"job": job.name})
    duration = int((time.monotonic() - t0) * 1000)
    metrics.JOB_RUNS.labels(job.name, status).inc()
    await _record(ctx, f"end {job.name}", END, eid, job.name, ts(started),
                  ts(started + duration), duration, processed, status, error, attempt, manual)
    ended = await end_claim(ctx, JobFinish(name=job.name, execution_id=execution_id,
                                           status=status))
    if ended is not None and text(ended[0]) == "ok":
        await record_info(ctx, job.name, hash_of(ended[1]))
    return RunOutcome(job.name, execution_id, started, status, processed, error, duration)


async def hold_lease(ctx: StageContext, name: str, renew: Callable[[int], Awaitable[bool]],
                     run: asyncio.Future[Any]) -> None:
    """Renew a run's claim (``renew(lease_ms)``: False when the claim was taken over)
    every third of ``DEVSCHED_JOB_LEASE_S`` while the run works; should the claim have
    been taken over (this worker could not renew it for a lease: another runs it now),
    stop the run. A renewal Redis does not answer is tried again at the next third."""
    lease_ms = ctx.settings.job_lease_s * 1000
    while not run.done():
        await asyncio.sleep(lease_ms / 3000)
        try:
            kept = await renew(lease_ms)
        except REDIS_DOWN as exc:
            log.warning("job claim not renewed: %s", exc, extra={"job": name})
            continue
        if not kept:
            run.cancel()
            return


async def run_leased(ctx: StageContext, name: str, renew: Callable[[int], Awaitable[bool]],
                     work: Awaitable[T]) -> tuple[T | None, str | None]:
    """Run ``work`` (a tracked job's or a schedule batch's) within
    ``DEVSCHED_JOB_TIMEOUT_S`` while :func:`hold_lease` renews its claim: (its result,
    None), or (None, why it stopped: timed out, or its claim taken over). Any other
    failure of ``work`` is raised."""
    run = asyncio.ensure_future(asyncio.wait_for(work, ctx.settings.job_timeout_s))
    keeper = asyncio.create_task(hold_lease(ctx, name, renew, run))
    try:
        return await run, None
    except TimeoutError:
        return None, f"timed out after {ctx.settings.job_timeout_s} s"
    except asyncio.CancelledError:
        if not keeper.done():  # this worker is stopping: so is its run
            raise
        stopped = "claim lost: not renewed in time, taken over"
        log.warning("run stopped: %s", stopped, extra={"job": name})
        return None, stopped
    finally:
        keeper.cancel()


async def end_claim(ctx: StageContext, finish: JobFinish) -> Any:
    """End the run's claim (jobs.lua ``finish``), trying again while Redis is away for
    up to a lease; jobs.lua's answer, or None when Redis stayed away (the claim then
    goes stale and the run is retried). Ending is idempotent: a claim already ended, or
    one a failover lost, is left as it is."""
    pause, longest = END_BACKOFF_S
    give_up = time.monotonic() + ctx.settings.job_lease_s
    while True:
        try:
            return await jobs_script(ctx, JobsCall(prefix=ctx.settings.prefix,
                                                   now_ms=ctx.clock.now_ms(), finish=finish))
        except REDIS_DOWN as exc:
            if time.monotonic() + pause > give_up:
                log.warning("job claim not ended: %s", exc, extra={"job": finish.name})
                return None
            log.warning("job claim not ended yet, trying again in %.2f s: %s", pause, exc,
                        extra={"job": finish.name})
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)


async def jobs_script(ctx: StageContext, call: JobsCall) -> Any:
    """One call of jobs.lua."""
    return await JOBS_LUA(ctx.redis, JobsKeys(known=ctx.keys.jobs_known), call)


async def claim(ctx: StageContext, claims: list[JobClaim]) -> list[tuple[str, str, str, int,
                                                                           str, int]]:
    """jobs.lua's decision for each claim: (name, outcome, execution id, attempt, stale
    execution id, its start); a stale run is recorded failed here."""
    answer = await jobs_script(ctx, JobsCall(prefix=ctx.settings.prefix,
                                             now_ms=ctx.clock.now_ms(), claim=claims))
    out = []
    for name, outcome, eid, attempt, stale, stale_started in answer:
        row = (text(name), text(outcome), text(eid), int(attempt), text(stale),
               int(stale_started))
        if row[4]:
            await record_killed(ctx, row[0], row[4], row[5])
        out.append(row)
    return out


async def run_due(ctx: StageContext) -> list[RunOutcome]:
    """Run every job that is due now (those this worker claimed), together."""
    now = ctx.clock.now_ms()
    decided = await claim(ctx, [claim_of(j, ctx.settings, now) for j in JOBS.values()])
    runs = [execute(ctx, JOBS[name], eid, attempt, False)
            for name, outcome, eid, attempt, _, _ in decided if outcome in ("run", "retry")]
    return list(await asyncio.gather(*runs))


def iso(ms: int) -> str:
    return ts(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


async def run_now(ctx: StageContext, name: str, request_id: str) -> JobRunResult:
    """A manual run of job ``name`` now (unless another run holds its claim)."""
    now = ctx.clock.now_ms()
    job = JOBS.get(name)
    if job is None:
        return JobRunResult(request_id=request_id, operation=name, executed_at=iso(now),
                            status="unknown_job", processed_count=0,
                            error=f"no job named {name!r}", execution_time_ms=0)
    [(_, outcome, eid, _, _, _)] = await claim(ctx, [claim_of(job, ctx.settings, now, manual=True)])
    if outcome != "run":
        return JobRunResult(request_id=request_id, operation=name, executed_at=iso(now),
                            status="busy", processed_count=0,
                            error="another run of the job holds its claim",
                            execution_time_ms=0)
    run = await execute(ctx, job, eid, 0, True)
    return JobRunResult(request_id=request_id, operation=name, executed_at=iso(run.started_ms),
                        status="succeeded" if run.status == "succeeded" else "failed",
                        processed_count=run.processed, error=run.error,
                        execution_time_ms=run.duration_ms)
