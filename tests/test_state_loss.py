"""What a black-box fault run found, each now a case that must hold.

- A request id re-sent after Redis lost its state (and its stored answer is gone)
  gets a NEW allocation id: PostgreSQL keeps both allocations, the ledger bills both.
- Workers running while Redis is emptied (FLUSHALL) do not crash on NOGROUP: they make
  their groups again and serve once the state is rebuilt, in the same process.
- The embedded PostgreSQL comes back on the same port when restarted by the
  launcher (what `devsched up` runs), and the running write-behind reconnects by
  itself: every change lands without restarting the workers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

import sql
from pipeline.clock import ManualClock
from pipeline.embedded import ensure_servers, running_servers, stop_servers
from pipeline.migrate import migrate
from schemas.keys import GROUP_PERSIST, GROUP_QUOTA, GROUP_SELECT, GROUP_TIMERS, Keys
from schemas.messages import Allocated, DeviceSpec, QuotaSpec, Released
from stages.select import allocation_id
from stages.settings import Settings
from stages.tools.admin import delete_keys, write_behind_drained
from stages.tools.client import Client
from stages.tools.rebuild import rebuild
from tests.conftest import RunningPipeline, seed, wait_until
from tests.test_rebuild import start_pipeline

DEVICES = [DeviceSpec(id="d1", cpu_cores=2, memory_mb=4096)]
QUOTAS = [QuotaSpec(user_id="alice")]


async def rows_of_request(pg: asyncpg.Pool, request_id: str) -> list[tuple[str, str, int]]:
    async with pg.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id::text, status, duration_seconds FROM device_allocations "
            "WHERE metadata->>'request_id' = $1 ORDER BY allocated_at", request_id)
    return [(r["id"], r["status"], r["duration_seconds"]) for r in rows]


async def ledger(pg: asyncpg.Pool) -> dict[str, int]:
    async with pg.acquire() as conn:
        rows = await conn.fetch("SELECT allocation_id::text, duration_seconds FROM billing_ledger")
    return {r["allocation_id"]: r["duration_seconds"] for r in rows}


def test_allocation_ids_differ_by_epoch_and_by_time() -> None:
    one = allocation_id("e1", "alice", "r1", 1_000)
    assert one == allocation_id("e1", "alice", "r1", 1_000)  # the same call, the same id
    assert len({one, allocation_id("e2", "alice", "r1", 1_000),
                allocation_id("e1", "alice", "r1", 1_001)}) == 3


async def test_a_request_id_resent_after_a_state_loss_gets_a_new_allocation_that_is_kept_and_billed(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    async with Client(settings, timeout_s=10) as client:
        first = await client.allocate("alice", request_id="r1")
        assert isinstance(first, Allocated)
        clock.advance(10_000)
        assert isinstance(await client.release(allocation_id=first.allocation_id), Released)
    await wait_until(lambda: write_behind_drained(redis, keys))

    # Redis loses everything under the prefix (as FLUSHALL would), the first answer's
    # window has passed (a rebuild has no answer to restore), the state is rebuilt
    await delete_keys(redis, settings.prefix)
    clock.advance((settings.idempotency_ttl_s + 1) * 1000)
    await rebuild(redis, keys, pg, settings, clock)

    async with Client(settings, timeout_s=10) as client:
        again = await client.allocate("alice", request_id="r1")
        assert isinstance(again, Allocated)
        assert again.allocation_id != first.allocation_id
        clock.advance(20_000)
        done = await client.release(allocation_id=again.allocation_id)
        assert isinstance(done, Released) and done.duration_seconds == 20
    await wait_until(lambda: write_behind_drained(redis, keys))
    assert await rows_of_request(pg, "r1") == [
        (first.allocation_id, "released", 10), (again.allocation_id, "released", 20)]
    assert await ledger(pg) == {first.allocation_id: 10, again.allocation_id: 20}


async def groups_back(redis: Redis, keys: Keys) -> bool:
    for stream, group in ((keys.requests, GROUP_QUOTA), (keys.admitted, GROUP_SELECT),
                          (keys.changes, GROUP_PERSIST), (keys.ticks, GROUP_TIMERS)):
        try:
            if not await redis.xinfo_consumers(stream, group):
                return False
        except ResponseError:
            return False
    return True


async def test_running_workers_make_their_groups_again_after_redis_is_emptied(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, quotas=QUOTAS,
               devices=[*DEVICES, DeviceSpec(id="d2", cpu_cores=2, memory_mb=4096)])
    async with Client(settings, timeout_s=10) as client:
        before = await client.allocate("alice", request_id="before")
        assert isinstance(before, Allocated)
    await wait_until(lambda: write_behind_drained(redis, keys))

    await delete_keys(redis, settings.prefix)  # streams, groups and state gone at once
    await wait_until(lambda: groups_back(redis, keys))
    assert not pipeline.task.done()  # no worker died of NOGROUP
    await rebuild(redis, keys, pg, settings, clock)
    async with Client(settings, timeout_s=10) as client:
        got = await client.allocate("alice", request_id="after")
        assert isinstance(got, Allocated) and got.device.id != before.device.id
    await wait_until(lambda: write_behind_drained(redis, keys))
    assert [status for _, status, _ in await rows_of_request(pg, "after")] == ["allocated"]
    assert not pipeline.task.done()


async def test_embedded_postgres_keeps_its_port_and_the_write_behind_reconnects(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock, tmp_path: Path,
) -> None:
    """PostgreSQL of a data dir of its own (the session's Redis): stopped while the
    pipeline runs, started again by the launcher, it has the same URL, and the changes
    made while it was down reach it without restarting anything."""
    own = replace(settings, database_url="", data_dir=tmp_path / "data")
    urls, started = ensure_servers(own)
    assert started
    try:
        await migrate(urls.database_url, sql.migrations())
        running_settings = own.with_urls(settings.redis_url, urls.database_url)
        pg = await asyncpg.create_pool(urls.database_url, min_size=1, max_size=2)
        assert pg is not None
        await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
        running = await start_pipeline(running_settings, clock)
        try:
            async with Client(running_settings, timeout_s=10) as client:
                got = await client.allocate("alice", request_id="p1")
                assert isinstance(got, Allocated)
                await wait_until(lambda: write_behind_drained(redis, keys))
                await pg.close()

                stop_servers(own)
                assert running_servers(own) is None
                clock.advance(5_000)
                done = await client.release(allocation_id=got.allocation_id)
                assert isinstance(done, Released)  # the request path needs no PostgreSQL
                later = await client.allocate("alice", request_id="p2")
                assert isinstance(later, Allocated)

                again, restarted = ensure_servers(own)  # what `devsched up` runs
                assert restarted and again.database_url == urls.database_url
                await wait_until(lambda: write_behind_drained(redis, keys))
            pg = await asyncpg.create_pool(urls.database_url, min_size=1, max_size=2)
            assert pg is not None
            assert await rows_of_request(pg, "p1") == [(got.allocation_id, "released", 5)]
            assert [s for _, s, _ in await rows_of_request(pg, "p2")] == ["allocated"]
            assert await ledger(pg) == {got.allocation_id: 5}
            await pg.close()
        finally:
            await running.close()
    finally:
        stop_servers(own)


async def test_rebuild_bills_a_closed_allocation_the_ledger_lacks(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    """persist had committed the release, bill had not when Redis lost the changes."""
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    async with Client(settings, timeout_s=10) as client:
        got = await client.allocate("alice", request_id="r1")
        assert isinstance(got, Allocated)
        clock.advance(7_000)
        assert isinstance(await client.release(allocation_id=got.allocation_id), Released)
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    async with pg.acquire() as conn:  # the bill change was lost with Redis
        await conn.execute("DELETE FROM billing_ledger")
    await delete_keys(redis, settings.prefix)
    report = await rebuild(redis, keys, pg, settings, clock)
    assert report.billed == 1
    assert await ledger(pg) == {got.allocation_id: 7}
    assert (await rebuild(redis, keys, pg, settings, clock, force=True)).billed == 0
