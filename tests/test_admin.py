"""What the admin readers report, against the real stages.

``stats()`` counts devices, free devices and active allocations from the live
state, and allocated / released / expired totals from the state changes the
scripts made (a refused request, a repeated release change nothing). The device
list pages in one stable order (by id), with no duplicate and no gap between
pages and a short last page, and filters by pool and by status; ``devsched
devices list`` prints the same rows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import orjson
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec, Released
from stages.settings import Settings
from stages.tools.admin import Stats, list_devices, stats
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, tick_through_timers


async def test_stats_count_devices_free_active_and_each_kind_of_close(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    assert await stats(redis, keys) == Stats(
        devices=0, free=0, active=0, allocated_total=0, released_total=0, expired_total=0)
    await seed(redis, keys, clock,
               devices=[DeviceSpec(id=f"a{i}", pool="a") for i in range(3)]
               + [DeviceSpec(id=f"b{i}", pool="b") for i in range(2)],
               quotas=[QuotaSpec(user_id="u1")])
    assert await stats(redis, keys) == Stats(
        devices=5, free=5, active=0, allocated_total=0, released_total=0, expired_total=0)

    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        kept = await client.allocate("u1", duration_minutes=60, pool="b")
        short = [await client.allocate("u1", duration_minutes=1) for _ in range(2)]
        freed = await client.allocate("u1", duration_minutes=60)
        assert all(isinstance(a, Allocated) for a in [*short, kept, freed]), (short, kept, freed)
        assert isinstance(freed, Allocated)
        refused = await client.allocate("nobody")  # no quota: refused, counts nothing
        assert isinstance(refused, Failed) and refused.reason == "quota_exceeded"
        assert await stats(redis, keys) == Stats(
            devices=5, free=1, active=4, allocated_total=4, released_total=0, expired_total=0)

        released = await client.release(allocation_id=freed.allocation_id)
        again = await client.release(allocation_id=freed.allocation_id)  # changes nothing
        assert isinstance(released, Released) and not released.already_released
        assert isinstance(again, Released) and again.already_released

    assert await stats(redis, keys) == Stats(
        devices=5, free=2, active=3, allocated_total=4, released_total=1, expired_total=0)

    clock.advance(61_000)  # past the short ones' expires-at, before the other's
    await tick_through_timers(redis, settings, clock)

    assert await stats(redis, keys) == Stats(
        devices=5, free=4, active=1, allocated_total=4, released_total=1, expired_total=2)


# --- the device list ------------------------------------------------------------------


DEVICE_COUNT = 23
PAGE = 5


def fleet() -> list[DeviceSpec]:
    """23 devices, every third in pool b (8), the others in pool a (15)."""
    return [DeviceSpec(id=f"dev-{i:02d}", pool="b" if i % 3 == 0 else "a")
            for i in range(DEVICE_COUNT)]


async def pages(redis: Redis, keys: Keys, *, limit: int, **filters: str) -> list[list[str]]:
    """The ids of every page, from offset 0 until a page comes back short."""
    out: list[list[str]] = []
    while True:
        rows = await list_devices(redis, keys, offset=len(out) * limit, limit=limit, **filters)
        out.append([row["id"] for row in rows])
        if len(rows) < limit:
            return out


async def test_device_list_pages_in_id_order_without_duplicates_or_gaps(
    redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    specs = fleet()
    await seed(redis, keys, clock, devices=list(reversed(specs)), quotas=[])
    every_id = sorted(s.id for s in specs)

    got = await pages(redis, keys, limit=PAGE)
    assert [len(p) for p in got] == [5, 5, 5, 5, 3]  # the last page is short
    assert [i for p in got for i in p] == every_id  # in id order, each once, none missing
    assert await pages(redis, keys, limit=PAGE) == got  # the same order every time
    assert await list_devices(redis, keys, offset=DEVICE_COUNT, limit=PAGE) == []
    assert [r["id"] for r in await list_devices(redis, keys, offset=20, limit=100)] == (
        every_id[20:])

    in_b = [s.id for s in specs if s.pool == "b"]
    by_pool = await pages(redis, keys, limit=PAGE, pool="b")
    assert [len(p) for p in by_pool] == [5, 3]
    assert [i for p in by_pool for i in p] == in_b
    rows = await list_devices(redis, keys, pool="a", limit=100)
    assert [r["id"] for r in rows] == [s.id for s in specs if s.pool == "a"]
    assert {r["pool"] for r in rows} == {"a"}
    assert await list_devices(redis, keys, pool="nowhere") == []


async def test_device_list_filters_by_status_alone_and_with_the_pool(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    specs = fleet()
    await seed(redis, keys, clock, devices=specs, quotas=[QuotaSpec(user_id="u1")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = [await client.allocate("u1", pool=pool) for pool in ("a", "a", "b")]
    assert all(isinstance(g, Allocated) for g in got), got
    taken = sorted(g.device.id for g in got if isinstance(g, Allocated))

    allocated = await pages(redis, keys, limit=2, status="allocated")
    assert [len(p) for p in allocated] == [2, 1]
    assert [i for p in allocated for i in p] == taken
    available = [r["id"] for r in await list_devices(redis, keys, status="available", limit=100)]
    assert available == sorted({s.id for s in specs} - set(taken))
    taken_in_b = [r["id"] for r in await list_devices(redis, keys, pool="b", status="allocated")]
    assert taken_in_b == [i for i in taken if i in {s.id for s in specs if s.pool == "b"}]
    assert len(taken_in_b) == 1


def devsched_command() -> str:
    """The installed ``devsched`` command of this interpreter's environment."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (folder / "devsched").is_file():
            return str(folder / "devsched")
    found = shutil.which("devsched")
    assert found, "the devsched command is not installed (pip install -e .)"
    return found


async def test_devices_list_command_prints_the_requested_page_as_json_lines(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=fleet(), quotas=[])
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix)
    proc = await asyncio.create_subprocess_exec(
        devsched_command(), "devices", "list", "--pool", "a", "--offset", "5", "--limit", "4",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), EVENT_TIMEOUT_S)
    assert proc.returncode == 0, err.decode()

    printed = [orjson.loads(line) for line in out.splitlines()]
    expected = await list_devices(redis, keys, pool="a", offset=5, limit=4)
    assert printed == expected
    in_a = [s.id for s in fleet() if s.pool == "a"]
    assert [row["id"] for row in printed] == in_a[5:9]
