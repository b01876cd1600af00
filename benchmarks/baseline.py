"""The PostgreSQL transactional allocator: the design a team would build instead of ours.

What it measures: allocate+release cycles per second and their latency when
allocation state lives in PostgreSQL and every decision is a transaction.

It is built fairly, the way a competent team would write it:

- Its own schema ``bench_baseline`` (devices, user_quotas, user_usage,
  allocations), a partial index on the free devices in strategy order
  (``cpu, mem_mb``), statements prepared once per connection (asyncpg does that
  for ``fetch``/``execute`` automatically), a pool whose size is tuned by the
  runner (4, 8, 16 connections per producer process), default durability
  (``synchronous_commit`` as the server has it; the pipeline's Redis has no
  fsync on its path, which is part of what is being compared).
- Allocate is ONE transaction, three round trips inside it:
  1. the user's quota and usage, ``FOR UPDATE`` of the usage row (serialises
     one user's allocations, nobody else's), checked in the application:
     status, per-device caps, device count and totals;
  2. the device: ``status = 'available' AND cpu >= $1 AND mem_mb >= $2
     ORDER BY cpu, mem_mb LIMIT 1 FOR UPDATE SKIP LOCKED`` (best fit, and
     concurrent allocations skip each other's rows instead of queueing);
  3. one statement writing the allocation row, the device status and the
     usage counters (data-modifying CTEs), then COMMIT.
- Release is a second transaction: one statement that closes the allocation
  (``released_at``, ``duration_ms``), frees the device and decrements the usage.
- ``reset`` puts every device back, zeroes usage, truncates the allocations and
  vacuums, so each measured point starts from the same state.

Promises: no device is ever held by two active allocations (the device row is
locked and re-checked by status), a user's usage never exceeds the quota
(checked under the usage row lock), and a failed allocate leaves nothing
behind (rolled back). A cycle reports ``quota:<reason>`` or ``no_device`` as
its error reason when it is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from benchmarks.loadgen import CycleParts, mark, producer_seed
from pipeline.connections import keep_session

SCHEMA = "bench_baseline"
"""Every table of the baseline lives here; dropping it removes the baseline."""
DEFAULT_DEVICES = 2000
DEFAULT_USERS = 500
CPU_CHOICES = (1, 2, 4, 8)
"""Device CPU sizes; requests ask for one of the three smaller ones."""
MEM_CHOICES_MB = (1024, 2048, 4096, 8192)
"""Device memory sizes; requests ask for one of the three smaller ones."""

SCHEMA_SQL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
DROP TABLE IF EXISTS {SCHEMA}.allocations, {SCHEMA}.user_usage, {SCHEMA}.user_quotas,
    {SCHEMA}.devices;
CREATE TABLE {SCHEMA}.devices (
    id          integer PRIMARY KEY,
    pool        text NOT NULL DEFAULT 'default',
    cpu         integer NOT NULL,
    mem_mb      integer NOT NULL,
    storage_mb  integer NOT NULL,
    status      text NOT NULL DEFAULT 'available'
                CHECK (status IN ('available', 'allocated', 'offline')),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_free_fit ON {SCHEMA}.devices (cpu, mem_mb) WHERE status = 'available';
CREATE TABLE {SCHEMA}.user_quotas (
    user_id             integer PRIMARY KEY,
    status              text NOT NULL DEFAULT 'active',
    max_devices         integer NOT NULL,
    max_cpu_per_device  integer NOT NULL,
    max_mem_per_device  integer NOT NULL,
    max_total_cpu       integer NOT NULL,
    max_total_mem_mb    integer NOT NULL
);
CREATE TABLE {SCHEMA}.user_usage (
    user_id  integer PRIMARY KEY REFERENCES {SCHEMA}.user_quotas,
    devices  integer NOT NULL DEFAULT 0,
    cpu      integer NOT NULL DEFAULT 0,
    mem_mb   integer NOT NULL DEFAULT 0
);
CREATE TABLE {SCHEMA}.allocations (
    id            bigserial PRIMARY KEY,
    user_id       integer NOT NULL,
    device_id     integer NOT NULL,
    cpu           integer NOT NULL,
    mem_mb        integer NOT NULL,
    status        text NOT NULL DEFAULT 'active',
    allocated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    released_at   timestamptz,
    duration_ms   double precision
);
"""

