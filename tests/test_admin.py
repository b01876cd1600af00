"""What the admin readers report, against the real stages.

``stats()`` counts devices, free devices and active allocations from the live
state, and allocated / released / expired totals from the state changes the
scripts made (a refused request, a repeated release change nothing). The device
list pages by cursor in one stable order (by id), with no duplicate and no gap,
also while devices are added, deleted and allocated between pages; each page reads
a bounded number of devices; it filters by pool, status, model, minimum CPU and
memory. ``pools`` counts devices by status per pool; the allocation list pages the
active ones from Redis and the history from PostgreSQL. ``devsched devices list``,
``pools`` and ``allocations list`` print a table or the same rows as JSON. A release
by device of a device nobody holds is ``not_found``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import sysconfig
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec, Released
from stages.settings import Settings
from stages.tools import admin
from stages.tools.admin import (
    AllocationRow,
    Stats,
    add_devices,
    list_allocations,
    list_devices,
    pools,
    set_strategy,
    stats,
    write_behind_drained,
)
from stages.tools.client import Client
from tests.conftest import (
    EVENT_TIMEOUT_S,
    RunningPipeline,
    seed,
    tick_through_timers,
    wait_until,
)


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
    """23 devices, every third in pool b (8), the others in pool a (15); models k30 and
    p40 alternate, CPU 2/4/8 and memory 1-4 GB vary with the index."""
    return [DeviceSpec(id=f"dev-{i:02d}", pool="b" if i % 3 == 0 else "a",
                       model="k30" if i % 2 else "p40", cpu_cores=2 << (i % 3),
                       memory_mb=1024 * (1 + i % 4)) for i in range(DEVICE_COUNT)]


async def pages(redis: Redis, keys: Keys, *, limit: int, **filters: Any) -> list[list[str]]:
    """The ids of every page, following the cursor until there is none."""
    out: list[list[str]] = []
    cursor = None
    while True:
        page = await list_devices(redis, keys, cursor=cursor, limit=limit, **filters)
        out.append([row.id for row in page.devices])
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


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
    whole = await list_devices(redis, keys, limit=100)
    assert [r.id for r in whole.devices] == every_id and whole.next_cursor is None
    after = await list_devices(redis, keys, cursor=every_id[19], limit=100)
    assert [r.id for r in after.devices] == every_id[20:]

    in_b = [s.id for s in specs if s.pool == "b"]
    by_pool = await pages(redis, keys, limit=PAGE, pool="b")
    assert [i for p in by_pool for i in p] == in_b
    assert all(len(p) <= PAGE for p in by_pool)
    rows = (await list_devices(redis, keys, pool="a", limit=100)).devices
    assert [r.id for r in rows] == [s.id for s in specs if s.pool == "a"]
    assert {r.pool for r in rows} == {"a"}
    assert (await list_devices(redis, keys, pool="nowhere")).devices == []


async def test_device_list_rows_carry_numbers_and_filters_combine(
    redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    specs = fleet()
    await seed(redis, keys, clock, devices=specs, quotas=[])
    first = (await list_devices(redis, keys, limit=1)).devices[0]
    assert asdict(first) == {
        "id": "dev-00", "name": "dev-00", "pool": "b", "model": "p40", "host": "node-1",
        "adb_host": "127.0.0.1", "adb_port": 5555, "cpu_cores": 2, "memory_mb": 1024,
        "storage_mb": 32768, "status": "available", "allocation_id": None, "version": 1}

    def want(**f: Any) -> list[str]:
        return [s.id for s in specs
                if (f.get("pool") is None or s.pool == f["pool"])
                and (f.get("model") is None or s.model == f["model"])
                and s.cpu_cores >= f.get("min_cpu", 0) and s.memory_mb >= f.get("min_memory", 0)]

    for filters in ({"model": "k30"}, {"min_cpu": 4}, {"min_memory": 3072},
                    {"pool": "a", "model": "p40", "min_cpu": 4},
                    {"min_cpu": 8, "min_memory": 4096}, {"model": "none"}):
        got = await pages(redis, keys, limit=3, **filters)
        assert [i for p in got for i in p] == want(**filters), filters


async def test_a_page_reads_a_bounded_number_of_devices(
    redis: Redis, keys: Keys, clock: ManualClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A selective filter gives short (even empty) pages with a cursor, not a read of
    every device: each page reads at most its budget."""
    await seed(redis, keys, clock, devices=fleet(), quotas=[])
    monkeypatch.setattr(admin, "LIST_SCAN_MIN", 4)
    monkeypatch.setattr(admin, "LIST_SCAN_FACTOR", 2)
    monkeypatch.setattr(admin, "LIST_READ_CHUNK", 4)
    read: list[int] = []
    real = admin._hgetall_chunk

    async def counting(r: Redis, names: list[str]) -> list[dict[str, str]]:
        read.append(len(names))
        return await real(r, names)

    monkeypatch.setattr(admin, "_hgetall_chunk", counting)
    page = await list_devices(redis, keys, limit=1, model="none")
    assert page.devices == [] and page.next_cursor == "dev-03" and sum(read) == 4
    got = await pages(redis, keys, limit=1, model="none")
    assert all(p == [] for p in got) and len(got) == 6  # 23 devices, 4 per page


