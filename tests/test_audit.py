"""The audit finds every kind of difference between Redis and PostgreSQL, and only those.

Each case starts from a drained pipeline (two users, four devices, two active
allocations and a closed one: consistent), writes one side directly, and checks the
report names that difference (kind, entity, field) and that `devsched audit` exits 1.
Changes still on their way to PostgreSQL (persist stopped, or behind) are not
differences: they are counted as in flight until persist catches up.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, QuotaSpec, Released, Reserved
from stages.app import serve
from stages.schedules import control, set_override
from stages.settings import Settings
from stages.tools.admin import set_quotas, write_behind_drained
from stages.tools.audit import audit
from stages.tools.client import Client
from stages.tools.tenants import set_tenant
from tests.conftest import RunningPipeline, seed, wait_until

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Farm:
    """The drained state each case starts from."""

    settings: Settings
    redis: Redis
    keys: Keys
    pg: asyncpg.Pool
    clock: ManualClock
    alice: Allocated
    """alice's active allocation (on d2)."""
    bob: Allocated
    """bob's active allocation (on d1)."""
    closed: Allocated
    """alice's released allocation (on d3)."""
    reservation: str
    """bob's booked reservation of d4 (tomorrow); tenants ``acme`` (premium) and ``bolt``
    (basic, with an override) are registered and schedule ``usage_report:24h`` paused."""


@pytest_asyncio.fixture
async def farm(pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
               pg: asyncpg.Pool, clock: ManualClock) -> Farm:
    await seed(redis, keys, clock,
               devices=[DeviceSpec(id="d1", cpu_cores=2, memory_mb=4096),
                        DeviceSpec(id="d2", cpu_cores=4, memory_mb=8192),
                        DeviceSpec(id="d3", cpu_cores=8, memory_mb=16384),
                        DeviceSpec(id="d4", cpu_cores=16, memory_mb=32768)],
               quotas=[QuotaSpec(user_id="alice"), QuotaSpec(user_id="bob")])
    async with Client(settings, timeout_s=5) as client:
        alice = await client.allocate("alice", min_cpu_cores=4)
        bob = await client.allocate("bob")
        closed = await client.allocate("alice", min_cpu_cores=8)
        assert isinstance(closed, Allocated)
        assert isinstance(await client.release(allocation_id=closed.allocation_id), Released)
        start = clock.now_ms() + 86_400_000
        booked = await client.reserve("bob", start, start + 3_600_000, device_id="d4")
    assert isinstance(booked, Reserved), booked
    assert isinstance(alice, Allocated) and isinstance(bob, Allocated)
    assert (alice.device.id, bob.device.id, closed.device.id) == ("d2", "d1", "d3")
    now = clock.now_ms()
    await set_tenant(redis, settings, now, "acme", "premium")
    await set_tenant(redis, settings, now, "bolt", "basic")
    assert await set_override(redis, settings, now, "bolt", 1_800_000, now + 86_400_000)
    await control(redis, settings, now, "pause", schedule="usage_report:24h")
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    return Farm(settings, redis, keys, pg, clock, alice, bob, closed, booked.reservation_id)


async def pg_exec(farm: Farm, sql: str, *args: Any) -> None:
    async with farm.pg.acquire() as conn:
        await conn.execute(sql, *args)


Mutation = Callable[[Farm], Awaitable[Any]]


def found(report: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(d["kind"], d["id"], d["field"]) for d in report["differences"]}


async def test_a_drained_pipeline_is_consistent(farm: Farm) -> None:
    report = await audit(farm.redis, farm.keys, farm.pg, farm.clock.now_ms())
    assert report["consistent"] and report["difference_count"] == 0, report
    assert (report["redis_devices"], report["pg_devices"]) == (4, 4)
    assert (report["redis_quotas"], report["pg_quotas"]) == (2, 2)
    assert (report["redis_active"], report["pg_active"]) == (2, 2)
    assert (report["redis_allocations"], report["pg_allocations"]) == (3, 3)
    assert (report["backlog"], report["in_flight"], report["mismatched_count"]) == (0, 0, 0)
    assert (report["redis_reservations"], report["pg_reservations"]) == (1, 1)
    assert (report["redis_tenants"], report["pg_tenants"]) == (2, 2)