QUOTA_SQL = f"""
SELECT q.status, q.max_devices, q.max_cpu_per_device, q.max_mem_per_device,
       q.max_total_cpu, q.max_total_mem_mb, u.devices, u.cpu, u.mem_mb
FROM {SCHEMA}.user_quotas q JOIN {SCHEMA}.user_usage u USING (user_id)
WHERE q.user_id = $1
FOR UPDATE OF u
"""

DEVICE_SQL = f"""
SELECT id FROM {SCHEMA}.devices
WHERE status = 'available' AND cpu >= $1 AND mem_mb >= $2
ORDER BY cpu, mem_mb
LIMIT 1
FOR UPDATE SKIP LOCKED
"""

TAKE_SQL = f"""
WITH alloc AS (
    INSERT INTO {SCHEMA}.allocations (user_id, device_id, cpu, mem_mb)
    VALUES ($1, $2, $3, $4) RETURNING id
), dev AS (
    UPDATE {SCHEMA}.devices SET status = 'allocated', updated_at = now() WHERE id = $2
), usage AS (
    UPDATE {SCHEMA}.user_usage
    SET devices = devices + 1, cpu = cpu + $3, mem_mb = mem_mb + $4
    WHERE user_id = $1
)
SELECT id FROM alloc
"""

RELEASE_SQL = f"""
WITH alloc AS (
    UPDATE {SCHEMA}.allocations
    SET status = 'released', released_at = clock_timestamp(),
        duration_ms = extract(epoch FROM clock_timestamp() - allocated_at) * 1000
    WHERE id = $1 AND status = 'active'
    RETURNING user_id, device_id, cpu, mem_mb, duration_ms
), dev AS (
    UPDATE {SCHEMA}.devices d SET status = 'available', updated_at = now()
    FROM alloc WHERE d.id = alloc.device_id
), usage AS (
    UPDATE {SCHEMA}.user_usage u
    SET devices = u.devices - 1, cpu = u.cpu - alloc.cpu, mem_mb = u.mem_mb - alloc.mem_mb
    FROM alloc WHERE u.user_id = alloc.user_id
)
SELECT duration_ms FROM alloc
"""


@contextlib.asynccontextmanager
async def _connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection for an administrative step, closed after it."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def create(database_url: str, devices: int = DEFAULT_DEVICES,
                 users: int = DEFAULT_USERS, seed: int = 7) -> None:
    """(Re)create the schema with ``devices`` devices and ``users`` users of generous quota."""
    rng = random.Random(seed)
    async with _connection(database_url) as conn:
        await conn.execute(SCHEMA_SQL)
        await conn.copy_records_to_table(
            "devices", schema_name=SCHEMA, columns=["id", "cpu", "mem_mb", "storage_mb"],
            records=[(i, rng.choice(CPU_CHOICES), rng.choice(MEM_CHOICES_MB),
                      rng.choice((32_768, 65_536))) for i in range(1, devices + 1)])
        await conn.copy_records_to_table(
            "user_quotas", schema_name=SCHEMA,
            columns=["user_id", "max_devices", "max_cpu_per_device", "max_mem_per_device",
                     "max_total_cpu", "max_total_mem_mb"],
            records=[(u, 50, 8, 8192, 400, 409_600) for u in range(1, users + 1)])
        await conn.copy_records_to_table(
            "user_usage", schema_name=SCHEMA, columns=["user_id"],
            records=[(u,) for u in range(1, users + 1)])
        await conn.execute(f"ANALYZE {SCHEMA}.devices, {SCHEMA}.user_quotas, "
                           f"{SCHEMA}.user_usage")


async def reset(database_url: str) -> None:
    """Free every device, zero all usage, drop the allocations, vacuum: a clean start."""
    async with _connection(database_url) as conn:
        await conn.execute(f"""
            TRUNCATE {SCHEMA}.allocations;
            UPDATE {SCHEMA}.devices SET status = 'available' WHERE status <> 'available';
            UPDATE {SCHEMA}.user_usage SET devices = 0, cpu = 0, mem_mb = 0 WHERE devices <> 0;
        """)
        await conn.execute(f"VACUUM ANALYZE {SCHEMA}.devices, {SCHEMA}.user_usage, "
                           f"{SCHEMA}.allocations")


