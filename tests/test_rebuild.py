"""Rebuild: a Redis that lost the live state gets it back from PostgreSQL.

After Redis is emptied, `rebuild` restores devices (free or held), pools, quotas,
usage recomputed from the active allocations, active and recently closed
allocations, the expiry schedule, the counters and the answers of the allocations,
key for key as the pipeline had made them; the audit finds nothing to report; a
retried request gets its first answer; releases are billed exactly; an allocation
whose expires-at passed during the outage expires at the next tick, billed to its
expires-at. It refuses a live state without --force and a forced run while changes
are not yet persisted; run twice, it writes the same state. `devsched up` runs it
by itself when Redis came back empty, and kill -9 of the embedded redis-server
loses nothing with DEVSCHED_REDIS_FSYNC=always. Requests waiting in the queue come
back in their places and each gets one final reply; what events keep of a user and
the tracked jobs' interval and pause come back too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import redis_client, text
from pipeline.embedded.layout import Layout
from pipeline.embedded.process import wait_gone
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec, Released
from stages.app import serve
from stages.context import StageContext
from stages.settings import Settings
from stages.timers import expire_due
from stages.tools.admin import delete_keys, user_state, write_behind_drained
from stages.tools.audit import audit
from stages.tools.client import Client
from stages.tools.rebuild import BacklogPending, StateNotEmpty, rebuild, recover
from tests.conftest import (
    EVENT_TIMEOUT_S,
    RunningPipeline,
    seed,
    tick_through_timers,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["quota", "select", "persist", "bill", "notify", "timers"]


async def start_pipeline(settings: Settings, clock: ManualClock,
                         stages: list[str] = STAGES) -> RunningPipeline:
    stop = asyncio.Event()
    task = asyncio.create_task(serve(stages, settings, clock, stop=stop, install_signals=False))
    await asyncio.sleep(0.05)
    return RunningPipeline(task, stop)


async def live_state(redis: Redis, keys: Keys) -> dict[str, Any]:
    """Every key of the live state with its value; answers decoded from JSON. The state
    marker is left out: each rebuild gives it a new epoch (tests/test_state_marker.py). The
    tracked jobs' hashes ({jobs}) are compared apart, as ``jobs show`` reads them (rebuild
    writes them from job_info without a claim), and so are the global schedules' keys
    ({sched}: rebuild places each tenant anew, so batches and next runs are new;
    test_rebuild_restores_the_tenants_and_paused_schedules compares what they mean)."""
    names = [text(k) async for k in redis.scan_iter(match=f"{keys.prefix}:{{*", count=1000)
             if text(k) != keys.state and b":{jobs}:" not in k and b":{sched}:" not in k]
    names.append(keys.users)
    out: dict[str, Any] = {}
    for name in sorted(names):
        kind = text(await redis.type(name))
        if kind == "hash":
            out[name] = {text(k): text(v) for k, v in (await redis.hgetall(name)).items()}
        elif kind == "zset":
            out[name] = {text(m): s for m, s in await redis.zrange(name, 0, -1, withscores=True)}
        elif kind == "set":
            out[name] = sorted(text(m) for m in await redis.smembers(name))
        elif kind == "string":
            out[name] = json.loads(await redis.get(name) or b"null")
    return out


USAGE = ("used_devices", "used_cpu", "used_mem", "used_sto")


def restorable(state: dict[str, Any], keys: Keys) -> dict[str, Any]:
    """What rebuild restores: all but the answers of releases and refusals (stored, or a
    closed allocation's ``released_by``: PostgreSQL has neither); a user's usage is written
    in full (a user never admitted had no usage fields: zero)."""
    out = {name: value for name, value in state.items()
           if not (":req:" in name and (name.startswith(f"{keys.prefix}:{{pool}}")
                                        or value.get("type") != "allocated"))}
    for name, value in out.items():
        if name.endswith(":user"):
            out[name] = {**dict.fromkeys(USAGE, "0"), **value}
        elif name.startswith(keys.allocation("")):
            out[name] = {f: v for f, v in value.items() if f != "released_by"}
    return out


DEVICES = [DeviceSpec(id="d1", cpu_cores=2, memory_mb=4096),
           DeviceSpec(id="d2", cpu_cores=4, memory_mb=8192),
           DeviceSpec(id="d3", cpu_cores=8, memory_mb=16384),
           DeviceSpec(id="lab1", pool="lab", cpu_cores=2, memory_mb=4096, adb_port=6000)]
QUOTAS = [QuotaSpec(user_id="alice"), QuotaSpec(user_id="bob", max_devices=1),
          QuotaSpec(user_id="carol", status="suspended")]


async def drive(settings: Settings, clock: ManualClock) -> dict[str, Any]:
    """Alice holds one device and released another, bob holds a 60 s one, carol is refused."""
    async with Client(settings, timeout_s=5) as client:
        held = await client.allocate("alice", request_id="r-a1", duration_minutes=30,
                                     min_cpu_cores=4, tenant_id="t1")
        clock.advance(1_000)  # a user's last device is the one allocated last (affinity)
        short = await client.allocate("alice", request_id="r-a2", pool="lab")
        clock.advance(45_000)
        gone = await client.release(allocation_id=short.allocation_id, request_id="r-a3")
        bobs = await client.allocate("bob", request_id="r-b1", duration_seconds=60)
        refused = await client.allocate("carol", request_id="r-c1")
    assert isinstance(held, Allocated) and isinstance(short, Allocated)
    assert isinstance(gone, Released) and isinstance(bobs, Allocated)
    assert isinstance(refused, Failed)
    return {"held": held, "short": short, "bobs": bobs}


async def test_rebuild_restores_the_live_state_after_redis_is_emptied(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    got = await drive(settings, clock)
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    before = await live_state(redis, keys)

    await delete_keys(redis, settings.prefix)  # Redis came back empty
    report = await rebuild(redis, keys, pg, settings, clock)

    assert (report.devices, report.quotas, report.active, report.closed) == (4, 3, 2, 1)
    assert (report.answers, report.overdue) == (3, 0)
    assert await live_state(redis, keys) == restorable(before, keys)
    closed_ttl = await redis.ttl(keys.allocation(got["short"].allocation_id))
    assert 0 < closed_ttl <= settings.released_ttl_s
    assert (await audit(redis, keys, pg))["consistent"]

    again = await start_pipeline(settings, clock)
    try:
        async with Client(settings, timeout_s=5) as client:
            retried = await client.allocate("alice", request_id="r-a1", duration_minutes=30,
                                             min_cpu_cores=4, tenant_id="t1")
            assert retried == got["held"]  # the first answer, not a second device
            clock.advance(90_000)
            done = await client.release(allocation_id=got["held"].allocation_id,
                                        user_id="alice")
            assert isinstance(done, Released) and done.duration_seconds == 136  # 1 + 45 + 90 s
            twice = await client.release(allocation_id=got["short"].allocation_id)
            assert isinstance(twice, Released) and twice.already_released
            assert twice.duration_seconds == 45
            # bob's 60 s allocation, 90 s ago: expired here, or by the running timers stage
            # on a tick of the advanced clock first (the ledger below shows it either way)
            expired = await expire_due(StageContext(redis=redis, settings=settings, clock=clock))
            assert expired in (0, 1)
        await wait_until(lambda: write_behind_drained(redis, keys))
    finally:
        await again.close()
    async with pg.acquire() as conn:
        ledger = {r["allocation_id"]: (r["end_reason"], r["duration_seconds"])
                  for r in await conn.fetch("SELECT allocation_id::text, end_reason, "
                                            "duration_seconds FROM billing_ledger")}
    assert ledger == {got["short"].allocation_id: ("released", 45),
                      got["held"].allocation_id: ("released", 136),
                      got["bobs"].allocation_id: ("expired", 60)}
    report_after = await audit(redis, keys, pg)
    assert report_after["consistent"], report_after


async def test_an_allocation_that_expired_during_the_outage_is_billed_to_its_expires_at(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=DEVICES[:1], quotas=QUOTAS[:1])
    async with Client(settings, timeout_s=5) as client:
        got = await client.allocate("alice", duration_seconds=60)
    assert isinstance(got, Allocated)
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    await delete_keys(redis, settings.prefix)
    clock.advance(600_000)  # Redis was away for ten minutes

    report = await rebuild(redis, keys, pg, settings, clock)
    assert (report.active, report.overdue) == (1, 1)
    ctx = StageContext(redis=redis, settings=settings, clock=clock)
    assert await expire_due(ctx) == 1
    again = await start_pipeline(settings, clock)
    try:
        await wait_until(lambda: write_behind_drained(redis, keys))
    finally:
        await again.close()
    async with pg.acquire() as conn:
        row = await conn.fetchrow("SELECT status, duration_seconds, "
                                  "round(extract(epoch FROM released_at) * 1000)::bigint AS end_ms"
                                  " FROM device_allocations")
        ledger = await conn.fetchrow("SELECT end_reason, duration_seconds FROM billing_ledger")
    assert tuple(row) == ("expired", 60, got.expires_at_ms)
    assert tuple(ledger) == ("expired", 60)
    assert (await redis.hget(keys.device("d1"), "status")) == b"available"


async def test_rebuild_refuses_a_live_state_without_force_and_is_idempotent_with_it(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    await drive(settings, clock)
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    before = await live_state(redis, keys)
    with pytest.raises(StateNotEmpty, match="--force"):
        await rebuild(redis, keys, pg, settings, clock)
    assert await live_state(redis, keys) == before  # untouched

    await redis.hset(keys.device("d1"), "status", "broken")  # a state to be replaced
    await rebuild(redis, keys, pg, settings, clock, force=True)
    first = await live_state(redis, keys)
    await rebuild(redis, keys, pg, settings, clock, force=True)
    assert await live_state(redis, keys) == first == restorable(before, keys)


async def test_a_forced_rebuild_waits_for_changes_not_yet_persisted(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=DEVICES[:1], quotas=QUOTAS[:1])  # nothing persists
    with pytest.raises(BacklogPending, match="not yet in PostgreSQL"):
        await rebuild(redis, keys, pg, settings, clock, force=True)
    assert await redis.hget(keys.device("d1"), "status") == b"available"


async def test_rebuild_prints_its_progress(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    await delete_keys(redis, settings.prefix)
    lines: list[str] = []
    await rebuild(redis, keys, pg, settings, clock, progress=lines.append)
    assert lines[0].startswith("loaded from PostgreSQL: 4 devices, 3 quotas")
    assert "wrote 4 devices" in lines and lines[-1] == "rebuild done"


async def test_up_rebuilds_when_redis_came_back_empty(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool, capsys: pytest.CaptureFixture[str],
) -> None:
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    before = await live_state(redis, keys)
    await recover(settings)  # what `up` runs: the state is there, nothing to do
    assert "rebuild" not in capsys.readouterr().out
    await delete_keys(redis, settings.prefix)
    await recover(settings)
    assert "rebuilding" in capsys.readouterr().out
    assert await live_state(redis, keys) == restorable(before, keys)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stages.tools.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


def _redis_url(output: str) -> str:
    return next(line.split("=", 1)[1] for line in output.splitlines()
                if line.startswith("REDIS_URL="))


async def test_active_allocations_survive_kill_9_of_the_embedded_redis_and_up(
    settings: Settings, clock: ManualClock, pg: asyncpg.Pool, tmp_path: Path,
) -> None:
    """The embedded redis-server of a data dir of its own, with DEVSCHED_REDIS_FSYNC=always:
    `devsched up`, allocations, kill -9 of redis-server, `devsched up`: the allocations are
    still active, and the pipeline that kept running releases them at once (no wait for a
    reclaim) with their exact durations."""
    clock.set(time.time_ns() // 1_000_000)
    env = dict(os.environ, DEVSCHED_DATA_DIR=str(tmp_path / "data"),
               DATABASE_URL=settings.database_url, DEVSCHED_PREFIX=settings.prefix,
               DEVSCHED_REDIS_FSYNC="always")
    env.pop("REDIS_URL", None)
    up = _cli("up", env=env)
    assert up.returncode == 0, up.stderr
    own = replace(settings, redis_url=_redis_url(up.stdout), claim_idle_ms=600_000)
    keys = Keys(own.prefix)
    redis = redis_client(own)
    running = None
    try:
        await seed(redis, keys, clock, devices=DEVICES[:2], quotas=QUOTAS[:1])
        running = await start_pipeline(own, clock)
        async with Client(own, timeout_s=5) as client:
            first = await client.allocate("alice", request_id="k1")
            second = await client.allocate("alice", request_id="k2")
            assert isinstance(first, Allocated) and isinstance(second, Allocated)
            pid = json.loads(Layout.of(tmp_path / "data").state.read_text())["redis"]["pid"]
            os.kill(pid, signal.SIGKILL)
            assert wait_gone(pid, 5.0)

            up = await asyncio.to_thread(_cli, "up", env=env)
            assert up.returncode == 0, up.stderr
            assert "rebuilding" not in up.stdout  # its own file brought the state back
            assert _redis_url(up.stdout) == own.redis_url  # the same socket and password
            active = {text(m) for m in await redis.zrange(keys.expiry, 0, -1)}
            assert active == {first.allocation_id, second.allocation_id}
            clock.advance(30_000)
            for got in (first, second):
                done = await client.release(allocation_id=got.allocation_id)
                assert isinstance(done, Released) and not done.already_released
                assert done.duration_seconds == 30
        await wait_until(lambda: write_behind_drained(redis, keys))
        assert (await audit(redis, keys, pg))["consistent"]
    finally:
        if running is not None:
            await running.close()
        await redis.aclose()
        _cli("down", env=env)


def _decoded_waiters(state: dict[str, Any], keys: Keys) -> dict[str, Any]:
    """The live state with each waiter's record (JSON in a hash) decoded."""
    return {name: ({m: json.loads(r) for m, r in value.items()} if name == keys.waiters
                   else value) for name, value in state.items()}


async def test_rebuild_queues_the_waiting_requests_again_and_each_gets_one_final_reply(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    """Waiters survive a state loss: PostgreSQL has them (WaiterChange, written behind),
    rebuild puts them back key for key (queue, records, deadlines, the class index, holds,
    waiting counts); after it a release serves the first one with the allocation id it was
    given, a wait that ends times out on the tick: one final reply each, none lost."""
    await seed(redis, keys, clock, devices=DEVICES[:1],
               quotas=[QuotaSpec(user_id=u) for u in ("alice", "bob", "carol", "dave")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        held = await client.allocate("alice", request_id="r-held")
        assert isinstance(held, Allocated)
        waits = {}
        for user, rid, kw in (("bob", "w-bob", {"priority": 3}),
                              ("dave", "w-dave", {}),
                              ("carol", "w-carol", {"wait_seconds": 30, "min_cpu_cores": 8})):
            waits[rid] = asyncio.create_task(client.allocate(
                user, request_id=rid, **{"wait_seconds": 600, **kw}))
            await wait_until(lambda rid=rid: _queued(client, rid))
        await wait_until(lambda: write_behind_drained(redis, keys))
        await pipeline.close()
        before = await live_state(redis, keys)
        bobs_id = json.loads(before[keys.waiters]["bob w-bob"])["allocation_id"]

        await delete_keys(redis, settings.prefix)  # Redis came back empty
        report = await rebuild(redis, keys, pg, settings, clock)
        assert report.waiters == 3
        after = await live_state(redis, keys)
        assert _decoded_waiters(after, keys) == _decoded_waiters(restorable(before, keys), keys)
        assert (await audit(redis, keys, pg))["consistent"]

        again = await start_pipeline(settings, clock)
        try:
            assert int((await redis.hget(keys.user("dave"), "waiting")) or 0) == 1
            assert isinstance(await client.release(allocation_id=held.allocation_id), Released)
            got = await asyncio.wait_for(waits["w-bob"], EVENT_TIMEOUT_S)
            assert isinstance(got, Allocated) and got.allocation_id == bobs_id, got
            clock.advance(31_000)
            await tick_through_timers(redis, settings, clock)
            late = await asyncio.wait_for(waits["w-carol"], EVENT_TIMEOUT_S)
            assert isinstance(late, Failed) and late.reason == "timed_out", late
            assert not waits["w-dave"].done()
            await wait_until(lambda: write_behind_drained(redis, keys))
        finally:
            await again.close()
        waits["w-dave"].cancel()
    async with pg.acquire() as conn:
        rows = {r["request_id"]: (r["status"], r["reason"]) for r in await conn.fetch(
            "SELECT request_id, status, reason FROM waiting_requests")}
    assert rows == {"w-bob": ("left", "allocated"), "w-carol": ("left", "timed_out"),
                    "w-dave": ("waiting", None)}


def _queued(client: Client, rid: str) -> Awaitable[bool]:
    async def check() -> bool:
        return rid in client.queued
    return check()


async def test_a_waiter_whose_serving_reached_postgresql_is_not_queued_again(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    """The allocation a waiter got was persisted, its leaving the queue not (both were in
    the backlog Redis lost): rebuild restores the allocation and its answer, not the wait;
    and a device free while a waiter it fits waits (its serving lost) goes to the waiter
    in the rebuild's own step."""
    await seed(redis, keys, clock, devices=DEVICES[:1],
               quotas=[QuotaSpec(user_id="alice"), QuotaSpec(user_id="bob")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        held = await client.allocate("alice", request_id="r-held")
        assert isinstance(held, Allocated)
        task = asyncio.create_task(client.allocate("bob", request_id="w-bob", wait_seconds=600))
        await wait_until(lambda: _queued(client, "w-bob"))
        assert isinstance(await client.release(allocation_id=held.allocation_id), Released)
        got = await asyncio.wait_for(task, EVENT_TIMEOUT_S)
        assert isinstance(got, Allocated)
        reply_stream = client.reply_stream
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    async with pg.acquire() as conn:  # as if the leaving had not reached PostgreSQL
        await conn.execute("UPDATE waiting_requests SET status = 'waiting', version = 0")
    await delete_keys(redis, settings.prefix)
    report = await rebuild(redis, keys, pg, settings, clock)
    assert report.waiters == 0 and await redis.zcard(keys.queue) == 0
    assert (await redis.hget(keys.device("d1"), "alloc")) == got.allocation_id.encode()

    # the serving lost too: the device comes back free, the waiter waiting; the rebuild
    # hands it over when it writes the device, answering the waiter
    async with pg.acquire() as conn:
        await conn.execute("DELETE FROM device_allocations WHERE id = $1::uuid",
                           got.allocation_id)
        await conn.execute("UPDATE devices SET status = 'available'")
    await delete_keys(redis, settings.prefix)
    report = await rebuild(redis, keys, pg, settings, clock)
    assert report.waiters == 1
    assert await redis.zcard(keys.queue) == 0
    assert (await redis.hget(keys.device("d1"), "alloc")) == got.allocation_id.encode()
    state = await user_state(redis, keys, "bob")
    assert list(state.allocations) == [got.allocation_id] and state.holds == {}
    (reply,) = await redis.xrange(reply_stream)
    assert json.loads(reply[1][b"d"])["allocation_id"] == got.allocation_id


async def test_rebuild_restores_what_events_keep_of_a_user_and_the_tracked_jobs(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    """The user service's and billing's parts of the status, the event versions and the
    failed payments counted come back from user_quotas; each tracked job's interval and
    pause from job_info. Then the same events give the same answers as without the loss:
    an older event stays stale, user.activated leaves billing's block in force, the third
    failed payment suspends."""
    from stages.tools.jobs import control, job_state
    from tests.test_events import event, send

    await seed(redis, keys, clock, devices=DEVICES[:1], quotas=[QuotaSpec(user_id="erin")])
    await send(redis, keys, event("user.suspended", user_id="erin", version=5),
               event("billing.overdue", user_id="erin", version=2, amount=10, days=3),
               event("billing.payment_failed", user_id="erin", version=3),
               event("billing.payment_failed", user_id="erin", version=4))
    await control(redis, pg, settings, clock, "purge", "pause")
    await control(redis, pg, settings, clock, "stats_snapshot", "set_interval", 7)
    jobs_before = {n: await job_state(redis, settings, n) for n in ("purge", "stats_snapshot")}
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    parts = ("status", "user_status", "billing_status", "user_event_version",
             "billing_event_version")
    user_before = await redis.hmget(keys.user("erin"), parts)
    payfail = keys.user("erin").replace(":user", ":payfail")
    assert await redis.get(payfail) == b"2"
    clock.advance(10_000)

    await delete_keys(redis, settings.prefix)
    report = await rebuild(redis, keys, pg, settings, clock)
    assert report.jobs >= 2
    assert await redis.hmget(keys.user("erin"), parts) == user_before
    assert user_before[:3] == [b"suspended", b"suspended", b"overdue"]
    assert await redis.get(payfail) == b"2"
    # restored with an expiry (the time the count has left, from PostgreSQL), not kept for
    # good; how long Redis still keeps it is wall-clock time, so no bound is asserted here
    assert await redis.pttl(payfail) > 0
    for name, state in jobs_before.items():
        assert await job_state(redis, settings, name) == state, name
    assert not jobs_before["purge"]["enabled"]
    assert jobs_before["stats_snapshot"]["interval_s"] == 7

    again = await start_pipeline(settings, clock, [*STAGES, "events"])
    try:
        await send(redis, keys, event("user.activated", user_id="erin", version=4))  # stale
        assert (await redis.hget(keys.user("erin"), "status")) == b"suspended"
        await send(redis, keys, event("user.activated", user_id="erin", version=6))
        assert (await redis.hget(keys.user("erin"), "status")) == b"overdue"  # billing's
        await send(redis, keys, event("billing.payment_failed", user_id="erin", version=5))
        assert (await redis.hmget(keys.user("erin"), "billing_status", "status")) == [
            b"suspended", b"suspended"]  # the third failed payment
    finally:
        await again.close()


async def test_rebuild_restores_the_tenants_and_paused_schedules(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    """Tenants set on three plans (one changed plan, one with an override, one deleted, one
    from a tenant event with its version) and a paused schedule are written behind to
    ``tenants`` and ``schedule_state``; after Redis is emptied, and again after a forced
    rebuild over the live state, the registry (plan, interval, override), the pause and
    the event version come back, every tenant in exactly one batch of the right schedule
    per kind, and ``schedules validate`` finds nothing wrong. A change after the rebuild
    continues above PostgreSQL's versions (persist's guard keeps it)."""
    from stages.schedules import KINDS, control, label, plan_tiers, set_override
    from stages.tools.schedules import validate
    from stages.tools.tenants import delete_tenant, list_tenants, set_tenant
    from tests.test_events import event, send

    now = clock.now_ms()
    for tenant, plan in (("acme", "basic"), ("bolt", "premium"), ("cora", "enterprise"),
                         ("gone", "standard")):
        await set_tenant(redis, settings, now, tenant, plan)
    await set_tenant(redis, settings, now, "acme", "standard")  # plan changed
    assert await set_override(redis, settings, now, "bolt", 30 * 60_000, now + 86_400_000)
    assert await delete_tenant(redis, settings, now, "gone") == "deleted"
    await send(redis, keys, event("tenant.created", tenant_id="evt", plan="premium", version=4))
    [status] = await control(redis, settings, now, "pause", schedule="usage_report:24h")
    assert text(status) == "ok"
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    async with pg.acquire() as conn:
        rows = {r["tenant_id"]: (r["status"], r["plan"], r["override_ms"], r["event_version"])
                for r in await conn.fetch("SELECT * FROM tenants")}
        paused = await conn.fetch("SELECT schedule_id, paused FROM schedule_state")
    assert rows == {"acme": ("active", "standard", None, None),
                    "bolt": ("active", "premium", 30 * 60_000, None),
                    "cora": ("active", "enterprise", None, None),
                    "gone": ("deleted", "standard", None, None),
                    "evt": ("active", "premium", None, 4)}
    assert [tuple(r) for r in paused] == [("usage_report:24h", True)]

    def meaning(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {r["tenant_id"]: (r["plan"], r["interval_ms"], r["override_until_ms"],
                                 {k: b.rpartition("#")[0] for k, b in r["batches"].items()})
                for r in rows}

    before = meaning(await list_tenants(redis, settings, now))
    assert set(before) == {"acme", "bolt", "cora", "evt"}
    assert before["bolt"][3] == {k: f"{k}:30m" for k in KINDS}
    tiers = plan_tiers(settings)
    assert before["acme"][3] == {k: f"{k}:{label(tiers['standard'])}" for k in KINDS}

    async def restored() -> None:
        assert meaning(await list_tenants(redis, settings, now)) == before
        report = await validate(redis, settings, now)
        assert report["valid"], report
        paused_now = await redis.hget(keys.sched("schedule:usage_report:24h"), "paused")
        assert paused_now == b"1"
        assert await redis.hget(keys.sched("versions"), "evt") == b"4"

    await delete_keys(redis, settings.prefix)  # Redis came back empty
    report = await rebuild(redis, keys, pg, settings, clock)
    assert (report.tenants, report.tenants_skipped, report.paused_schedules) == (4, 0, 1)
    await restored()
    forced = await rebuild(redis, keys, pg, settings, clock, force=True)  # over a live state
    assert forced.tenants == 4
    await restored()

    again = await start_pipeline(settings, clock, [*STAGES, "events"])
    try:
        await send(redis, keys, event("tenant.plan_changed", tenant_id="evt", plan="basic",
                                      version=3))  # older than the version restored: stale
        assert await redis.hget(keys.sched_tenants, "evt") == b"premium"
        await set_tenant(redis, settings, now, "cora", "basic")
        await wait_until(lambda: write_behind_drained(redis, keys))
    finally:
        await again.close()
    async with pg.acquire() as conn:
        assert await conn.fetchval("SELECT plan FROM tenants WHERE tenant_id = 'cora'") == "basic"
