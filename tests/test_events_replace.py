"""Replacement instead of loss, end to end: an allocation whose request said
``replace_on_failure`` moves to an equivalent free device when its device goes down.

Every test runs all stages in process (the ``pipeline`` fixture) on real Redis and
PostgreSQL and sends device events as another system would. What each proves, read
from Redis, PostgreSQL (``device_allocations``, ``billing_ledger``) and the
notifications stream:

* each of the four device events that take a device down (failed, deleted,
  maintenance, status_changed to stopped/error) moves the allocation to a free device
  of the same pool, model and size: same allocation id, user, allocated-at and
  expires-at and the same usage; the new device is held, the old one is out of the
  pool; the PostgreSQL row names the new device at a higher version; nothing is billed
  until the allocation ends, and then exactly one ledger row with the whole duration;
  ``allocation.replaced`` carries the new device and ADB endpoint;
* a release by the allocation id or by the NEW device id ends it; by the old device id
  answers ``not_found``; a retried allocate (same request id) gets the new device;
* with no equivalent device free (another model, size, storage or pool only) it is
  released with the event's reason, as without the flag; a request without the flag
  is released as before even when an equivalent device is free;
* an event delivered twice (same event id, or the same entries handled again by the
  stage) moves it once;
* after a move the audit finds Redis and PostgreSQL consistent, and a rebuild from
  PostgreSQL restores the allocation on its new device with its flag (the next failure
  moves it again) and the stored answer naming the new device;
* ``devsched allocate --replace-on-failure`` asks for it (and only with the flag).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec
import orjson
import pytest
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import text
from pipeline.worker import Entry, groups_caught_up
from schemas.keys import GROUP_EVENTS, Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec, Released, reply_decoder
from stages.context import StageContext
from stages.events import EventsStage
from stages.settings import Settings
from stages.tools import cli
from stages.tools.admin import add_devices, delete_keys, user_state
from stages.tools.audit import audit
from stages.tools.client import Client
from stages.tools.rebuild import rebuild
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, tick_through_timers
from tests.test_events import allocation_row, event, notes_of, send
from tests.test_script_contract import Driver

DOWN_EVENTS = [
    ("device.failed", {}, "failed", "device_failed"),
    ("device.deleted", {}, "deleted", "device_deleted"),
    ("device.maintenance", {"info": "screen", "expected_end_ms": 1_700_007_200_000},
     "maintenance", "device_maintenance"),
    ("device.status_changed", {"status": "stopped"}, "stopped", "device_stopped"),
    ("device.status_changed", {"status": "error"}, "error", "device_error"),
]


def phone(n: int) -> DeviceSpec:
    """Device ``pixel-<n>``: pool eu, model pixel, 4 CPU, 8 GB, 64 GB; its own name and
    ADB endpoint (10.0.0.<n>:560<n>)."""
    return DeviceSpec(id=f"pixel-{n}", name=f"pixel #{n}", pool="eu", model="pixel",
                      adb_host=f"10.0.0.{n}", adb_port=5600 + n, cpu_cores=4, memory_mb=8192,
                      storage_mb=65536)


def pair() -> list[DeviceSpec]:
    """Two equal devices, pixel-1 and pixel-2."""
    return [phone(1), phone(2)]


async def record(redis: Redis, key: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in (await redis.hgetall(key)).items()}


async def ledger(pg: asyncpg.Pool, aid: str) -> list[asyncpg.Record]:
    async with pg.acquire() as conn:
        return list(await conn.fetch(
            "SELECT device_id, started_at, duration_seconds, end_reason FROM billing_ledger"
            " WHERE allocation_id = $1", aid))


async def pg_allocation(pg: asyncpg.Pool, aid: str) -> asyncpg.Record:
    async with pg.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT device_id, status, version, end_reason, metadata::text AS metadata,"
            " (extract(epoch FROM allocated_at) * 1000)::bigint AS allocated_at_ms,"
            " (extract(epoch FROM expires_at) * 1000)::bigint AS expires_at_ms"
            " FROM device_allocations WHERE id = $1", aid)
    assert row is not None
    return row


async def assert_moved(redis: Redis, keys: Keys, pg: asyncpg.Pool, got: Allocated, new: str,
                       down_status: str, reason: str, version: int) -> None:
    """The allocation is on ``new`` (Redis and PostgreSQL), the old device is down and out
    of its pool, nothing billed, and allocation.replaced says where it went."""
    old = got.device.id
    alloc = await record(redis, keys.allocation(got.allocation_id))
    assert (alloc["status"], alloc["device_id"], alloc["version"]) == (
        "allocated", new, str(version))
    assert (int(alloc["allocated_at_ms"]), int(alloc["expires_at_ms"])) == (
        got.allocated_at_ms, got.expires_at_ms)
    assert await redis.zscore(keys.expiry, got.allocation_id) == got.expires_at_ms
    new_dev, old_dev = await record(redis, keys.device(new)), await record(redis, keys.device(old))
    assert (new_dev["status"], new_dev["alloc"]) == ("allocated", got.allocation_id)
    assert (old_dev["status"], old_dev["alloc"], old_dev["last_alloc"]) == (
        down_status, "", got.allocation_id)
    assert await redis.zscore(keys.free("eu"), new) is None
    assert await redis.zscore(keys.free("eu"), old) is None
    state = await user_state(redis, keys, got.user_id)
    assert state.usage == {"devices": 1, "cpu": 4, "mem": 8192, "sto": 65536}
    assert state.allocations == {got.allocation_id: "4 8192 65536"}
    row = await pg_allocation(pg, got.allocation_id)
    assert (row["device_id"], row["status"], row["version"], row["end_reason"]) == (
        new, "allocated", version, None)
    assert (row["allocated_at_ms"], row["expires_at_ms"]) == (got.allocated_at_ms,
                                                             got.expires_at_ms)
    assert '"replace_on_failure": true' in row["metadata"]
    assert await ledger(pg, got.allocation_id) == []
    note = (await notes_of(redis, keys, "allocation.replaced"))[-1]
    assert (note.allocation_id, note.user_id, note.previous_device_id, note.device_id) == (
        got.allocation_id, got.user_id, old, new)
    n = int(new.rsplit("-", 1)[1])
    assert (note.device_name, note.adb_host, note.adb_port, note.reason) == (
        new_dev["name"], f"10.0.0.{n}", 5600 + n, reason)
    assert f"10.0.0.{n}:{5600 + n}" in note.message and "email" in note.channels
    assert [x.allocation_id for x in await notes_of(redis, keys, "device.released")] == []


@pytest.mark.parametrize(("kind", "fields", "down_status", "reason"), DOWN_EVENTS,
                         ids=[f"{k}:{s}" for k, _f, s, _r in DOWN_EVENTS])
async def test_device_down_moves_the_allocation_to_an_equivalent_free_device(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
    kind: str, fields: dict[str, Any], down_status: str, reason: str,
) -> None:
    # a bigger device of the pool, free too, is not equivalent
    await seed(redis, keys, clock, devices=[*pair(), DeviceSpec(id="pixel-big", pool="eu",
                                                                model="pixel", cpu_cores=8,
                                                                memory_mb=16384)],
               quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("alice", pool="eu", min_cpu_cores=4, request_id="r-1",
                                    replace_on_failure=True)
        assert isinstance(got, Allocated), got
        new = ({"pixel-1", "pixel-2"} - {got.device.id}).pop()
        await send(redis, keys)  # PostgreSQL has the row on the first device: the move updates it
        first = await pg_allocation(pg, got.allocation_id)
        assert (first["device_id"], first["version"]) == (got.device.id, 1)
        clock.advance(10_000)
        await send(redis, keys, event(kind, device_id=got.device.id, version=1, **fields))
        await assert_moved(redis, keys, pg, got, new, down_status, reason, version=2)
        assert await redis.hget(keys.device("pixel-big"), "status") == b"available"
        (device_note,) = await notes_of(redis, keys, kind)
        assert (device_note.allocation_id, device_note.replacement_device_id) == (
            got.allocation_id, new)
        assert f"moved to device {new}" in device_note.message

        # the request retried: the same allocation, on the device it is on now
        again = await client.allocate("alice", pool="eu", min_cpu_cores=4, request_id="r-1",
                                      replace_on_failure=True)
        assert isinstance(again, Allocated)
        assert (again.allocation_id, again.device.id, again.adb_port, again.expires_at_ms) == (
            got.allocation_id, new, 5600 + int(new[-1]), got.expires_at_ms)

        # released by the old device: not found; by the new one: the whole allocation
        wrong = await client.release(device_id=got.device.id, user_id="alice")
        assert isinstance(wrong, Failed) and wrong.reason == "not_found", wrong
        clock.advance(20_500)
        done = await client.release(device_id=new, user_id="alice")
        assert isinstance(done, Released), done
        assert (done.allocation_id, done.device_id, done.duration_seconds) == (
            got.allocation_id, new, 30)
    await send(redis, keys)
    (billed,) = await ledger(pg, got.allocation_id)
    assert (billed["device_id"], billed["duration_seconds"], billed["end_reason"]) == (
        new, 30, "released")
    assert int(billed["started_at"].timestamp() * 1000) == got.allocated_at_ms
    row = await pg_allocation(pg, got.allocation_id)
    assert (row["device_id"], row["status"], row["version"], row["end_reason"]) == (
        new, "released", 3, "released")
    assert '"replace_on_failure": true' in row["metadata"]  # kept: metadata is merged
    assert await redis.zscore(keys.free("eu"), new) is not None
    assert (await user_state(redis, keys, "alice")).usage["devices"] == 0


async def test_moved_allocation_released_by_its_id_and_moved_again_then_ended(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    """Moved twice then released by allocation id: one continuous allocation, billed once."""
    devices = [phone(1), phone(2), phone(3)]
    await seed(redis, keys, clock, devices=devices, quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("alice", pool="eu", replace_on_failure=True)
        assert isinstance(got, Allocated)
        clock.advance(5_000)
        await send(redis, keys, event("device.failed", device_id=got.device.id))
        second = text(await redis.hget(keys.allocation(got.allocation_id), "device_id"))
        clock.advance(5_000)
        await send(redis, keys, event("device.maintenance", device_id=second))
        third = text(await redis.hget(keys.allocation(got.allocation_id), "device_id"))
        assert len({got.device.id, second, third}) == 3
        await assert_moved(redis, keys, pg, replace_allocated(got, second), third,
                           "maintenance", "device_maintenance", version=3)
        clock.advance(7_000)
        done = await client.release(allocation_id=got.allocation_id, user_id="alice")
        assert isinstance(done, Released) and (done.device_id, done.duration_seconds) == (
            third, 17)
    await send(redis, keys)
    (billed,) = await ledger(pg, got.allocation_id)
    assert (billed["device_id"], billed["duration_seconds"]) == (third, 17)
    assert len(await notes_of(redis, keys, "allocation.replaced")) == 2


def replace_allocated(got: Allocated, device_id: str) -> Allocated:
    """``got`` as it reads once on ``device_id`` (what assert_moved starts from)."""
    return Allocated(request_id=got.request_id, allocation_id=got.allocation_id,
                     device=type(got.device)(id=device_id, name=device_id, status="allocated"),
                     user_id=got.user_id, allocated_at_ms=got.allocated_at_ms,
                     expires_at_ms=got.expires_at_ms, adb_host=got.adb_host,
                     adb_port=got.adb_port)


async def test_moved_allocation_expires_on_its_new_device_billed_from_its_start(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=pair(), quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("alice", pool="eu", duration_seconds=90,
                                    replace_on_failure=True)
        assert isinstance(got, Allocated)
    clock.advance(30_000)
    await send(redis, keys, event("device.failed", device_id=got.device.id))
    new = text(await redis.hget(keys.allocation(got.allocation_id), "device_id"))
    assert new != got.device.id
    clock.advance(61_000)
    await tick_through_timers(redis, settings, clock)
    await send(redis, keys)
    (billed,) = await ledger(pg, got.allocation_id)
    assert (billed["device_id"], billed["duration_seconds"], billed["end_reason"]) == (
        new, 90, "expired")
    assert (await record(redis, keys.device(new)))["status"] == "available"
    assert (await record(redis, keys.device(got.device.id)))["status"] == "failed"


async def test_no_equivalent_device_free_releases_with_the_reason(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    """Free devices that differ in one thing each: model, CPU, memory, storage, pool."""
    (target, _twin) = pair()
    await seed(redis, keys, clock, devices=[target], quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("alice", pool="eu", replace_on_failure=True)
        assert isinstance(got, Allocated) and got.device.id == target.id
    spec: dict[str, Any] = {"pool": "eu", "model": "pixel", "cpu_cores": 4, "memory_mb": 8192,
                            "storage_mb": 65536}
    decoys: dict[str, dict[str, Any]] = {"model": {"model": "galaxy"}, "cpu": {"cpu_cores": 2}, "mem": {"memory_mb": 8000},
              "sto": {"storage_mb": 32768}, "pool": {"pool": "us"}}
    await add_devices(redis, keys, clock, [DeviceSpec(id=f"decoy-{name}", **{**spec, **diff})
                                           for name, diff in decoys.items()])
    clock.advance(12_000)
    await send(redis, keys, event("device.failed", device_id=target.id))
    alloc = await record(redis, keys.allocation(got.allocation_id))
    assert (alloc["status"], alloc["end_reason"], alloc["device_id"]) == (
        "released", "device_failed", target.id)
    row = await allocation_row(pg, got.allocation_id)
    assert (row["end_reason"], row["billed_reason"], row["billed_seconds"]) == (
        "device_failed", "device_failed", 12)
    for name in decoys:
        assert await redis.hget(keys.device(f"decoy-{name}"), "status") == b"available"
    assert await notes_of(redis, keys, "allocation.replaced") == []
    (released,) = await notes_of(redis, keys, "device.released")
    assert released.reason == "device_failed"
    assert (await user_state(redis, keys, "alice")).usage["devices"] == 0


async def test_without_the_flag_the_allocation_is_released_as_before(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=pair(), quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("alice", pool="eu")
        assert isinstance(got, Allocated)
    assert "replace_on_failure" not in await record(redis, keys.allocation(got.allocation_id))
    clock.advance(4_000)
    await send(redis, keys, event("device.status_changed", device_id=got.device.id,
                                  status="stopped"))
    row = await allocation_row(pg, got.allocation_id)
    assert (row["status"], row["end_reason"], row["billed_seconds"]) == (
        "released", "device_stopped", 4)
    twin = ({"pixel-1", "pixel-2"} - {got.device.id}).pop()
    assert await redis.zscore(keys.free("eu"), twin) is not None
    assert await notes_of(redis, keys, "allocation.replaced") == []


async def test_an_event_delivered_twice_moves_the_allocation_once(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    devices = [phone(1), phone(2), phone(3)]
    await seed(redis, keys, clock, devices=devices, quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("alice", pool="eu", replace_on_failure=True)
        assert isinstance(got, Allocated)
    failed = event("device.failed", device_id=got.device.id, event_id="fail-once")
    await send(redis, keys, failed, failed)
    await send(redis, keys, failed)
    alloc = await record(redis, keys.allocation(got.allocation_id))
    assert alloc["version"] == "2"
    holders = [d.id for d in devices
               if await redis.hget(keys.device(d.id), "alloc") == got.allocation_id.encode()]
    assert holders == [alloc["device_id"]]
    assert await redis.zcard(keys.free("eu")) == 1
    assert len(await notes_of(redis, keys, "allocation.replaced")) == 1
    assert (await pg_allocation(pg, got.allocation_id))["version"] == 2


async def test_the_same_entries_handled_again_change_nothing(
    redis: Redis, keys: Keys, clock: ManualClock, ctx: StageContext,
) -> None:
    """As when the stage's ack was lost: the batch handled a second time is a duplicate."""
    driver = Driver(redis, ctx, clock)
    await driver.start()
    await seed(redis, keys, clock, devices=pair(), quotas=[QuotaSpec(user_id="alice")])
    await driver.both(driver.allocate("alice", "r-1", pool="eu", replace_on_failure=True))
    answer = reply_decoder.decode(await redis.get(keys.user("alice").replace(":user", ":req:r-1")))
    assert isinstance(answer, Allocated)
    allocation = keys.allocation(answer.allocation_id)
    old = text(await redis.hget(allocation, "device_id"))
    await redis.xadd(keys.events, {"d": orjson.dumps(event("device.failed", device_id=old))})
    reply = await redis.xreadgroup(GROUP_EVENTS, "again", {keys.events: ">"})
    entries = [Entry(keys.events, text(eid), dict(f)) for _s, items in reply for eid, f in items]
    stage = EventsStage(ctx)
    await stage.handle(entries)
    moved = await record(redis, allocation)
    changes = await redis.xlen(keys.changes)
    await stage.handle(entries)
    assert await record(redis, allocation) == moved
    assert moved["device_id"] != old and moved["version"] == "2"
    assert await redis.xlen(keys.changes) == changes
    assert await groups_caught_up(redis, keys.events, [GROUP_EVENTS])