async def device_status_is(redis: Redis, keys: Keys, device_id: str, status: str) -> bool:
    return await redis.hget(keys.device(device_id), "status") == status.encode()


async def test_device_list_under_concurrent_changes_lists_every_stable_device_once(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    """Devices added, deleted and allocated between pages: every device present through
    the whole listing is listed exactly once, nothing twice, a deleted one not after its
    deletion, one added behind the cursor not at all."""
    specs = fleet()
    await seed(redis, keys, clock, devices=specs, quotas=[QuotaSpec(user_id="u1")])
    listed: list[str] = []
    cursor = None
    n = deleted_from = 0
    deleted = {"dev-20"}
    stable = {s.id for s in specs} - deleted
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        while True:
            page = await list_devices(redis, keys, cursor=cursor, limit=4)
            listed += [r.id for r in page.devices]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
            n += 1
            # between pages: new devices before and after the cursor, one allocated, one
            # not yet listed deleted
            await add_devices(redis, keys, clock, [DeviceSpec(id=f"dev-{n:02d}a"),
                                                   DeviceSpec(id=f"aaa-{n}")])
            if n == 2:
                deleted_from = len(listed)
                await redis.xadd(keys.events, {"d": orjson.dumps({
                    "type": "device.deleted", "event_id": "del", "device_id": "dev-20",
                    "occurred_at_ms": clock.now_ms()})})
                await wait_until(lambda: device_status_is(redis, keys, "dev-20", "deleted"))
            got = await client.allocate("u1")
            assert isinstance(got, Allocated), got
        await client.release(device_id=specs[-1].id)
    assert len(listed) == len(set(listed))  # nothing twice
    assert stable <= set(listed)  # every device present throughout
    assert not deleted & set(listed[deleted_from:])  # none after its deletion
    assert not any(i.startswith("aaa-") for i in listed)  # behind the cursor: not listed


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
    assert [i for p in allocated for i in p] == taken
    rows = (await list_devices(redis, keys, status="allocated", limit=10)).devices
    assert {r.allocation_id for r in rows} == {g.allocation_id for g in got
                                               if isinstance(g, Allocated)}
    available = [r.id for r in (await list_devices(redis, keys, status="available",
                                                   limit=100)).devices]
    assert available == sorted({s.id for s in specs} - set(taken))
    taken_in_b = [r.id for r in (await list_devices(redis, keys, pool="b",
                                                    status="allocated")).devices]
    assert taken_in_b == [i for i in taken if i in {s.id for s in specs if s.pool == "b"}]
    assert len(taken_in_b) == 1


# --- pools and allocations ----------------------------------------------------------------


async def test_pools_report_utilisation_per_pool(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock,
               devices=[DeviceSpec(id=f"a{i}", pool="a") for i in range(4)]
               + [DeviceSpec(id=f"b{i}", pool="b") for i in range(3)],
               quotas=[QuotaSpec(user_id="u1")])
    await set_strategy(redis, keys, "bin_pack", pool="b")
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        for _ in range(2):
            assert isinstance(await client.allocate("u1", pool="a"), Allocated)
        assert isinstance(await client.allocate("u1", pool="b"), Allocated)
    await redis.xadd(keys.events, {"d": orjson.dumps({
        "type": "device.maintenance", "event_id": "m1", "occurred_at_ms": clock.now_ms(),
        "device_id": "a3"})})
    await redis.xadd(keys.events, {"d": orjson.dumps({
        "type": "device.failed", "event_id": "f1", "occurred_at_ms": clock.now_ms(),
        "device_id": "b2"})})

    async def settled() -> bool:
        return {p.pool: (p.maintenance, p.down) for p in await pools(redis, keys)} == {
            "a": (1, 0), "b": (0, 1)}

    await wait_until(settled)
    assert [asdict(p) for p in await pools(redis, keys)] == [
        {"pool": "a", "devices": 4, "free": 1, "allocated": 2, "maintenance": 1, "down": 0,
         "share_used": 0.5, "strategy": "resource_based"},
        {"pool": "b", "devices": 3, "free": 1, "allocated": 1, "maintenance": 0, "down": 1,
         "share_used": 0.3333, "strategy": "bin_pack"},
    ]


async def test_allocations_list_active_from_redis_and_history_from_postgresql(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}") for i in range(9)],
               quotas=[QuotaSpec(user_id="u1"), QuotaSpec(user_id="u2")])
    made: list[Allocated] = []
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        for i in range(7):
            got = await client.allocate("u1" if i % 2 else "u2", duration_minutes=10 + i % 3)
            assert isinstance(got, Allocated), got
            made.append(got)
            clock.advance(1000)
        for got in made[:3]:
            assert isinstance(await client.release(allocation_id=got.allocation_id), Released)

    async def every(**kw: Any) -> list[AllocationRow]:
        out: list[AllocationRow] = []
        cursor = None
        while True:
            page = await list_allocations(redis, keys, pg, cursor=cursor, limit=2, **kw)
            assert len(page.allocations) <= 2
            out += page.allocations
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor

    active = await every()
    assert {r.source for r in active} == {"redis"}
    assert sorted(r.allocation_id for r in active) == sorted(g.allocation_id for g in made[3:])
    assert len({r.allocation_id for r in active}) == len(active)
    assert [(r.expires_at_ms, r.allocation_id) for r in active] == sorted(
        (r.expires_at_ms, r.allocation_id) for r in active)
    mine = await every(user="u1")
    assert sorted(r.allocation_id for r in mine) == sorted(
        g.allocation_id for g in made[3:] if g.user_id == "u1")
    assert all(r.status == "allocated" and r.cpu_cores == 2 for r in mine)

    await wait_until(lambda: write_behind_drained(redis, keys))
    history = await every(status="released")
    assert {r.source for r in history} == {"postgresql"}
    assert [r.allocation_id for r in history] == [g.allocation_id for g in reversed(made[:3])]
    assert all(r.end_reason == "released" and r.duration_seconds is not None for r in history)
    everything = await every(status="all", user="u2")
    assert [r.allocation_id for r in everything] == [
        g.allocation_id for g in reversed(made) if g.user_id == "u2"]


