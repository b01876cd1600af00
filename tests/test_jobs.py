"""Tracked timer jobs: every run recorded, controlled by an operator, once per period.

With the injected clock (no sleeping): a run of expire through the running pipeline
leaves an execution row with its figures and the job's info; pause stops scheduled
runs and resume brings them back; set-interval moves the next run; a run whose worker
died (its `running` execution and claim left unrenewed past the lease) is recorded failed
and retried once, while a live run renews its claim and keeps it past the lease, and a run
whose claim was taken over stops; a run ends its claim once Redis is back, and with max retries 1 a second death gives up until the next period;
two timers workers handling the same ticks run each job once per period; the purge
deletes old closed rows and never an active one; the snapshot writes one row per
period; `devsched jobs run expire --json` answers with the six fields (and a repeated
request id runs once); a job request that does not decode goes to the dead stream.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import redis_client
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, JobRunResult, QuotaSpec
from stages.context import StageContext
from stages.jobs import (
    JOBS,
    KILLED,
    START,
    RunOutcome,
    claim,
    claim_of,
    execute,
    run_due,
    run_now,
    ts,
)
from stages.settings import Settings
from stages.tools.client import Client
from stages.tools.jobs import control, history, job_state, run_job
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, wait_until
from tests.test_admin import devsched_command


@pytest_asyncio.fixture
async def jctx(redis: Redis, settings: Settings, clock: ManualClock,
               pg: asyncpg.Pool) -> StageContext:
    """A timers worker's context, at the start of a tick period."""
    clock.advance(settings.tick_ms - clock.now_ms() % settings.tick_ms)
    return StageContext(redis=redis, settings=settings, clock=clock, pg=pg)


@pytest_asyncio.fixture
async def other_redis(settings: Settings) -> AsyncIterator[Redis]:
    client = redis_client(settings)
    yield client
    await client.aclose()


async def executions(pg: asyncpg.Pool, job: str) -> list[asyncpg.Record]:
    async with pg.acquire() as conn:
        return list(await conn.fetch(
            "SELECT * FROM job_executions WHERE job_name = $1 ORDER BY started_at, attempt",
            job))


def ran(outcomes: list[RunOutcome], job: str) -> int:
    return sum(1 for o in outcomes if o.job == job)


async def test_expire_run_through_the_pipeline_is_recorded_with_its_figures(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="u1")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        for _ in range(2):
            assert isinstance(await client.allocate("u1", duration_minutes=1), Allocated)
    clock.advance(61_000)

    async def expired_run() -> bool:
        rows = await executions(pg, "expire")
        return any(r["processed_count"] == 2 for r in rows)

    await wait_until(expired_run)  # the pipeline's own ticker brings the tick
    [run] = [r for r in await executions(pg, "expire") if r["processed_count"] == 2]
    assert run["status"] == "succeeded" and run["error"] is None
    assert run["ended_at"] >= run["started_at"] and run["duration_ms"] >= 0
    assert run["attempt"] == 0 and run["manual"] is False
    async with pg.acquire() as conn:
        info = await conn.fetchrow("SELECT * FROM job_info WHERE name = 'expire'")
    assert info["enabled"] is True and info["max_retries"] == settings.job_max_retries
    assert info["interval_ms"] == settings.tick_ms
    assert info["next_run_at"] > info["last_run_at"]
    assert (await redis.zcard(keys.expiry)) == 0


async def test_pause_stops_scheduled_runs_and_resume_brings_them_back(
    jctx: StageContext, pg: asyncpg.Pool, clock: ManualClock, settings: Settings,
) -> None:
    assert ran(await run_due(jctx), "expire") == 1
    state = await control(jctx.redis, pg, settings, clock, "expire", "pause")
    assert state["enabled"] is False
    for _ in range(3):
        clock.advance(settings.tick_ms)
        assert ran(await run_due(jctx), "expire") == 0
    async with pg.acquire() as conn:
        assert await conn.fetchval("SELECT enabled FROM job_info WHERE name = 'expire'") is False

    assert (await control(jctx.redis, pg, settings, clock, "expire", "resume"))["enabled"]
    assert ran(await run_due(jctx), "expire") == 1
    assert len(await executions(pg, "expire")) == 2