async def drop(database_url: str) -> None:
    async with _connection(database_url) as conn:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


async def server_version(database_url: str) -> str:
    async with _connection(database_url) as conn:
        return str(await conn.fetchval("SHOW server_version"))


def quota_refusal(row: asyncpg.Record, cpu: int, mem_mb: int) -> str | None:
    """Why the quota refuses a ``cpu``/``mem_mb`` device to this user, or None."""
    if row["status"] != "active":
        return "suspended"
    if cpu > row["max_cpu_per_device"] or mem_mb > row["max_mem_per_device"]:
        return "device_too_large"
    if row["devices"] + 1 > row["max_devices"]:
        return "max_devices"
    if row["cpu"] + cpu > row["max_total_cpu"] or row["mem_mb"] + mem_mb > row["max_total_mem_mb"]:
        return "total_exceeded"
    return None


async def allocate(conn: Any, user_id: int, cpu: int, mem_mb: int) -> tuple[int | None, str | None]:
    """One transaction: (allocation id, None) or (None, refusal reason)."""
    async with conn.transaction():
        row = await conn.fetchrow(QUOTA_SQL, user_id)
        if row is None:
            return None, "quota:unknown_user"
        refusal = quota_refusal(row, cpu, mem_mb)
        if refusal is not None:
            return None, f"quota:{refusal}"
        device_id = await conn.fetchval(DEVICE_SQL, cpu, mem_mb)
        if device_id is None:
            return None, "no_device"
        allocation_id: int = await conn.fetchval(TAKE_SQL, user_id, device_id, cpu, mem_mb)
        return allocation_id, None


async def release(conn: Any, allocation_id: int) -> float | None:
    """One transaction: close the allocation, free its device; its duration in ms or None."""
    duration: float | None = await conn.fetchval(RELEASE_SQL, allocation_id)
    return duration


def _quiet_cancelled_transactions() -> None:
    """Drop asyncpg's notice about a cycle cancelled inside its transaction.

    The load generator cancels cycles still running at the end of a point; the
    pool rolls such a connection back when it is released, and asyncpg reports
    that through the loop's exception handler. It is expected there, and only
    there, so only that message is dropped.
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith(
                "Resetting connection with an active transaction"):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def make_cycle(database_url: str, pool_size: int, users: int = DEFAULT_USERS,
               seed: int = 1, synchronous_commit: str | None = None) -> CycleParts:
    """Loadgen factory: allocate for a random user, then release at once; one cycle each.

    ``synchronous_commit`` (``on``/``off``), if given, is set on the pool's sessions;
    None keeps the server's setting.
    """
    rng = random.Random(seed * 1_000_003 + producer_seed())
    state: dict[str, asyncpg.Pool] = {}

    async def setup() -> None:
        _quiet_cancelled_transactions()
        settings = {} if synchronous_commit is None else {
            "synchronous_commit": synchronous_commit}
        # released as the pipeline's pool releases (pipeline.connections.pg_pool): no
        # reset query after each cycle, so neither side pays that round trip
        state["pool"] = await asyncpg.create_pool(
            database_url, min_size=pool_size, max_size=pool_size, server_settings=settings,
            reset=keep_session)

    async def cycle(i: int) -> str | None:
        user_id = rng.randint(1, users)
        cpu = rng.choice(CPU_CHOICES[:3])
        mem_mb = rng.choice(MEM_CHOICES_MB[:3])
        async with state["pool"].acquire() as conn:
            allocation_id, refusal = await allocate(conn, user_id, cpu, mem_mb)
            if allocation_id is None:
                return refusal
            mark("allocate")
            if await release(conn, allocation_id) is None:
                return "release_lost"
        return None

    async def teardown() -> None:
        pool = state.pop("pool", None)
        if pool is not None:
            await pool.close()

    return CycleParts(setup, cycle, teardown)
