"""Fixtures: real Redis and PostgreSQL from the project's own launcher.

With REDIS_URL and DATABASE_URL set the tests use those servers; otherwise the
embedded launcher starts redis-server and PostgreSQL in .devsched/test (once
per session) and stops them at the end. Each test gets its own key prefix, so
tests never see each other's Redis state; tables are emptied per test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

import sql
from pipeline.clock import ManualClock
from pipeline.connections import pg_pool, redis_client
from pipeline.embedded import ServerUrls, ensure_servers, stop_servers
from pipeline.migrate import migrate
from pipeline.worker import groups_caught_up
from schemas.keys import (
    GROUP_BILL,
    GROUP_EVENTS,
    GROUP_NOTIFY,
    GROUP_PERSIST,
    GROUP_QUOTA,
    GROUP_SELECT,
    GROUP_TIMERS,
    Keys,
)
from schemas.messages import DeviceSpec, QuotaSpec
from stages.app import serve
from stages.context import StageContext
from stages.settings import Settings
from stages.state import mark_state
from stages.timers import add_tick
from stages.tools.admin import add_devices, delete_keys, empty_tables, set_quotas

ROOT = Path(__file__).resolve().parent.parent

EVENT_TIMEOUT_S = 30.0
"""How long a test waits for something that must happen: far above what a busy shared
machine needs, so only a broken behaviour reaches it (a passing test never waits it out)."""


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerUrls]:
    base = Settings.from_env()
    own_dir = None
    if not (base.redis_url and base.database_url):
        # servers of this test session alone: a parallel session cannot stop them under us
        own_dir = ROOT / ".devsched" / "test" / str(os.getpid())
        base = replace(base, data_dir=own_dir)
    urls, started = ensure_servers(base)
    asyncio.run(migrate(urls.database_url, sql.migrations()))
    yield urls
    if started:
        stop_servers(base)
    if own_dir is not None:
        shutil.rmtree(own_dir, ignore_errors=True)


@pytest.fixture
def settings(servers: ServerUrls) -> Settings:
    """Per-test settings: own key prefix, fast reclaim so fault tests stay short."""
    base = Settings.from_env().with_urls(servers.redis_url, servers.database_url)
    return replace(
        base, prefix=f"t{uuid.uuid4().hex[:10]}", block_ms=50, claim_idle_ms=300,
        claim_every_ms=100, batch_size=64,
    )


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.prefix)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest_asyncio.fixture
async def redis(settings: Settings, clock: ManualClock) -> AsyncIterator[Redis]:
    """A client on the test's own prefix, whose live state is established (a fresh state:
    the state marker written, as `devsched up` does on a fresh install)."""
    client = redis_client(settings)
    await mark_state(client, Keys(settings.prefix), by="test", now_ms=clock.now_ms())
    yield client
    await delete_keys(client, settings.prefix)
    await client.aclose()


@pytest_asyncio.fixture
async def pg(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await pg_pool(settings)  # the stages' own pool, as `devsched run` makes it
    await empty_tables(pool)
    yield pool
    await pool.close()


@pytest.fixture
def ctx(redis: Redis, settings: Settings, clock: ManualClock) -> StageContext:
    return StageContext(redis=redis, settings=settings, clock=clock)


async def seed(
    redis: Redis, keys: Keys, clock: ManualClock, *, devices: list[DeviceSpec],
    quotas: list[QuotaSpec],
) -> None:
    await add_devices(redis, keys, clock, devices)
    await set_quotas(redis, keys, clock, quotas)


async def workers_up(redis: Redis, keys: Keys, task: asyncio.Task[None]) -> bool:
    """Every stage of the pipeline has a consumer registered in its group (its worker is
    reading); fails at once if the pipeline task ended."""
    if task.done():
        task.result()
        raise AssertionError("the pipeline stopped before its workers were up")
    for stream, group in ((keys.requests, GROUP_QUOTA), (keys.admitted, GROUP_SELECT),
                          (keys.changes, GROUP_PERSIST), (keys.changes, GROUP_BILL),
                          (keys.changes, GROUP_NOTIFY), (keys.ticks, GROUP_TIMERS),
                          (keys.events, GROUP_EVENTS)):
        try:
            if not await redis.xinfo_consumers(stream, group):
                return False
        except ResponseError:  # no stream or no group yet
            return False
    return True


class RunningPipeline:
    def __init__(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        self.task = task
        self.stop = stop

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, EVENT_TIMEOUT_S)


@pytest_asyncio.fixture
async def pipeline(
    settings: Settings, clock: ManualClock, pg: asyncpg.Pool, redis: Redis
) -> AsyncIterator[RunningPipeline]:
    """Every stage running in this event loop on the test's prefix and clock."""
    stop = asyncio.Event()
    names = ["quota", "select", "persist", "bill", "notify", "timers", "events"]
    task = asyncio.create_task(serve(names, settings, clock, stop=stop, install_signals=False))
    running = RunningPipeline(task, stop)
    await wait_until(lambda: workers_up(redis, Keys(settings.prefix), task))
    yield running
    if not task.done():
        await running.close()


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float = EVENT_TIMEOUT_S,
) -> None:
    """Poll an async condition until it holds; fail the test past the timeout."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def tick_through_timers(redis: Redis, settings: Settings, clock: ManualClock) -> None:
    """Give the running timers stage the tick of the clock's current period (added here
    or by the pipeline's own ticker: one per period) and wait until it was handled."""
    keys = Keys(settings.prefix)
    await add_tick(StageContext(redis=redis, settings=settings, clock=clock))
    await wait_until(lambda: groups_caught_up(redis, keys.ticks, [GROUP_TIMERS]))