async def test_set_interval_moves_the_next_run_without_a_restart(
    jctx: StageContext, pg: asyncpg.Pool, clock: ManualClock, settings: Settings,
) -> None:
    await run_due(jctx)
    state = await control(jctx.redis, pg, settings, clock, "expire", "set_interval", 5)
    assert state["interval_s"] == 5 and state["next_run_ms"] == clock.now_ms() + 5_000
    for _ in range(4):
        clock.advance(1_000)
        assert ran(await run_due(jctx), "expire") == 0
    clock.advance(1_000)
    assert ran(await run_due(jctx), "expire") == 1
    after = await job_state(jctx.redis, settings, "expire")
    assert after["next_run_ms"] == clock.now_ms() // 5_000 * 5_000 + 5_000


async def leave_dead_run(ctx: StageContext, pg: asyncpg.Pool) -> str:
    """Claim expire as a worker would, write its `running` execution, then die."""
    [(_, outcome, eid, attempt, _, _)] = await claim(ctx, [claim_of(
        JOBS["expire"], ctx.settings, ctx.clock.now_ms())])
    assert outcome in ("run", "retry")
    async with pg.acquire() as conn:
        await conn.execute(START, uuid.UUID(eid), "expire", ts(ctx.clock.now_ms()), attempt,
                           False)
    return eid


async def test_a_killed_run_is_recorded_failed_and_retried_once(
    jctx: StageContext, pg: asyncpg.Pool, clock: ManualClock, settings: Settings,
) -> None:
    ctx = replace(jctx, settings=replace(settings, job_max_retries=1, job_lease_s=30))
    dead = await leave_dead_run(ctx, pg)
    clock.advance(settings.tick_ms)
    assert ran(await run_due(ctx), "expire") == 0  # its claim is still within the lease

    clock.advance(30_000)  # not renewed for a lease: stale (the timeout, 300 s, plays no part)
    [retry] = [o for o in await run_due(ctx) if o.job == "expire"]
    assert retry.status == "succeeded"
    rows = {str(r["id"]): r for r in await executions(pg, "expire")}
    assert rows[dead]["status"] == "failed" and rows[dead]["error"] == KILLED
    assert rows[dead]["ended_at"] is not None
    assert rows[retry.execution_id]["attempt"] == 1
    assert len(rows) == 2

    # the next period: a run that dies, and its retry that dies too, give up
    clock.advance(settings.tick_ms)
    first = await leave_dead_run(ctx, pg)
    clock.advance(31_000)
    second = await leave_dead_run(ctx, pg)  # the retry (attempt 1), which dies as well
    clock.advance(31_000)
    assert ran(await run_due(ctx), "expire") == 0  # max retries reached: gave up
    rows = {str(r["id"]): r for r in await executions(pg, "expire")}
    assert rows[first]["status"] == rows[second]["status"] == "failed"
    assert rows[second]["attempt"] == 1
    state = await job_state(ctx.redis, ctx.settings, "expire")
    assert state["retries"] == 0 and state["running"] is None
    clock.advance(settings.tick_ms)
    assert ran(await run_due(ctx), "expire") == 1


async def test_two_timers_workers_run_each_job_once_per_period(
    jctx: StageContext, other_redis: Redis, pg: asyncpg.Pool, clock: ManualClock,
    settings: Settings,
) -> None:
    other = replace(jctx, redis=other_redis)
    for period in range(1, 4):
        both = await asyncio.gather(run_due(jctx), run_due(other), run_due(jctx))
        assert sum(ran(list(o), "expire") for o in both) == 1
        assert len(await executions(pg, "expire")) == period
        clock.advance(settings.tick_ms)
    # the hourly snapshot: first at the end of its first hour, then once an hour
    assert len(await executions(pg, "stats_snapshot")) == 0
    for hour in (1, 2):
        clock.advance(3_600_000 - clock.now_ms() % 3_600_000)
        await asyncio.gather(run_due(jctx), run_due(other))
        assert len(await executions(pg, "stats_snapshot")) == hour
    async with pg.acquire() as conn:
        taken = [r["taken_at"] for r in await conn.fetch(
            "SELECT taken_at FROM stats_snapshots ORDER BY taken_at")]
    assert [ts(clock.now_ms() - 3_600_000), ts(clock.now_ms())] == taken


