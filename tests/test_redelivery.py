"""Nothing lost, nothing done twice, when entries are delivered again.

Streams deliver at least once: after a failover, a crash between a commit and its
ack, or a worker killed mid-batch, the same entry comes back. These tests deliver
entries again on purpose, against real Redis and PostgreSQL, and show that each
request is decided once (a repeat gets the first answer and changes no usage), each
PostgreSQL row only moves forward by version, each closed allocation is billed once,
and the entries of a worker killed with SIGKILL are reclaimed so that every request
gets exactly one reply.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import blocking_reader, redis_client
from pipeline.worker import Entry, StageWorker, ensure_group, groups_caught_up
from schemas.keys import (
    GROUP_BILL,
    GROUP_NOTIFY,
    GROUP_PERSIST,
    GROUP_QUOTA,
    GROUP_SELECT,
    Keys,
)
from schemas.messages import (
    Allocated,
    AllocateRequest,
    AllocationChange,
    DeviceSpec,
    DeviceUpserted,
    Notification,
    QuotaSpec,
    Released,
    ReleaseRequest,
    change_decoder,
    encoder,
    reply_decoder,
)
from stages import notify
from stages.app import serve
from stages.bill import BillStage
from stages.context import StageContext
from stages.notify import NotifyStage
from stages.persist import PersistStage, write_changes
from stages.settings import Settings
from stages.tools.admin import user_state
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, ROOT, RunningPipeline, seed, wait_until


async def drained(redis: Redis, stream: str, *groups: str) -> bool:
    return await groups_caught_up(redis, stream, groups)


async def replies(redis: Redis, stream: str) -> list[object]:
    return [reply_decoder.decode(f[b"d"]) for _, f in await redis.xrange(stream)]


async def has_replies(redis: Redis, stream: str, n: int) -> bool:
    return await redis.xlen(stream) >= n


def request(keys: Keys, rid: str, user: str = "u1") -> bytes:
    return encoder.encode(AllocateRequest(request_id=rid, user_id=user, reply_to=keys.reply("p")))


async def usage(redis: Redis, keys: Keys, user: str) -> dict[str, int]:
    return (await user_state(redis, keys, user)).usage


async def holds(redis: Redis, keys: Keys, user: str) -> dict[str, str]:
    return (await user_state(redis, keys, user)).holds


# --- a. select: an admitted entry delivered twice ---------------------------------


async def test_admitted_entry_delivered_twice_allocates_once_and_repeats_the_answer(
    pipeline: RunningPipeline, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="u1")])
    await redis.xadd(keys.requests, {"d": request(keys, "r-1")})
    await wait_until(lambda: has_replies(redis, keys.reply("p"), 1))
    await wait_until(lambda: drained(redis, keys.admitted, GROUP_SELECT))
    used = await usage(redis, keys, "u1")
    [(_, admitted)] = await redis.xrange(keys.admitted)

    # a failover lost the ack: the same entry (payload and hold) is delivered again
    await redis.xadd(keys.admitted, {"d": admitted[b"d"], "c": admitted[b"c"]})
    await wait_until(lambda: has_replies(redis, keys.reply("p"), 2))
    await wait_until(lambda: drained(redis, keys.admitted, GROUP_SELECT))

    first, second = await replies(redis, keys.reply("p"))
    assert isinstance(first, Allocated) and second == first
    assert await usage(redis, keys, "u1") == used
    assert await redis.zcard(keys.expiry) == 1
    assert await redis.hget(keys.stats, "allocated") == b"1"
    assert await holds(redis, keys, "u1") == {}
    changes = [change_decoder.decode(c[b"d"]) for _, c in await redis.xrange(keys.changes)]
    assert [c.request_id for c in changes if isinstance(c, AllocationChange)] == ["r-1"]


async def test_admitted_entry_delivered_again_after_release_does_not_allocate_again(
    pipeline: RunningPipeline, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="u1")])
    await redis.xadd(keys.requests, {"d": request(keys, "r-1")})
    await wait_until(lambda: has_replies(redis, keys.reply("p"), 1))
    [(_, admitted)] = await redis.xrange(keys.admitted)
    [got] = await replies(redis, keys.reply("p"))
    assert isinstance(got, Allocated)
    release = ReleaseRequest(request_id="r-2", reply_to=keys.reply("p"),
                             allocation_id=got.allocation_id)
    await redis.xadd(keys.requests, {"d": encoder.encode(release)})
    await wait_until(lambda: has_replies(redis, keys.reply("p"), 2))

    await redis.xadd(keys.admitted, {"d": admitted[b"d"], "c": admitted[b"c"]})
    await wait_until(lambda: has_replies(redis, keys.reply("p"), 3))
    await wait_until(lambda: drained(redis, keys.admitted, GROUP_SELECT))

    allocated, released, repeated = await replies(redis, keys.reply("p"))
    assert isinstance(released, Released) and not released.already_released
    assert repeated == allocated
    assert await redis.zcard(keys.expiry) == 0
    assert await redis.zrange(keys.free("default"), 0, -1) == [b"d1"]
    assert await usage(redis, keys, "u1") == {"devices": 0, "cpu": 0, "mem": 0, "sto": 0}


async def test_request_entry_delivered_twice_to_quota_allocates_once(
    pipeline: RunningPipeline, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="u1")])
    payload = request(keys, "r-1")
    await redis.xadd(keys.requests, {"d": payload})
    await redis.xadd(keys.requests, {"d": payload})
    await wait_until(lambda: has_replies(redis, keys.reply("p"), 2))
    await wait_until(lambda: drained(redis, keys.admitted, GROUP_SELECT))

    first, second = await replies(redis, keys.reply("p"))
    assert isinstance(first, Allocated) and second == first
    assert await redis.zcard(keys.expiry) == 1
    assert (await usage(redis, keys, "u1"))["devices"] == 1
    assert await holds(redis, keys, "u1") == {}


# --- b. persist and bill: crash after the commit, before the ack -------------------


class AckLost(Exception):
    """The process died between its PostgreSQL commit and its XACK."""


def crashing_before_ack(settings: Settings) -> Redis:
    client = redis_client(settings)

    async def xack(*_args: object, **_kwargs: object) -> int:
        raise AckLost()

    client.xack = xack  # type: ignore[method-assign]
    return client


async def read_as(redis: Redis, stream: str, group: str, consumer: str, count: int) -> list[Entry]:
    await ensure_group(redis, stream, group)
    got = await redis.xreadgroup(group, consumer, {stream: ">"}, count=count)
    return [Entry(stream, i.decode(), f) for _, items in got for i, f in items]


async def make_history(settings: Settings, clock: ManualClock, redis: Redis, keys: Keys) -> list[str]:
    """Three allocations, the first two released after 30 s: changes for persist and bill,
    written by quota and select alone (no persist or bill running yet)."""
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}") for i in range(3)],
               quotas=[QuotaSpec(user_id="u1")])
    stop = asyncio.Event()
    task = asyncio.create_task(serve(["quota", "select"], settings, clock, stop=stop,
                                     install_signals=False))
    try:
        async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
            got = [await client.allocate("u1") for _ in range(3)]
            assert all(isinstance(g, Allocated) for g in got), got
            clock.advance(30_000)
            for g in got[:2]:
                assert isinstance(g, Allocated)
                rel = await client.release(allocation_id=g.allocation_id)
                assert isinstance(rel, Released), rel
    finally:
        stop.set()
        await asyncio.wait_for(task, EVENT_TIMEOUT_S)
    return [g.allocation_id for g in got if isinstance(g, Allocated)]


async def test_persist_and_bill_redone_after_a_crash_between_commit_and_ack(
    settings: Settings, clock: ManualClock, redis: Redis, keys: Keys, pg: asyncpg.Pool,
) -> None:
    ids = await make_history(settings, clock, redis, keys)
    total = await redis.xlen(keys.changes)
    assert total == 3 + 1 + 3 + 2  # devices, quota, allocated, released
    crashing = crashing_before_ack(settings)
    dead_ctx = StageContext(redis=crashing, settings=settings, clock=clock, pg=pg)
    try:
        # persist dies after committing everything up to the allocations (versions 1)
        with pytest.raises(AckLost):
            await PersistStage(dead_ctx).handle(
                await read_as(redis, keys.changes, GROUP_PERSIST, "crashed", total - 2))
        # bill dies after committing the whole history
        with pytest.raises(AckLost):
            await BillStage(dead_ctx).handle(
                await read_as(redis, keys.changes, GROUP_BILL, "crashed", total))
    finally:
        await crashing.aclose()
    assert (await redis.xpending(keys.changes, GROUP_PERSIST))["pending"] == total - 2
    assert (await redis.xpending(keys.changes, GROUP_BILL))["pending"] == total

    ctx = StageContext(redis=redis, settings=settings, clock=clock, pg=pg)
    readers = [blocking_reader(settings) for _ in range(2)]
    workers = [StageWorker(stage, redis, reader, settings, clock, consumer="live",
                           dead_stream=keys.dead)
               for stage, reader in zip([PersistStage(ctx), BillStage(ctx)], readers)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        await wait_until(lambda: drained(redis, keys.changes, GROUP_PERSIST, GROUP_BILL))
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
        for reader in readers:
            await reader.aclose()

    async with pg.acquire() as conn:
        rows = {str(r["id"]): (r["status"], r["version"], r["duration_seconds"])
                for r in await conn.fetch("SELECT * FROM device_allocations")}
        ledger = await conn.fetch("SELECT allocation_id::text AS id, duration_seconds, end_reason"
                                  " FROM billing_ledger ORDER BY allocation_id")
        devices = await conn.fetchval("SELECT count(*) FROM devices")
    assert rows == {ids[0]: ("released", 2, 30), ids[1]: ("released", 2, 30),
                    ids[2]: ("allocated", 1, None)}
    assert sorted((r["id"], r["duration_seconds"], r["end_reason"]) for r in ledger) == sorted(
        [(ids[0], 30, "released"), (ids[1], 30, "released")])
    assert devices == 3
    assert await redis.xlen(keys.dead) == 0


@pytest.mark.parametrize("chunk", [notify.HANDOFF_CHUNK, 2])
async def test_notify_adds_each_notification_once_when_two_consumers_handle_an_entry(
    settings: Settings, clock: ManualClock, redis: Redis, keys: Keys, chunk: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow consumer and the one that took its entries over both handle the same batch:
    only the call whose XACK took an entry off the pending list adds its notification,
    whichever order they finish in; a third, late handling adds nothing either. The
    same when a batch is handed on in several calls (chunk 2)."""
    monkeypatch.setattr(notify, "HANDOFF_CHUNK", chunk)
    await make_history(settings, clock, redis, keys)
    total = await redis.xlen(keys.changes)
    stage = NotifyStage(StageContext(redis=redis, settings=settings, clock=clock))
    slow = await read_as(redis, keys.changes, GROUP_NOTIFY, "slow", total)
    # the other consumer takes the first half over (as XAUTOCLAIM would) and finishes first
    half = [e.id for e in slow[: total // 2]]
    await redis.xclaim(keys.changes, GROUP_NOTIFY, "taker", 0, half)
    await stage.handle(slow[: total // 2])
    await stage.handle(slow)  # the slow one finishes: only its own half is new
    await stage.handle(slow)  # a redelivery after the ack changes nothing
    events = [decoder_notification(f[b"d"]) for _, f in await redis.xrange(keys.notifications)]
    # 3 allocated + 2 released; device and quota changes notify nobody
    assert sorted(events) == sorted(["device.allocated"] * 3 + ["device.released"] * 2)
    assert (await redis.xpending(keys.changes, GROUP_NOTIFY))["pending"] == 0


def decoder_notification(raw: bytes) -> str:
    return msgspec.json.decode(raw, type=Notification).event


# --- c. a late, older change ------------------------------------------------------


def change(aid: str, version: int, status: str, at_ms: int) -> AllocationChange:
    return AllocationChange(
        allocation_id=aid, device_id="d1", user_id="u1", request_id="r-1",
        status=status,  # type: ignore[arg-type]
        allocated_at_ms=1_700_000_000_000, expires_at_ms=1_700_003_600_000,
        released_at_ms=None if status == "allocated" else at_ms, duration_minutes=60,
        duration_seconds=None if status == "allocated" else 90, cpu_cores=2, memory_mb=4096,
        storage_mb=32768, pool="default", version=version, at_ms=at_ms,
    )


def device(version: int, name: str) -> DeviceUpserted:
    return DeviceUpserted(device_id="d1", name=name, pool="default", model="generic",
                          host="node-1", adb_host="127.0.0.1", adb_port=5555, cpu_cores=2,
                          memory_mb=4096, storage_mb=32768, status="available",
                          version=version, at_ms=1_700_000_000_000)


async def deliver(redis: Redis, keys: Keys, stage: PersistStage, changes: Sequence[object]) -> None:
    for c in changes:
        await redis.xadd(keys.changes, {"d": encoder.encode(c)})
    await stage.handle(await read_as(redis, keys.changes, GROUP_PERSIST, "w", len(changes)))


async def test_late_older_change_never_overwrites_a_newer_row(
    settings: Settings, clock: ManualClock, redis: Redis, keys: Keys, pg: asyncpg.Pool,
) -> None:
    aid_apart, aid_together = "11111111-1111-1111-1111-111111111111", \
        "22222222-2222-2222-2222-222222222222"
    stage = PersistStage(StageContext(redis=redis, settings=settings, clock=clock, pg=pg))
    # in separate batches: version 2 first, then version 1 arrives late
    await deliver(redis, keys, stage, [change(aid_apart, 2, "released", 1_700_000_090_000),
                                       device(2, "renamed")])
    await deliver(redis, keys, stage, [change(aid_apart, 1, "allocated", 1_700_000_000_000),
                                       device(1, "original")])
    # in one batch, the older one after the newer
    await deliver(redis, keys, stage, [change(aid_together, 2, "released", 1_700_000_090_000),
                                       change(aid_together, 1, "allocated", 1_700_000_000_000)])
    # the same version again (a replay) changes nothing either
    await deliver(redis, keys, stage, [change(aid_apart, 2, "released", 1_700_000_090_000)])

    async with pg.acquire() as conn:
        rows = {str(r["id"]): (r["status"], r["version"], r["duration_seconds"],
                               r["released_at"] is not None)
                for r in await conn.fetch("SELECT * FROM device_allocations")}
        dev = await conn.fetchrow("SELECT name, version FROM devices WHERE id = 'd1'")
    assert rows == {aid_apart: ("released", 2, 90, True), aid_together: ("released", 2, 90, True)}
    assert tuple(dev) == ("renamed", 2)
    assert (await redis.xpending(keys.changes, GROUP_PERSIST))["pending"] == 0



async def test_persist_locks_rows_in_key_order_so_two_writers_cannot_deadlock(
    pg: asyncpg.Pool,
) -> None:
    """Two persist workers whose batches share rows must lock them in the same order.
    Shown without timing: a writer whose batch lists b before a is made to wait on b;
    a third session then finds a already locked, so the writer took a first (key
    order), whatever the order of its batch."""
    a, b = "aaaaaaaa-0000-0000-0000-000000000000", "bbbbbbbb-0000-0000-0000-000000000000"
    t0 = 1_700_000_000_000
    async with pg.acquire() as conn, conn.transaction():
        await write_changes(conn, [change(a, 1, "allocated", t0), change(b, 1, "allocated", t0)])
    select_for_update = "SELECT 1 FROM device_allocations WHERE id = $1::uuid FOR UPDATE"
    async with pg.acquire() as holder, pg.acquire() as writer, pg.acquire() as probe:
        hold = holder.transaction()
        await hold.start()
        await holder.execute(select_for_update, b)
        writer_pid = writer.get_server_pid()

        async def write() -> None:
            async with writer.transaction():
                await write_changes(writer, [change(b, 2, "released", t0 + 90_000),
                                             change(a, 2, "released", t0 + 90_000)])

        task = asyncio.create_task(write())

        async def writer_waits() -> bool:
            return await probe.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                writer_pid) is True

        try:
            await wait_until(writer_waits)
            with pytest.raises(asyncpg.LockNotAvailableError):
                async with probe.transaction():
                    await probe.execute(select_for_update + " NOWAIT", a)
        finally:
            await hold.rollback()  # the writer goes on, and finishes
            await asyncio.wait_for(task, EVENT_TIMEOUT_S)
        versions = {str(r["id"]): r["version"]
                    for r in await probe.fetch("SELECT id, version FROM device_allocations")}
    assert versions == {a: 2, b: 2}

# --- d. a worker process killed with SIGKILL mid-run --------------------------------


WORKER_BLOCK_MS = 10_000
"""The victim's XREADGROUP BLOCK: long, so once seen parked in it, it stays there while
the test freezes it and adds the lot (its socket timeout is longer still)."""


def start_quota_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix, DEVSCHED_BLOCK_MS=str(WORKER_BLOCK_MS))
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "stages.tools.cli", "worker", "quota"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


async def consumers(redis: Redis, keys: Keys) -> dict[str, int]:
    """Consumers of the quota group and how many entries each holds."""
    try:
        found = await redis.xinfo_consumers(keys.requests, GROUP_QUOTA)
    except Exception:  # noqa: BLE001 - no stream or group yet
        return {}
    return {c["name"].decode(): int(c["pending"]) for c in found}


async def client_ids(redis: Redis) -> set[str]:
    return {c["id"] for c in await redis.client_list()}


async def parked_in_read(redis: Redis, others: set[str]) -> bool:
    """A connection not in ``others`` is blocked in XREADGROUP (Redis' own view: the
    worker's reader is waiting for entries, between two turns of its loop)."""
    return any(c["id"] not in others and c.get("cmd") == "xreadgroup" and "b" in c["flags"]
               for c in await redis.client_list())


async def add_requests(redis: Redis, keys: Keys, users: Sequence[str]) -> None:
    """All in one MULTI/EXEC, so a consumer blocked in XREADGROUP gets them in one batch."""
    async with redis.pipeline(transaction=True) as pipe:
        for u in users:
            pipe.xadd(keys.requests, {"d": request(keys, f"r-{u}", user=u)})
        await pipe.execute()


async def test_entries_of_a_worker_killed_mid_run_are_reclaimed_and_answered_once(
    settings: Settings, clock: ManualClock, redis: Redis, keys: Keys, pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    attempts = 5
    lots = [[f"k{a}-{i}" for i in range(10)] for a in range(attempts)]
    users = [f"first{i}" for i in range(5)] + [u for lot in lots for u in lot] + ["late0", "late1"]
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}") for i in range(len(users))],
               quotas=[QuotaSpec(user_id=u) for u in users])
    sent: list[str] = []

    async def send(names: list[str]) -> None:
        await add_requests(redis, keys, names)
        sent.extend(names)

    log = tmp_path / "worker.log"
    others = await client_ids(redis)  # every connection but the worker's
    proc = start_quota_worker(settings, log)
    try:
        await wait_until(lambda: _has_consumer(redis, keys), timeout=2 * EVENT_TIMEOUT_S)
        [victim] = await consumers(redis, keys)
        await send(users[:5])  # it runs: it admits a first lot
        await wait_until(lambda: drained(redis, keys.requests, GROUP_QUOTA))
        for lot in lots:
            # frozen inside its blocking read, it is handed a batch it will never finish
            await wait_until(lambda: parked_in_read(redis, others))
            os.kill(proc.pid, signal.SIGSTOP)
            if await parked_in_read(redis, others):  # still there, now frozen
                await send(lot)
                if (await consumers(redis, keys))[victim] == len(lot):
                    break
            # its read ended just before the freeze: let it go on and catch it again
            os.kill(proc.pid, signal.SIGCONT)
            await wait_until(lambda: drained(redis, keys.requests, GROUP_QUOTA))
        else:
            pytest.fail("the worker was never caught inside its blocking read")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(EVENT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EVENT_TIMEOUT_S)
    assert (await consumers(redis, keys))[victim] == 10, log.read_text()

    stop = asyncio.Event()
    running = RunningPipeline(asyncio.create_task(serve(
        ["quota", "select", "persist", "bill", "notify"], settings, clock, stop=stop,
        install_signals=False)), stop)
    try:
        await send(["late0", "late1"])  # and new requests keep coming
        await wait_until(lambda: has_replies(redis, keys.reply("p"), len(sent)))
        await wait_until(lambda: drained(redis, keys.requests, GROUP_QUOTA))
        await wait_until(lambda: drained(redis, keys.admitted, GROUP_SELECT))
    finally:
        await running.close()

    got = await replies(redis, keys.reply("p"))
    assert all(isinstance(r, Allocated) for r in got), got
    assert Counter(r.request_id for r in got if isinstance(r, Allocated)) == Counter(
        f"r-{u}" for u in sent)
    assert (await consumers(redis, keys))[victim] == 0
    assert await redis.zcard(keys.expiry) == len(sent)


async def _has_consumer(redis: Redis, keys: Keys) -> bool:
    return bool(await consumers(redis, keys))