async def test_a_release_by_device_of_a_free_device_is_not_found(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="u1")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("u1")
        assert isinstance(got, Allocated)
        first = await client.release(device_id="d1")
        assert isinstance(first, Released) and not first.already_released
        again = await client.release(device_id="d1")
        assert isinstance(again, Failed) and again.reason == "not_found", again
        # by the allocation's id, a second release still answers already_released
        by_id = await client.release(allocation_id=got.allocation_id)
        assert isinstance(by_id, Released) and by_id.already_released


# --- the commands ---------------------------------------------------------------------------


def devsched_command() -> str:
    """The installed ``devsched`` command of this interpreter's environment."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (folder / "devsched").is_file():
            return str(folder / "devsched")
    found = shutil.which("devsched")
    assert found, "the devsched command is not installed (pip install -e .)"
    return found


async def devsched(settings: Settings, *args: str) -> str:
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix)
    proc = await asyncio.create_subprocess_exec(
        devsched_command(), *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), EVENT_TIMEOUT_S)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_devices_list_command_prints_a_table_or_json_pages(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=fleet(), quotas=[])
    in_a = [s.id for s in fleet() if s.pool == "a"]
    printed = orjson.loads(await devsched(settings, "devices", "list", "--pool", "a",
                                          "--limit", "4", "--json"))
    expected = await list_devices(redis, keys, pool="a", limit=4)
    assert printed == {"devices": [asdict(r) for r in expected.devices],
                       "next_cursor": expected.next_cursor}
    assert [row["id"] for row in printed["devices"]] == in_a[:4]
    assert isinstance(printed["devices"][0]["cpu_cores"], int)
    following = orjson.loads(await devsched(settings, "devices", "list", "--pool", "a",
                                            "--limit", "4", "--json", "--cursor",
                                            printed["next_cursor"]))
    assert [row["id"] for row in following["devices"]] == in_a[4:8]

    table = (await devsched(settings, "devices", "list", "--pool", "a", "--limit", "2"))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["ID", "POOL", "MODEL"]
    assert lines[1].split()[0] == in_a[0] and lines[2].split()[0] == in_a[1]
    assert lines[-1] == f"(more: --cursor {in_a[1]})"

    pools_json = orjson.loads(await devsched(settings, "pools", "--json"))
    assert [(p["pool"], p["devices"], p["free"]) for p in pools_json["pools"]] == [
        ("a", 15, 15), ("b", 8, 8)]
    pools_table = (await devsched(settings, "pools")).splitlines()
    assert pools_table[0].split() == ["POOL", "DEVICES", "FREE", "ALLOCATED", "MAINTENANCE",
                                      "DOWN", "SHARE_USED", "STRATEGY"]
    assert pools_table[1].split() == ["a", "15", "15", "0", "0", "0", "0.00%",
                                      "resource_based"]
    active = orjson.loads(await devsched(settings, "allocations", "list", "--json"))
    assert active == {"allocations": [], "next_cursor": None, "source": "redis"}