async def test_a_snapshot_run_twice_in_its_period_writes_one_row(jctx: StageContext) -> None:
    first = await run_job_in_process(jctx, "stats_snapshot")
    second = await run_job_in_process(jctx, "stats_snapshot")
    assert (first.status, first.processed_count) == ("succeeded", 1)
    assert (second.status, second.processed_count) == ("succeeded", 0)


async def test_purge_deletes_old_closed_rows_and_never_an_active_one(
    jctx: StageContext, pg: asyncpg.Pool, clock: ManualClock,
) -> None:
    now = datetime.fromtimestamp(clock.now_ms() / 1000, UTC)
    rows = {  # id: (status, allocated days ago, ended days ago)
        "active-old": ("allocated", 90, None),
        "released-old": ("released", 45, 40),
        "expired-old": ("expired", 45, 31),
        "released-recent": ("released", 12, 10),
    }
    ids = {name: uuid.uuid4() for name in rows}
    async with pg.acquire() as conn:
        for name, (status, began, ended) in rows.items():
            await conn.execute(
                "INSERT INTO device_allocations (id, device_id, user_id, status, allocated_at,"
                " released_at, expires_at) VALUES ($1, 'd1', 'u1', $2, $3, $4, $5)",
                ids[name], status, now - timedelta(days=began),
                None if ended is None else now - timedelta(days=ended),
                now - timedelta(days=began) + timedelta(hours=1))
        # requests of the wait queue: one that left long ago goes, one waiting never
        for rid, status, days in (("w-left-old", "left", 40), ("w-waiting-old", "waiting", 40),
                                  ("w-left-recent", "left", 10)):
            await conn.execute(
                "INSERT INTO waiting_requests (user_id, request_id, status, version, queue_score,"
                " queued_at, wait_until, request) VALUES ('u1', $1, $2, 1, 0, $3, $3, '{}')",
                rid, status, now - timedelta(days=days))
    result = await run_job_in_process(jctx, "purge")
    assert result.status == "succeeded" and result.processed_count == 3
    async with pg.acquire() as conn:
        left = {r["id"] for r in await conn.fetch("SELECT id FROM device_allocations")}
        waiting = {r["request_id"] for r in await conn.fetch(
            "SELECT request_id FROM waiting_requests")}
    assert left == {ids["active-old"], ids["released-recent"]}
    assert waiting == {"w-waiting-old", "w-left-recent"}


async def test_purge_deletes_ended_reservations_and_old_usage_reports_never_a_live_booking(
    jctx: StageContext, pg: asyncpg.Pool, clock: ManualClock,
) -> None:
    """Reservations that ended (completed, cancelled, no_show) longer ago than
    DEVSCHED_PURGE_RETENTION_DAYS go; a booked or active one never, however old; usage
    reports go after their own retention (DEVSCHED_USAGE_REPORT_RETENTION_DAYS, 400 days
    by default), not after the 30 days of the other rows."""
    assert jctx.settings.usage_report_retention_days == 400
    now = datetime.fromtimestamp(clock.now_ms() / 1000, UTC)
    rows = {  # name: (status, ended days ago; start 2 days before)
        "completed-old": ("completed", 40), "cancelled-old": ("cancelled", 31),
        "no_show-old": ("no_show", 35), "completed-recent": ("completed", 10),
        "booked-old": ("booked", 90), "active-old": ("active", 60),
    }
    ids = {name: uuid.uuid4() for name in rows}
    async with pg.acquire() as conn:
        for name, (status, days) in rows.items():
            end = now - timedelta(days=days)
            live = status in ("booked", "active")
            await conn.execute(
                "INSERT INTO reservations (id, request_id, user_id, device_id, pool, start_at,"
                " end_at, status, created_at, ended_at, version)"
                " VALUES ($1, $2, 'u1', 'd1', 'default', $3, $4, $5, $3, $6, 1)",
                ids[name], name, end - timedelta(days=2), end, status, None if live else end)
        for tenant, days in (("t-old", 401), ("t-kept", 399), ("t-month", 31)):
            end = now - timedelta(days=days)
            await conn.execute(
                "INSERT INTO usage_reports (tenant_id, period_start, period_end, pool,"
                " devices_used, allocations, device_seconds) VALUES ($1, $2, $3, '*', 1, 1, 60)",
                tenant, end - timedelta(days=1), end)
    result = await run_job_in_process(jctx, "purge")
    assert result.status == "succeeded" and result.processed_count == 4
    async with pg.acquire() as conn:
        left = {r["id"] for r in await conn.fetch("SELECT id FROM reservations")}
        reports = {r["tenant_id"] for r in await conn.fetch("SELECT tenant_id FROM usage_reports")}
    assert left == {ids["completed-recent"], ids["booked-old"], ids["active-old"]}
    assert reports == {"t-kept", "t-month"}
    again = await run_job_in_process(jctx, "purge")
    assert (again.status, again.processed_count) == ("succeeded", 0)