async def test_a_moved_allocation_passes_the_audit_and_survives_a_rebuild(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool, ctx: StageContext,
) -> None:
    """PostgreSQL has the move (device, version, the flag in metadata): the audit finds
    nothing, and a Redis rebuilt from it moves the allocation again on the next failure."""
    await seed(redis, keys, clock, devices=[phone(1), phone(2), phone(3)],
               quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("alice", pool="eu", request_id="r-1",
                                    replace_on_failure=True)
        assert isinstance(got, Allocated)
    await send(redis, keys, event("device.failed", device_id=got.device.id))
    report = await audit(redis, keys, pg)
    assert report["consistent"], report
    moved = await record(redis, keys.allocation(got.allocation_id))
    assert moved["replace_on_failure"] == "1" and moved["device_id"] != got.device.id
    await pipeline.close()

    await delete_keys(redis, settings.prefix)  # Redis came back empty
    await rebuild(redis, keys, pg, settings, clock)
    assert await record(redis, keys.allocation(got.allocation_id)) == moved
    assert await redis.hget(keys.device(moved["device_id"]), "alloc") == got.allocation_id.encode()
    answer = reply_decoder.decode(await redis.get(f"{keys.prefix}:{{u:alice}}:req:r-1") or b"")
    assert isinstance(answer, Allocated) and answer.device.id == moved["device_id"]
    assert (await audit(redis, keys, pg))["consistent"]

    await redis.xgroup_create(keys.events, GROUP_EVENTS, id="0", mkstream=True)
    await redis.xadd(keys.events, {"d": orjson.dumps(event("device.failed",
                                                           device_id=moved["device_id"]))})
    reply = await redis.xreadgroup(GROUP_EVENTS, "t", {keys.events: ">"})
    await EventsStage(ctx).handle([Entry(keys.events, text(eid), dict(f))
                                   for _s, items in reply for eid, f in items])
    last = await record(redis, keys.allocation(got.allocation_id))
    assert (last["status"], last["version"]) == ("allocated", "3")
    assert last["device_id"] not in (got.device.id, moved["device_id"])


async def test_devsched_allocate_replace_on_failure_sets_the_flag(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("DEVSCHED_PREFIX", settings.prefix)
    await seed(redis, keys, clock, devices=pair(), quotas=[QuotaSpec(user_id="alice")])
    for rid, flag in (("r-cli", ["--replace-on-failure"]), ("r-plain", [])):
        argv = ["allocate", "alice", "--pool", "eu", "--request-id", rid, *flag]
        assert await asyncio.to_thread(cli.main, argv) == 0
        printed = reply_decoder.decode(capsys.readouterr().out.strip().splitlines()[-1])
        assert isinstance(printed, Allocated)
        flagged = await redis.hget(keys.allocation(printed.allocation_id), "replace_on_failure")
        assert flagged == (b"1" if flag else None)


async def test_a_move_to_a_device_on_another_host_moves_its_host_count(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    """The per-host active counts (least_loaded, bin_pack) follow the allocation to the
    new device's host in the same step, and the audit agrees."""
    first = msgspec.structs.replace(phone(1), host="rack-a")
    second = msgspec.structs.replace(phone(2), host="rack-b")
    await seed(redis, keys, clock, devices=[first, second], quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("alice", pool="eu", request_id="r-1",
                                    replace_on_failure=True)
    assert isinstance(got, Allocated) and got.device.id == "pixel-1"
    assert await redis.hget(keys.host_active, "rack-a") == b"1"
    await send(redis, keys, event("device.failed", device_id="pixel-1"))
    moved = await record(redis, keys.allocation(got.allocation_id))
    assert moved["device_id"] == "pixel-2"
    counts = {text(k): int(v) for k, v in (await redis.hgetall(keys.host_active)).items()}
    assert counts.get("rack-a", 0) == 0 and counts["rack-b"] == 1
    assert (await audit(redis, keys, pg))["consistent"]
