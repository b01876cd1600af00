"""End to end through the real streams: allocate, release, expire, persist, bill, notify."""

from __future__ import annotations

import asyncpg
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import Keys
from schemas.messages import (
    Allocated,
    DeviceSpec,
    Failed,
    QuotaSpec,
    Released,
    notification_decoder,
)
from stages.select import allocation_id
from stages.settings import Settings
from stages.state import mark_state
from stages.timers import expire_due
from stages.tools.admin import add_devices, user_state, write_behind_drained
from stages.tools.audit import audit
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, wait_until


async def test_allocate_release_persist_and_bill(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock,
               devices=[DeviceSpec(id="d1", cpu_cores=4, memory_mb=8192),
                        DeviceSpec(id="d2", cpu_cores=2, memory_mb=4096)],
               quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("alice", tenant_id="t1", duration_minutes=30, min_cpu_cores=2)
        assert isinstance(got, Allocated), got
        assert got.device.id == "d2"  # best fit: the smaller device that meets the minimum
        assert got.expires_at_ms - got.allocated_at_ms == 30 * 60_000
        clock.advance(90_500)
        rel = await client.release(allocation_id=got.allocation_id, user_id="alice")
        assert isinstance(rel, Released) and rel.duration_seconds == 90 and not rel.already_released
        again = await client.release(allocation_id=got.allocation_id, user_id="alice")
        assert isinstance(again, Released) and again.already_released
        assert again.duration_seconds == 90
    await wait_until(lambda: write_behind_drained(redis, keys))
    async with pg.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM device_allocations WHERE id = $1", got.allocation_id)
        ledger = await conn.fetch("SELECT * FROM billing_ledger")
    assert row["status"] == "released" and row["duration_seconds"] == 90 and row["version"] == 2
    assert [r["duration_seconds"] for r in ledger] == [90]
    notes = [notification_decoder.decode(f[b"d"]).event
             for _, f in await redis.xrange(keys.notifications)]
    assert notes == ["device.allocated", "device.released"]
    report = await audit(redis, keys, pg)
    assert report["consistent"], report


async def test_quota_refusals_are_typed(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock,
               devices=[DeviceSpec(id=f"d{i}") for i in range(3)],
               quotas=[QuotaSpec(user_id="bob", max_devices=1),
                       QuotaSpec(user_id="sus", status="suspended")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        first = await client.allocate("bob")
        assert isinstance(first, Allocated)
        second = await client.allocate("bob")
        assert isinstance(second, Failed) and second.reason == "quota_exceeded"
        assert second.message == "Device quota exceeded. Max: 1, Current: 1"
        assert second.remaining_devices == 0
        sus = await client.allocate("sus")
        assert isinstance(sus, Failed) and sus.reason == "user_suspended"
        nobody = await client.allocate("carol")
        assert isinstance(nobody, Failed) and nobody.reason == "quota_exceeded"
        big = await client.allocate("bob", min_cpu_cores=64)
        assert isinstance(big, Failed) and big.reason == "quota_exceeded"


async def test_no_device_fits_and_not_owner(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1", cpu_cores=2)],
               quotas=[QuotaSpec(user_id="u1"), QuotaSpec(user_id="u2")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        none = await client.allocate("u1", min_memory_mb=60_000)
        assert isinstance(none, Failed) and none.reason == "no_available_devices"
        got = await client.allocate("u1")
        assert isinstance(got, Allocated)
        taken = await client.allocate("u2")
        assert isinstance(taken, Failed) and taken.reason == "no_available_devices"
        steal = await client.release(device_id="d1", user_id="u2")
        assert isinstance(steal, Failed) and steal.reason == "not_owner"
        mine = await client.release(device_id="d1", user_id="u1")
        assert isinstance(mine, Released) and mine.allocation_id == got.allocation_id
    state = await user_state(redis, keys, "u1")
    assert state.usage == {"devices": 0, "cpu": 0, "mem": 0, "sto": 0}
    assert state.holds == {} and state.allocations == {}


async def test_same_request_id_gets_the_first_answer(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="u1")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        a = await client.allocate("u1", request_id="r-1")
        b = await client.allocate("u1", request_id="r-1")
        assert isinstance(a, Allocated) and a == b
    assert await redis.zcard(keys.expiry) == 1


async def test_expiry_releases_as_expired_at_expires_at(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="u1")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("u1", duration_minutes=1)
        assert isinstance(got, Allocated)
        clock.advance(59_000)
        assert await expire_due_now(redis, settings, clock) == 0
        clock.advance(1_500)
        assert await expire_due_now(redis, settings, clock) == 1
        rel = await client.release(allocation_id=got.allocation_id)
        assert isinstance(rel, Released) and rel.already_released and rel.status == "expired"
        assert rel.duration_seconds == 60
    await wait_until(lambda: write_behind_drained(redis, keys))
    async with pg.acquire() as conn:
        row = await conn.fetchrow("SELECT status, duration_seconds FROM device_allocations")
        ledger = await conn.fetchrow("SELECT end_reason, duration_seconds FROM billing_ledger")
    assert tuple(row) == ("expired", 60) and tuple(ledger) == ("expired", 60)


async def expire_due_now(redis: Redis, settings: Settings, clock: ManualClock) -> int:
    from stages.context import StageContext
    return await expire_due(StageContext(redis=redis, settings=settings, clock=clock))


async def test_select_takes_its_call_state_afresh_at_every_call(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    """select.lua's helpers sit above its per-call marker: on Redis 7 they are made once, when
    the library loads, and read what a call works with (the pools, the state's epoch, the
    strategy) from variables set again at every call. A pool added and an epoch replaced
    between two calls are seen by the second (a value kept from the first call would give
    the device of the old pool, or an id made from the old epoch)."""
    await seed(redis, keys, clock, devices=[DeviceSpec(id="a", pool="p1", cpu_cores=2)],
               quotas=[QuotaSpec(user_id="u")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        first = await client.allocate("u", min_cpu_cores=2)
        assert isinstance(first, Allocated) and first.device.id == "a"
        await add_devices(redis, keys, clock, [DeviceSpec(id="b", pool="p2", cpu_cores=2)])
        epoch = await mark_state(redis, keys, by="test", now_ms=clock.now_ms(),
                                 epoch="replaced")
        second = await client.allocate("u", min_cpu_cores=2, request_id="second")
        assert isinstance(second, Allocated) and second.device.id == "b"
        assert second.allocation_id == allocation_id(epoch, "u", "second", clock.now_ms())
        assert allocation_id(epoch, "u", "second", clock.now_ms()) != allocation_id(
            "other", "u", "second", clock.now_ms())