async def run_job_in_process(ctx: StageContext, name: str) -> JobRunResult:
    return await run_now(ctx, name, uuid.uuid4().hex)


async def test_a_manual_run_holds_off_while_a_live_claim_is_held(
    jctx: StageContext, pg: asyncpg.Pool,
) -> None:
    await leave_dead_run(jctx, pg)
    busy = await run_job_in_process(jctx, "expire")
    assert busy.status == "busy" and busy.processed_count == 0
    unknown = await run_job_in_process(jctx, "nope")
    assert unknown.status == "unknown_job"


async def test_jobs_run_expire_json_answers_with_the_fields_and_adds_a_history_row(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix)
    before = len(await history(pg, "expire", page_size=1000))

    async def devsched(*args: str) -> bytes:
        proc = await asyncio.create_subprocess_exec(
            devsched_command(), *args, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), EVENT_TIMEOUT_S)
        assert proc.returncode == 0, err.decode()
        return out

    answer = orjson.loads(await devsched("jobs", "run", "expire", "--json"))
    assert set(answer) == {"operation", "executed_at", "status", "processed_count", "error",
                           "execution_time_ms"}
    assert answer["operation"] == "expire" and answer["status"] == "succeeded"
    assert answer["error"] is None and answer["processed_count"] == 0
    manual = [r for r in await history(pg, "expire", page_size=1000) if r["manual"]]
    assert len(manual) == 1 and len(await history(pg, "expire", page_size=1000)) > before

    listed = orjson.loads(await devsched("jobs", "list", "--json"))
    assert [j["name"] for j in listed] == list(JOBS)
    assert all(j["next_run"] for j in listed if j["name"] == "expire")
    table = (await devsched("jobs", "history", "expire")).decode()
    assert table.splitlines()[0].split()[:2] == ["started_at", "status"]

    # the same request id runs once and gets the first answer again
    one = await run_job(redis, settings, "trim", timeout_s=EVENT_TIMEOUT_S, request_id="r-1")
    two = await run_job(redis, settings, "trim", timeout_s=EVENT_TIMEOUT_S, request_id="r-1")
    assert one is not None and one == two
    assert len([r for r in await history(pg, "trim") if r["manual"]]) == 1


async def test_a_job_request_that_does_not_decode_goes_to_the_dead_stream(
    pipeline: RunningPipeline, redis: Redis, keys: Keys,
) -> None:
    await redis.xadd(keys.job_requests, {"d": b'{"request_id": "x", "job": 7}'})

    async def dead() -> bool:
        return bool(await redis.xlen(keys.dead))

    await wait_until(dead)
    [(_, fields)] = await redis.xrange(keys.dead)
    letter = orjson.loads(fields[b"d"])
    assert letter["stage"] == "timers" and "invalid job run" in letter["error"]