# Each case: what to write, then a difference the report must name, as (kind, id, field);
# ids "ALICE" / "BOB" / "CLOSED" stand for the allocation ids.
CASES: dict[str, tuple[Mutation, tuple[str, str, str]]] = {
    "device status in redis": (
        lambda f: f.redis.hset(f.keys.device("d4"), "status", "allocated"),
        ("device", "d4", "status")),
    "device pool in postgres": (
        lambda f: pg_exec(f, "UPDATE devices SET pool = 'lab' WHERE id = 'd4'"),
        ("device", "d4", "pool")),
    "device size in postgres": (
        lambda f: pg_exec(f, "UPDATE devices SET cpu_cores = 99 WHERE id = 'd4'"),
        ("device", "d4", "cpu_cores")),
    "device size in redis": (
        lambda f: f.redis.hset(f.keys.device("d4"), "memory_mb", "1"),
        ("device", "d4", "memory_mb")),
    "device missing from redis": (
        lambda f: asyncio.gather(f.redis.delete(f.keys.device("d4")),
                                 f.redis.srem(f.keys.devices, "d4")),
        ("device", "d4", "present")),
    "device missing from postgres": (
        lambda f: pg_exec(f, "DELETE FROM devices WHERE id = 'd4'"),
        ("device", "d4", "present")),
    "device held by another allocation in redis": (
        lambda f: f.redis.hset(f.keys.device("d2"), "alloc", f.bob.allocation_id),
        ("device", "d2", "allocation")),
    "free device missing from its free pool": (
        lambda f: f.redis.zrem(f.keys.free("default"), "d4"),
        ("device", "d4", "free_pool")),
    "held device in the free pool": (
        lambda f: f.redis.zadd(f.keys.free("default"), {"d2": 1}),
        ("device", "d2", "free_pool")),
    "two active allocations on one device in postgres": (
        lambda f: pg_exec(
            f, "INSERT INTO device_allocations (id, device_id, user_id, status, expires_at, "
               "metadata) SELECT $1, device_id, user_id, status, expires_at, metadata "
               "FROM device_allocations WHERE id = $2",
            uuid.uuid4(), uuid.UUID(f.alice.allocation_id)),
        ("device", "d2", "active_allocations")),
    "quota field in postgres": (
        lambda f: pg_exec(f, "UPDATE user_quotas SET max_devices = 1 WHERE user_id = 'bob'"),
        ("quota", "bob", "max_devices")),
    "quota status in redis": (
        lambda f: f.redis.hset(f.keys.user("bob"), "status", "suspended"),
        ("quota", "bob", "status")),
    "quota missing from postgres": (
        lambda f: pg_exec(f, "DELETE FROM user_quotas WHERE user_id = 'bob'"),
        ("quota", "bob", "present")),
    "usage counter in redis": (
        lambda f: f.redis.hincrby(f.keys.user("alice"), "used_cpu", 3),
        ("usage", "alice", "used_cpu")),
    "usage device count in redis": (
        lambda f: f.redis.hset(f.keys.user("bob"), "used_devices", 0),
        ("usage", "bob", "used_devices")),
    "user's allocation entry missing in redis": (
        lambda f: f.redis.hdel(f.keys.user("alice"), f"alloc:{f.alice.allocation_id}"),
        ("usage", "alice", "allocations")),
    "allocation status in postgres": (
        lambda f: pg_exec(f, "UPDATE device_allocations SET status = 'released', "
                             "released_at = now(), duration_seconds = 1 WHERE id = $1",
                          uuid.UUID(f.bob.allocation_id)),
        ("allocation", "BOB", "status")),
    "allocation expires-at in redis": (
        lambda f: f.redis.hincrby(f.keys.allocation(f.bob.allocation_id), "expires_at_ms", 1000),
        ("allocation", "BOB", "expires_at_ms")),
    "allocation device in redis": (
        lambda f: f.redis.hset(f.keys.allocation(f.bob.allocation_id), "device_id", "d4"),
        ("allocation", "BOB", "device_id")),
    "allocation user in postgres": (
        lambda f: pg_exec(f, "UPDATE device_allocations SET user_id = 'mallory' WHERE id = $1",
                          uuid.UUID(f.bob.allocation_id)),
        ("allocation", "BOB", "user_id")),
    "allocation version in redis": (
        lambda f: f.redis.hset(f.keys.allocation(f.bob.allocation_id), "version", 7),
        ("allocation", "BOB", "version")),
    "billed duration of a closed allocation in postgres": (
        lambda f: pg_exec(f, "UPDATE device_allocations SET duration_seconds = 999 WHERE id = $1",
                          uuid.UUID(f.closed.allocation_id)),
        ("allocation", "CLOSED", "duration_seconds")),
    "active allocation missing from redis": (
        lambda f: asyncio.gather(f.redis.delete(f.keys.allocation(f.bob.allocation_id)),
                                 f.redis.zrem(f.keys.expiry, f.bob.allocation_id)),
        ("allocation", "BOB", "present")),
    "allocation missing from postgres": (
        lambda f: pg_exec(f, "DELETE FROM device_allocations WHERE id = $1",
                          uuid.UUID(f.bob.allocation_id)),
        ("allocation", "BOB", "present")),
    "expiry schedule time in redis": (
        lambda f: f.redis.zadd(f.keys.expiry, {f.bob.allocation_id: 5}),
        ("allocation", "BOB", "schedule")),
    "reservation status in redis": (
        lambda f: f.redis.hset(f.keys.reservation(f.reservation), "status", "active"),
        ("reservation", "RSV", "status")),
    "reservation interval in postgres": (
        lambda f: pg_exec(f, "UPDATE reservations SET end_at = end_at + interval '1 hour'"),
        ("reservation", "RSV", "end_ms")),
    "reservation missing from postgres": (
        lambda f: pg_exec(f, "DELETE FROM reservations"),
        ("reservation", "RSV", "present")),
    "booked reservation missing from redis": (
        lambda f: f.redis.delete(f.keys.reservation(f.reservation)),
        ("reservation", "RSV", "present")),
    "reservation missing from its device's bookings": (
        lambda f: f.redis.zrem(f.keys.bookings("d4"), f.reservation),
        ("reservation", "RSV", "booking")),
    "tenant plan in postgres": (
        lambda f: pg_exec(f, "UPDATE tenants SET plan = 'basic' WHERE tenant_id = 'acme'"),
        ("tenant", "acme", "plan")),
    "tenant missing from redis": (
        lambda f: f.redis.hdel(f.keys.sched_tenants, "acme"),
        ("tenant", "acme", "present")),
    "tenant missing from postgres": (
        lambda f: pg_exec(f, "DELETE FROM tenants WHERE tenant_id = 'acme'"),
        ("tenant", "acme", "present")),
    "tenant override in redis": (
        lambda f: f.redis.hset(f.keys.sched("tenant:bolt"), "override_ms", 60_000),
        ("tenant", "bolt", "override_ms")),
    "schedule pause in postgres": (
        lambda f: pg_exec(f, "UPDATE schedule_state SET paused = false"),
        ("schedule", "usage_report:24h", "paused")),
    "closed allocation in the expiry schedule": (
        lambda f: f.redis.zadd(f.keys.expiry, {f.closed.allocation_id: 5}),
        ("allocation", "CLOSED", "schedule")),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_the_audit_finds_each_kind_of_difference(farm: Farm, case: str) -> None:
    mutate, (kind, ident, field) = CASES[case]
    ident = {"ALICE": farm.alice.allocation_id, "BOB": farm.bob.allocation_id,
             "CLOSED": farm.closed.allocation_id, "RSV": farm.reservation}.get(ident, ident)
    await mutate(farm)
    report = await audit(farm.redis, farm.keys, farm.pg, farm.clock.now_ms())
    assert not report["consistent"]
    assert (kind, ident, field) in found(report), report["differences"]
    assert report["difference_count"] == len(report["differences"])
    assert report["differences_by_kind"][kind] >= 1
    if kind == "allocation":
        assert ident in report["mismatched"] and report["mismatched_count"] >= 1


async def test_changes_not_yet_persisted_are_in_flight_not_differences(
    farm: Farm, clock: ManualClock,
) -> None:
    """Only the request path runs: an allocation, a release and a new quota are in Redis
    and on the changes stream, not in PostgreSQL. Once persist catches up they are there."""
    settings, keys, redis = farm.settings, farm.keys, farm.redis
    stop = asyncio.Event()
    task = asyncio.create_task(serve(["quota", "select"], settings, clock, stop=stop,
                                     install_signals=False))
    try:
        async with Client(settings, timeout_s=5) as client:
            more = await client.allocate("bob", min_cpu_cores=16)
            done = await client.release(allocation_id=farm.alice.allocation_id)
        assert isinstance(more, Allocated) and isinstance(done, Released)
        await set_quotas(redis, keys, clock, [QuotaSpec(user_id="carol")])
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    report = await audit(redis, keys, farm.pg)
    assert report["consistent"], report["differences"]
    assert report["backlog"] == 3 and report["in_flight"] >= 6  # 2 allocations, d2, d4, users
    assert report["redis_active"] == 2 and report["pg_active"] == 2  # one in, one out

    stop = asyncio.Event()
    task = asyncio.create_task(serve(["persist"], settings, clock, stop=stop,
                                     install_signals=False))
    try:
        await wait_until(lambda: persist_caught_up(redis, keys))
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    report = await audit(redis, keys, farm.pg)
    assert report["consistent"] and report["backlog"] == 0 and report["in_flight"] == 0
    assert report["pg_quotas"] == 3 and report["pg_active"] == 2


async def persist_caught_up(redis: Redis, keys: Keys) -> bool:
    from pipeline.worker import groups_caught_up
    from schemas.keys import GROUP_PERSIST

    return await groups_caught_up(redis, keys.changes, [GROUP_PERSIST])


def test_audit_command_prints_the_report_and_exits_1_on_a_difference(
    settings: Settings,
) -> None:
    """`devsched audit`: one JSON line; exit 0 when consistent, 1 when not (an empty prefix
    against a database with one device row is a difference)."""
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix)

    def run() -> tuple[int, dict[str, Any]]:
        done = subprocess.run([sys.executable, "-m", "stages.tools.cli", "audit"], env=env,
                              capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
        return done.returncode, json.loads(done.stdout.splitlines()[-1])

    async def tables(sql: str) -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(tables("TRUNCATE device_allocations, devices, user_quotas, billing_ledger,"
                       " reservations, tenants, schedule_state"))
    code, report = run()
    assert (code, report["consistent"]) == (0, True)
    asyncio.run(tables("INSERT INTO devices (id, name, host, adb_host, adb_port, cpu_cores, "
                       "memory_mb, storage_mb) VALUES ('ghost', 'g', 'h', 'a', 1, 1, 1, 1)"))
    try:
        code, report = run()
    finally:
        asyncio.run(tables("TRUNCATE devices"))
    assert (code, report["consistent"]) == (1, False)
    assert report["differences"] == [{"kind": "device", "id": "ghost", "field": "present",
                                      "redis": False, "pg": True}]
