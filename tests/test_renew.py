"""Renewal: an active allocation extended atomically, persisted, billed once, notified.

Through the running pipeline with the injected clock: a renewal moves expires-at (the
reply carries it), the allocation outlives its first expires-at and expires at the new
one, PostgreSQL holds the new version with the new expires-at and length, the ledger
has one row for the whole allocation, and `allocation.renewed` goes out; the same
request id renews once. Each refusal is typed: another user's allocation, an ended one,
past the quota's expiry, past DEVSCHED_MAX_ALLOCATION_S, a suspended or overdue user.
`devsched renew` prints the typed reply.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace

import asyncpg
import orjson
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import Keys
from schemas.messages import (
    Allocated,
    DeviceSpec,
    Failed,
    QuotaSpec,
    Renewed,
    notification_decoder,
)
from stages.settings import Settings
from stages.tools.admin import set_quotas, write_behind_drained
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, tick_through_timers, wait_until
from tests.test_admin import devsched_command


async def test_renewal_extends_persists_bills_once_and_notifies(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="u1")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("u1", duration_minutes=1)
        assert isinstance(got, Allocated)
        renewed = await client.renew(got.allocation_id, "u1", extend_minutes=2, request_id="n1")
        again = await client.renew(got.allocation_id, "u1", extend_minutes=2, request_id="n1")
    assert isinstance(renewed, Renewed) and again == renewed
    assert renewed.previous_expires_at_ms == got.expires_at_ms
    assert renewed.expires_at_ms == got.expires_at_ms + 120_000  # extended once
    assert renewed.duration_minutes == 3

    clock.advance(61_000)  # past the first expires-at: still active
    await tick_through_timers(redis, settings, clock)
    assert await redis.hget(keys.allocation(got.allocation_id), "status") == b"allocated"
    await wait_until(lambda: write_behind_drained(redis, keys))
    async with pg.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM device_allocations WHERE id = $1",
                                  got.allocation_id)
    assert row["status"] == "allocated" and row["version"] == 2
    assert int(row["expires_at"].timestamp() * 1000) == renewed.expires_at_ms
    assert row["duration_minutes"] == 3

    clock.advance(120_000)  # past the new one: expired there, billed as one allocation
    await tick_through_timers(redis, settings, clock)
    await wait_until(lambda: write_behind_drained(redis, keys))
    async with pg.acquire() as conn:
        ledger = await conn.fetch("SELECT * FROM billing_ledger WHERE allocation_id = $1",
                                  got.allocation_id)
        row = await conn.fetchrow("SELECT * FROM device_allocations WHERE id = $1",
                                  got.allocation_id)
    assert [(r["duration_seconds"], r["end_reason"]) for r in ledger] == [(180, "expired")]
    assert row["status"] == "expired" and row["duration_seconds"] == 180

    notes = [notification_decoder.decode(f[b"d"])
             for _, f in await redis.xrange(keys.notifications)]
    [note] = [n for n in notes if n.event == "allocation.renewed"]
    assert (note.allocation_id, note.request_id) == (got.allocation_id, "n1")
    assert (note.expires_at_ms, note.previous_expires_at_ms) == (
        renewed.expires_at_ms, got.expires_at_ms)


async def test_renewal_refusals_are_typed(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock,
) -> None:
    day = 86_400_000
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}") for i in range(4)],
               quotas=[QuotaSpec(user_id="u1"), QuotaSpec(user_id="u2"),
                       QuotaSpec(user_id="brief", expires_at_ms=clock.now_ms() + day)])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        mine = await client.allocate("u1", duration_minutes=60)
        ended = await client.allocate("u1", duration_minutes=60)
        short = await client.allocate("brief", duration_minutes=60)
        assert isinstance(mine, Allocated) and isinstance(ended, Allocated)
        assert isinstance(short, Allocated)
        await client.release(allocation_id=ended.allocation_id)

        async def refused(aid: str, user: str, **extend: int) -> str:
            reply = await client.renew(aid, user, **extend)
            assert isinstance(reply, Failed), reply
            return reply.reason

        assert await refused(mine.allocation_id, "u2", extend_minutes=1) == "not_owner"
        assert await refused("no-such", "u1", extend_minutes=1) == "not_found"
        assert await refused(ended.allocation_id, "u1", extend_minutes=1) == "not_active"
        assert await refused(short.allocation_id, "brief",
                             extend_minutes=24 * 60) == "exceeds_quota_expiry"
        assert await refused(mine.allocation_id, "u1",
                             extend_seconds=settings.max_allocation_s) == "exceeds_max_duration"
        for status, reason in (("suspended", "user_suspended"), ("overdue", "billing_overdue")):
            await set_quotas(redis, keys, clock, [QuotaSpec(user_id="u1", status=status)])
            assert await refused(mine.allocation_id, "u1", extend_minutes=1) == reason
        await set_quotas(redis, keys, clock, [QuotaSpec(user_id="u1")])
        ok = await client.renew(mine.allocation_id, "u1", extend_minutes=1)
        assert isinstance(ok, Renewed) and ok.expires_at_ms == mine.expires_at_ms + 60_000
    # the refusals left it as it was: only the last renewal moved it
    assert int(await redis.zscore(keys.expiry, mine.allocation_id) or 0) == ok.expires_at_ms


async def test_renew_command_prints_the_typed_reply(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="u1")])
    async with Client(replace(settings), timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("u1", duration_minutes=5)
    assert isinstance(got, Allocated)
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix)
    proc = await asyncio.create_subprocess_exec(
        devsched_command(), "renew", got.allocation_id, "--user", "u1", "--minutes", "10",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), EVENT_TIMEOUT_S)
    assert proc.returncode == 0, err.decode()
    reply = orjson.loads(out)
    assert reply["type"] == "renewed"
    assert reply["expires_at_ms"] == got.expires_at_ms + 600_000