class Gate:
    """A TCP door in front of the test's Redis (its unix socket): shut, it drops every
    connection through it and refuses new ones, as a Redis restarting or failing over
    does; opened again, connections pass."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self.socket_path, self.password = parts.path, parts.password or ""
        self.port = 0
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def shut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.links):
            w.close()
        await self.server.wait_closed()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.socket_path)
        self.links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()
                self.links.discard(dst)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_run_ends_its_claim_once_redis_is_back(
    jctx: StageContext, settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis goes away while a run works (a restart, a failover) and comes back a second
    later: the run ends its claim then, so the next period runs the job, instead of the
    claim holding it off until its deadline (the job's timeout)."""
    gate = Gate(settings.redis_url)
    await gate.open()
    client = redis_client(replace(settings, redis_url=gate.url))
    ctx = replace(jctx, redis=client)

    async def outage(_: StageContext) -> int:
        await gate.shut()
        asyncio.get_running_loop().call_later(1.0, lambda: asyncio.ensure_future(gate.open()))
        return 7

    job = replace(JOBS["expire"], run=outage)
    try:
        [(_, outcome, eid, attempt, _, _)] = await claim(ctx, [claim_of(
            job, settings, jctx.clock.now_ms())])
        assert outcome == "run"
        done = await execute(ctx, job, eid, attempt, False)
    finally:
        await client.aclose()
        if gate.server is not None:
            gate.server.close()
    assert (done.status, done.processed) == ("succeeded", 7)
    assert "job claim not ended yet, trying again" in caplog.text
    state = await job_state(jctx.redis, settings, "expire")
    assert state["running"] is None and state["last_status"] == "succeeded"
    jctx.clock.advance(settings.tick_ms)
    assert ran(await run_due(jctx), "expire") == 1  # not held off by a claim left behind


async def test_a_long_run_renews_its_claim_and_keeps_it_past_the_lease(
    jctx: StageContext, settings: Settings, clock: ManualClock,
) -> None:
    """A run that works for twice the lease (the injected clock moves 2 s three times, a
    renewal, every third of the 3 s lease in real time, comes between) still holds its
    claim: a manual run of the job asked for meanwhile finds it busy, and the run ends
    its own claim."""
    s = replace(settings, job_lease_s=3)
    ctx = replace(jctx, settings=s)
    asked: list[str] = []

    async def long_run(_: StageContext) -> int:
        for _ in range(3):
            clock.advance(2_000)
            await asyncio.sleep(1.2)
        [(_, outcome, _, _, _, _)] = await claim(ctx, [claim_of(job, s, clock.now_ms(),
                                                                manual=True)])
        asked.append(outcome)
        return 1

    job = replace(JOBS["expire"], run=long_run)
    [(_, outcome, eid, attempt, _, _)] = await claim(ctx, [claim_of(job, s, clock.now_ms())])
    assert outcome == "run"
    done = await execute(ctx, job, eid, attempt, False)
    assert asked == ["busy"]
    assert (done.status, done.processed) == ("succeeded", 1)
    state = await job_state(jctx.redis, s, "expire")
    assert state["running"] is None and state["last_status"] == "succeeded"


async def test_a_run_whose_claim_was_taken_over_stops(
    jctx: StageContext, settings: Settings, clock: ManualClock,
) -> None:
    """A run that could not renew its claim for a lease (here: the injected clock jumps
    past it before the first renewal) finds at its next renewal that another took the
    job over, and stops, recorded failed; the claim stays the new run's."""
    s = replace(settings, job_lease_s=3)
    ctx = replace(jctx, settings=s)
    started = asyncio.Event()

    async def stuck(_: StageContext) -> int:
        started.set()
        await asyncio.Event().wait()
        return 0

    job = replace(JOBS["expire"], run=stuck)
    [(_, outcome, eid, attempt, _, _)] = await claim(ctx, [claim_of(job, s, clock.now_ms())])
    assert outcome == "run"
    running = asyncio.create_task(execute(ctx, job, eid, attempt, False))
    await asyncio.wait_for(started.wait(), EVENT_TIMEOUT_S)
    clock.advance(4_000)
    [(_, took, other, _, stale, _)] = await claim(ctx, [claim_of(job, s, clock.now_ms(),
                                                                 manual=True)])
    assert (took, stale) == ("run", eid)
    done = await asyncio.wait_for(running, EVENT_TIMEOUT_S)
    assert done.status == "failed" and done.error is not None and "claim lost" in done.error
    state = await job_state(jctx.redis, s, "expire")
    assert state["running"] == other
