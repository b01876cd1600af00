"""Timer ticks: one per period with no leader, and a handled tick expires what is due.

Tickers racing on the same period (same clock time, separate connections) add exactly
one tick, whose id is the period's start; the next period gets its own. With the whole
pipeline running, a tick handled by the timers stage closes the allocations past their
expires-at (as ``expired``, at that instant), leaves the others alone, and is acked.
A ticker that cannot reach Redis keeps trying until it is stopped.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pipeline.clock import ManualClock
from pipeline.connections import redis_client
from schemas.keys import GROUP_TIMERS, Keys
from schemas.messages import Allocated, DeviceSpec, QuotaSpec, Tick, tick_decoder
from stages.context import StageContext
from stages.settings import Settings
from stages.timers import add_tick, run_ticker
from stages.tools.admin import user_state
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, wait_until


@pytest_asyncio.fixture
async def other_redis(settings: Settings) -> AsyncIterator[Redis]:
    """A second ticker's own connection."""
    client = redis_client(settings)
    yield client
    await client.aclose()


def period_start(settings: Settings, clock: ManualClock) -> int:
    return clock.now_ms() // settings.tick_ms * settings.tick_ms


async def test_tickers_racing_on_one_period_add_exactly_one_tick(
    settings: Settings, redis: Redis, other_redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    one = StageContext(redis=redis, settings=settings, clock=clock)
    two = StageContext(redis=other_redis, settings=settings, clock=clock)
    clock.advance(settings.tick_ms // 3)  # mid-period

    assert await add_tick(one) is True
    assert await add_tick(two) is False
    assert sorted(await asyncio.gather(add_tick(one), add_tick(two))) == [False, False]
    start = period_start(settings, clock)
    [(tick_id, fields)] = await redis.xrange(keys.ticks)
    assert tick_id.decode() == f"{start}-0"
    assert tick_decoder.decode(fields[b"d"]) == Tick(at_ms=start)

    clock.advance(settings.tick_ms)  # the next period: the race has one winner again
    assert sorted(await asyncio.gather(add_tick(one), add_tick(two))) == [False, True]
    assert [i.decode() for i, _ in await redis.xrange(keys.ticks)] == [
        f"{start}-0", f"{start + settings.tick_ms}-0"]


async def timers_acked(redis: Redis, keys: Keys, tick_id: str) -> bool:
    [group] = [g for g in await redis.xinfo_groups(keys.ticks)
               if g["name"].decode() == GROUP_TIMERS]
    delivered = tuple(int(x) for x in group["last-delivered-id"].decode().split("-"))
    wanted = tuple(int(x) for x in tick_id.split("-"))
    return delivered >= wanted and group["pending"] == 0


async def test_tick_handled_by_timers_expires_due_allocations_and_is_acked(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="u1")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        short = await client.allocate("u1", duration_minutes=1)
        long = await client.allocate("u1", duration_minutes=10)
    assert isinstance(short, Allocated) and isinstance(long, Allocated)

    clock.advance(61_000)
    # this ticker or the pipeline's own (same clock) adds the period's one tick
    await add_tick(StageContext(redis=redis, settings=settings, clock=clock))
    tick_id = f"{period_start(settings, clock)}-0"
    assert len(await redis.xrange(keys.ticks, tick_id, tick_id)) == 1
    await wait_until(lambda: timers_acked(redis, keys, tick_id))

    expired = await redis.hgetall(keys.allocation(short.allocation_id))
    assert expired[b"status"] == b"expired"
    assert int(expired[b"released_at_ms"]) == short.expires_at_ms
    assert int(expired[b"duration_seconds"]) == 60
    assert (await redis.hget(keys.allocation(long.allocation_id), "status")) == b"allocated"
    assert await redis.zcard(keys.expiry) == 1
    assert await redis.zrange(keys.expiry, 0, -1) == [long.allocation_id.encode()]
    assert (await user_state(redis, keys, "u1")).usage["devices"] == 1


async def test_ticker_that_cannot_reach_redis_keeps_trying_until_stopped(
    settings: Settings, clock: ManualClock, caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2,
                        retry=Retry(NoBackoff(), 0))
    ctx = StageContext(redis=unreachable, settings=replace(settings, tick_ms=20), clock=clock)
    stopping = asyncio.Event()
    ticker = asyncio.create_task(run_ticker(ctx, stopping))

    async def failed_ticks(n: int) -> bool:
        assert not ticker.done(), ticker
        return caplog.text.count("ticker cannot reach redis") >= n

    try:
        await wait_until(lambda: failed_ticks(3))
    finally:
        stopping.set()
        await asyncio.wait_for(ticker, EVENT_TIMEOUT_S)
        await unreachable.aclose()
