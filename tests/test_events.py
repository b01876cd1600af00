"""Events from other systems, end to end: each of the 15 types through the real pipeline.

Every test runs all stages in process (the ``pipeline`` fixture) on real Redis and
PostgreSQL, adds events to ``<prefix>:events`` as another system would (``XADD ... d
<json>``), waits until the events stage acked them and the write-behind caught up,
then reads what each event must have done: the state in Redis, the rows in
PostgreSQL (``device_allocations.end_reason``, ``devices.status``,
``user_quotas.status``), the billing ledger, the notifications, and what the next
allocate gets.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import text
from pipeline.worker import groups_caught_up
from schemas.keys import GROUP_EVENTS, Keys
from schemas.messages import (
    Allocated,
    DeviceSpec,
    Failed,
    Notification,
    QuotaSpec,
    notification_decoder,
)
from stages.settings import Settings
from stages.tools.admin import list_devices, user_state, write_behind_drained
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, wait_until


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """An event as another system sends it: a fresh event id unless one is given."""
    return {"type": kind, "event_id": fields.pop("event_id", uuid.uuid4().hex),
            "occurred_at_ms": 1_700_000_000_000, **fields}


async def send(redis: Redis, keys: Keys, *events: dict[str, Any] | bytes) -> None:
    """XADD each event to the events stream, then wait until the events stage acked
    them all and persist, bill and notify caught up with what they changed."""
    for ev in events:
        payload = ev if isinstance(ev, bytes) else orjson.dumps(ev)
        await redis.xadd(keys.events, {"d": payload})
    await wait_until(lambda: groups_caught_up(redis, keys.events, [GROUP_EVENTS]))
    await wait_until(lambda: write_behind_drained(redis, keys))


async def notifications(redis: Redis, keys: Keys) -> list[Notification]:
    return [notification_decoder.decode(f[b"d"]) for _i, f in await redis.xrange(keys.notifications)]


async def notes_of(redis: Redis, keys: Keys, kind: str) -> list[Notification]:
    return [n for n in await notifications(redis, keys) if n.event == kind]


async def allocation_row(pg: asyncpg.Pool, aid: str) -> asyncpg.Record:
    async with pg.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT a.status, a.end_reason, a.duration_seconds, l.end_reason AS billed_reason,"
            " l.duration_seconds AS billed_seconds FROM device_allocations a"
            " LEFT JOIN billing_ledger l ON l.allocation_id = a.id WHERE a.id = $1", aid)
    assert row is not None, aid
    return row


async def pg_value(pg: asyncpg.Pool, query: str, *args: object) -> object:
    async with pg.acquire() as conn:
        return await conn.fetchval(query, *args)


async def allocate_all(client: Client, user: str, n: int, clock: ManualClock,
                       step_ms: int = 0, **fields: Any) -> list[Allocated]:
    out = []
    for _ in range(n):
        got = await client.allocate(user, **fields)
        assert isinstance(got, Allocated), got
        out.append(got)
        clock.advance(step_ms)
    return out


async def assert_closed(redis: Redis, keys: Keys, pg: asyncpg.Pool, allocs: Sequence[Allocated],
                        reason: str, seconds: int) -> None:
    """Each allocation closed like a release, with ``reason``: in Redis, in PostgreSQL and
    billed once in the ledger, to the exact second; a device.released notification."""
    released = {n.allocation_id: n for n in await notes_of(redis, keys, "device.released")}
    for a in allocs:
        rec = {text(k): text(v) for k, v in (await redis.hgetall(keys.allocation(a.allocation_id))).items()}
        assert (rec["status"], rec["end_reason"], int(rec["duration_seconds"])) == (
            "released", reason, seconds), rec
        assert not await redis.zscore(keys.expiry, a.allocation_id)
        row = await allocation_row(pg, a.allocation_id)
        assert (row["status"], row["end_reason"], row["duration_seconds"]) == (
            "released", reason, seconds)
        assert (row["billed_reason"], row["billed_seconds"]) == (reason, seconds)
        assert released[a.allocation_id].reason == reason


async def assert_still_active(redis: Redis, keys: Keys, allocs: Sequence[Allocated]) -> None:
    for a in allocs:
        assert await redis.hget(keys.allocation(a.allocation_id), "status") == b"allocated"


# --- device events ------------------------------------------------------------------


async def test_device_failed_releases_its_allocation_and_keeps_it_out_of_the_pool(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        (got,) = await allocate_all(client, "alice", 1, clock)
        clock.advance(42_700)
        await send(redis, keys, event("device.failed", device_id="d1",
                                      reason="Docker container crashed"))
        await assert_closed(redis, keys, pg, [got], "device_failed", 42)
        assert (await user_state(redis, keys, "alice")).usage["devices"] == 0
        dev = await redis.hgetall(keys.device("d1"))
        assert dev[b"status"] == b"failed" and dev[b"alloc"] == b""
        assert await redis.zscore(keys.free("default"), "d1") is None
        assert await pg_value(pg, "SELECT status FROM devices WHERE id = 'd1'") == "failed"
        (note,) = await notes_of(redis, keys, "device.failed")
        assert (note.user_id, note.allocation_id, note.reason) == (
            "alice", got.allocation_id, "Docker container crashed")
        refused = await client.allocate("alice")
        assert isinstance(refused, Failed) and refused.reason == "no_available_devices"


async def test_device_deleted_releases_and_leaves_pool_and_listings(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        (got,) = await allocate_all(client, "alice", 1, clock)
        clock.advance(5_000)
        await send(redis, keys, event("device.deleted", device_id=got.device.id))
        await assert_closed(redis, keys, pg, [got], "device_deleted", 5)
        listed = [d.id for d in (await list_devices(redis, keys)).devices]
        assert got.device.id not in listed and len(listed) == 1
        assert await redis.zscore(keys.free("default"), got.device.id) is None
        assert await pg_value(pg, "SELECT status FROM devices WHERE id = $1",
                              got.device.id) == "deleted"
        (note,) = await notes_of(redis, keys, "device.deleted")
        assert note.user_id == "alice" and "email" in note.channels
        again = await client.allocate("alice")
        assert isinstance(again, Allocated) and again.device.id != got.device.id


async def test_device_status_changed_stopped_releases_and_running_returns_it(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        (got,) = await allocate_all(client, "alice", 1, clock)
        clock.advance(3_000)
        await send(redis, keys, event("device.status_changed", device_id="d1", status="stopped",
                                      previous_status="running", version=1))
        await assert_closed(redis, keys, pg, [got], "device_stopped", 3)
        assert await redis.hget(keys.device("d1"), "status") == b"stopped"
        refused = await client.allocate("alice")
        assert isinstance(refused, Failed) and refused.reason == "no_available_devices"
        await send(redis, keys, event("device.status_changed", device_id="d1", status="error",
                                      version=2))
        assert await redis.hget(keys.device("d1"), "status") == b"error"
        await send(redis, keys, event("device.status_changed", device_id="d1", status="running",
                                      version=3))
        assert await redis.hget(keys.device("d1"), "status") == b"available"
        assert await pg_value(pg, "SELECT status FROM devices WHERE id = 'd1'") == "available"
        back = await client.allocate("alice")
        assert isinstance(back, Allocated) and back.device.id == "d1"
    notes = await notes_of(redis, keys, "device.status_changed")
    assert [n.status for n in notes] == ["stopped", "error", "available"]


async def test_device_maintenance_releases_and_tells_the_user_what_and_until_when(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="alice")])
    end = clock.now_ms() + 7_200_000
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        (got,) = await allocate_all(client, "alice", 1, clock)
        clock.advance(61_000)
        await send(redis, keys, event("device.maintenance", device_id="d1",
                                      info="battery replacement", expected_end_ms=end))
        await assert_closed(redis, keys, pg, [got], "device_maintenance", 61)
        assert await redis.hget(keys.device("d1"), "status") == b"maintenance"
        (note,) = await notes_of(redis, keys, "device.maintenance")
        assert (note.user_id, note.info, note.expected_end_ms) == (
            "alice", "battery replacement", end)
        assert "battery replacement" in note.message and "expected back at" in note.message
        refused = await client.allocate("alice")
        assert isinstance(refused, Failed) and refused.reason == "no_available_devices"
        await send(redis, keys, event("device.status_changed", device_id="d1", status="running"))
        back = await client.allocate("alice")
        assert isinstance(back, Allocated) and back.device.id == "d1"


async def test_device_created_adds_it_to_the_pool_as_devices_add_does(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[], quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        refused = await client.allocate("alice")
        assert isinstance(refused, Failed) and refused.reason == "no_available_devices"
        await send(redis, keys, event("device.created", device_id="new-1", pool="p9",
                                      model="pixel", cpu_cores=8, memory_mb=8192,
                                      adb_host="10.0.0.9", adb_port=5601))
        [listed] = (await list_devices(redis, keys)).devices
        assert (listed.id, listed.name, listed.pool, listed.status) == (
            "new-1", "new-1", "p9", "available")
        async with pg.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM devices WHERE id = 'new-1'")
        assert (row["pool"], row["model"], row["cpu_cores"], row["adb_port"], row["status"]) == (
            "p9", "pixel", 8, 5601, "available")
        got = await client.allocate("alice", model="pixel")
        assert isinstance(got, Allocated) and (got.device.id, got.adb_host, got.adb_port) == (
            "new-1", "10.0.0.9", 5601)
    (note,) = await notes_of(redis, keys, "device.created")
    assert note.device_id == "new-1" and note.status == "available"


# --- user events --------------------------------------------------------------------


async def test_user_deleted_releases_everything_and_refuses_later_requests(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}") for i in range(3)],
               quotas=[QuotaSpec(user_id="alice"), QuotaSpec(user_id="bob")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        mine = await allocate_all(client, "alice", 2, clock, step_ms=1_000)
        (bobs,) = await allocate_all(client, "bob", 1, clock)
        clock.advance(10_000)
        await send(redis, keys, event("user.deleted", user_id="alice", reason="account closed"))
        await assert_closed(redis, keys, pg, mine[:1], "user_deleted", 12)
        await assert_closed(redis, keys, pg, mine[1:], "user_deleted", 11)
        await assert_still_active(redis, keys, [bobs])
        state = await user_state(redis, keys, "alice")
        assert state.allocations == {} and state.usage["devices"] == 0
        assert state.quota["status"] == "deleted"
        assert await pg_value(pg, "SELECT status FROM user_quotas WHERE user_id = 'alice'") == "deleted"
        refused = await client.allocate("alice")
        assert isinstance(refused, Failed) and refused.reason == "quota_exceeded"
    (note,) = await notes_of(redis, keys, "user.deleted")
    assert note.released_allocations == 2 and note.status == "deleted"


async def test_user_suspended_releases_everything_then_activated_unblocks(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}") for i in range(4)],
               quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        mine = await allocate_all(client, "alice", 3, clock)
        clock.advance(2_000)
        await send(redis, keys, event("user.suspended", user_id="alice", version=1,
                                      reason="Violation of terms"))
        await assert_closed(redis, keys, pg, mine, "user_suspended", 2)
        assert (await user_state(redis, keys, "alice")).usage == {
            "devices": 0, "cpu": 0, "mem": 0, "sto": 0}
        assert await pg_value(pg, "SELECT status FROM user_quotas WHERE user_id = 'alice'") == "suspended"
        refused = await client.allocate("alice")
        assert isinstance(refused, Failed) and refused.reason == "user_suspended"
        await send(redis, keys, event("user.activated", user_id="alice", version=2))
        assert await pg_value(pg, "SELECT status FROM user_quotas WHERE user_id = 'alice'") == "active"
        again = await client.allocate("alice")
        assert isinstance(again, Allocated)
    (suspended,) = await notes_of(redis, keys, "user.suspended")
    assert (suspended.released_allocations, suspended.reason) == (3, "Violation of terms")
    (activated,) = await notes_of(redis, keys, "user.activated")
    assert activated.status == "active"


async def test_quota_updated_below_use_releases_the_oldest_and_keeps_the_newest(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}") for i in range(8)],
               quotas=[QuotaSpec(user_id="alice", max_devices=8)])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        mine = await allocate_all(client, "alice", 8, clock, step_ms=1_000)
        await send(redis, keys, event("user.quota_updated", user_id="alice", max_devices=5,
                                      total_cpu_cores=16))
        await assert_closed(redis, keys, pg, mine[:1], "quota_reduced", 8)
        await assert_closed(redis, keys, pg, mine[1:2], "quota_reduced", 7)
        await assert_closed(redis, keys, pg, mine[2:3], "quota_reduced", 6)
        await assert_still_active(redis, keys, mine[3:])
        state = await user_state(redis, keys, "alice")
        assert state.usage["devices"] == 5 and state.quota["max_devices"] == "5"
        assert state.quota["max_cpu_per_device"] == "16"  # left out: kept
        async with pg.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM user_quotas WHERE user_id = 'alice'")
        assert (row["max_devices"], row["total_cpu_cores"]) == (5, 16)
        refused = await client.allocate("alice")
        assert isinstance(refused, Failed) and refused.reason == "quota_exceeded"
    (note,) = await notes_of(redis, keys, "user.quota_updated")
    assert note.released_allocations == 3 and "3 oldest allocations released" in note.message


async def test_quota_updated_creates_a_quota_for_a_new_user(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[])
    await send(redis, keys, event("user.quota_updated", user_id="newbie", max_devices=1))
    async with pg.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM user_quotas WHERE user_id = 'newbie'")
    assert (row["status"], row["max_devices"], row["total_cpu_cores"]) == (
        "active", 1, QuotaSpec(user_id="x").total_cpu_cores)
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        assert isinstance(await client.allocate("newbie"), Allocated)


async def test_quota_exceeded_releases_the_excess_oldest_first(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}", cpu_cores=2) for i in range(4)],
               quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        mine = await allocate_all(client, "alice", 4, clock, step_ms=2_000)
        # the limits lowered by command (nothing released), then the user service says so
        await seed(redis, keys, clock, devices=[], quotas=[QuotaSpec(user_id="alice",
                                                                    total_cpu_cores=4)])
        await send(redis, keys, event("user.quota_exceeded", user_id="alice"))
    await assert_closed(redis, keys, pg, mine[:1], "quota_exceeded", 8)
    await assert_closed(redis, keys, pg, mine[1:2], "quota_exceeded", 6)
    await assert_still_active(redis, keys, mine[2:])
    assert (await user_state(redis, keys, "alice")).usage["cpu"] == 4
    (note,) = await notes_of(redis, keys, "user.quota_exceeded")
    assert note.released_allocations == 2


# --- billing events -----------------------------------------------------------------


async def test_three_payment_failures_warn_twice_then_release_and_suspend(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}") for i in range(3)],
               quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        mine = await allocate_all(client, "alice", 2, clock)
        for n in (1, 2):
            await send(redis, keys, event("billing.payment_failed", user_id="alice",
                                          amount=50.0, reason="Insufficient funds"))
            assert int(await redis.get(keys.payment_failures("alice")) or 0) == n
            await assert_still_active(redis, keys, mine)
        ttl = await redis.ttl(keys.payment_failures("alice"))
        assert settings.payment_failure_ttl_s - 60 < ttl <= settings.payment_failure_ttl_s
        clock.advance(9_000)
        await send(redis, keys, event("billing.payment_failed", user_id="alice", amount=50.0))
        await assert_closed(redis, keys, pg, mine, "payment_failed", 9)
        refused = await client.allocate("alice")
        assert isinstance(refused, Failed) and refused.reason == "user_suspended"
    notes = await notes_of(redis, keys, "billing.payment_failed")
    assert [(n.failure_count, n.failure_threshold, n.released_allocations) for n in notes] == [
        (1, 3, 0), (2, 3, 0), (3, 3, 2)]
    assert "1 of 3" in notes[0].message and "suspended" in notes[2].message
    assert await pg_value(pg, "SELECT status FROM user_quotas WHERE user_id = 'alice'") == "suspended"


async def test_balance_low_only_notifies(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        mine = await allocate_all(client, "alice", 1, clock)
        await send(redis, keys, event("billing.balance_low", user_id="alice", balance=3.5,
                                      threshold=10.0))
        await assert_still_active(redis, keys, mine)
    (note,) = await notes_of(redis, keys, "billing.balance_low")
    assert (note.balance, note.status, note.released_allocations) == (3.5, "active", 0)
    assert "email" in note.channels and "3.50" in note.message


async def test_overdue_releases_everything_at_once_and_blocks_until_paid(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}") for i in range(3)],
               quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        mine = await allocate_all(client, "alice", 3, clock)
        clock.advance(4_000)
        await send(redis, keys, event("billing.overdue", user_id="alice", amount=150.5, days=7))
        await assert_closed(redis, keys, pg, mine, "billing_overdue", 4)
        refused = await client.allocate("alice")
        assert isinstance(refused, Failed) and refused.reason == "billing_overdue"
        assert await pg_value(pg, "SELECT status FROM user_quotas WHERE user_id = 'alice'") == "overdue"
        await send(redis, keys, event("billing.payment_success", user_id="alice", amount=150.5,
                                      balance=0.0))
        assert await pg_value(pg, "SELECT status FROM user_quotas WHERE user_id = 'alice'") == "active"
        assert isinstance(await client.allocate("alice"), Allocated)
    (note,) = await notes_of(redis, keys, "billing.overdue")
    assert (note.amount, note.days, note.released_allocations) == (150.5, 7, 3)
    assert note.channels == ["webhook", "websocket", "email", "sms"]
    assert "150.50" in note.message and "7 days" in note.message
    (paid,) = await notes_of(redis, keys, "billing.payment_success")
    assert (paid.amount, paid.status) == (150.5, "active")


async def test_payment_success_resets_the_failure_count(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="alice")])
    failed = event("billing.payment_failed", user_id="alice")
    await send(redis, keys, failed, event("billing.payment_failed", user_id="alice"))
    assert await redis.get(keys.payment_failures("alice")) == b"2"
    await send(redis, keys, event("billing.payment_success", user_id="alice", amount=20.0))
    assert await redis.get(keys.payment_failures("alice")) is None
    # counting starts again: one more failure is a first warning, not a suspension
    await send(redis, keys, event("billing.payment_failed", user_id="alice"))
    notes = await notes_of(redis, keys, "billing.payment_failed")
    assert [n.failure_count for n in notes] == [1, 2, 1]
    assert (await user_state(redis, keys, "alice")).quota["status"] == "active"


async def test_recharged_resets_the_count_and_lifts_a_payment_suspension(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="alice")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        await send(redis, keys, *(event("billing.payment_failed", user_id="alice")
                                  for _ in range(3)))
        refused = await client.allocate("alice")
        assert isinstance(refused, Failed) and refused.reason == "user_suspended"
        await send(redis, keys, event("billing.recharged", user_id="alice", amount=100.0,
                                      balance=250.0))
        assert await redis.get(keys.payment_failures("alice")) is None
        assert isinstance(await client.allocate("alice"), Allocated)
    (note,) = await notes_of(redis, keys, "billing.recharged")
    assert (note.amount, note.balance, note.status) == (100.0, 250.0, "active")
    assert "100.00" in note.message and "250.00" in note.message


async def test_recharge_does_not_lift_a_suspension_by_the_user_service(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="alice")])
    await send(redis, keys, event("user.suspended", user_id="alice"),
               event("billing.overdue", user_id="alice", amount=1.0, days=1),
               event("billing.recharged", user_id="alice", amount=5.0))
    assert (await user_state(redis, keys, "alice")).quota["status"] == "suspended"
    await send(redis, keys, event("user.activated", user_id="alice"))
    assert (await user_state(redis, keys, "alice")).quota["status"] == "active"
