"""Reservations (SPEC A10): booked -> active -> completed, booked -> no_show, refusals.

Through the running pipeline with the injected clock (ticks given by the test, never a
sleep): a booking answers ``reserved`` with the device; at its start (a tick) it becomes
an allocation held for its user, notified with the device; claimed, it runs to its end,
is expired there and billed once (one ledger row) and the reservation is ``completed``;
unclaimed past DEVSCHED_RESERVATION_GRACE_S it ends ``no_show``, its allocation released
(reason no_show) and the device free again. The same request id always gets its first
answer and books once (checked by the count of bookings in Redis and of rows in
PostgreSQL). A device is never double-booked: an overlapping booking is refused
``overlaps``; a plain allocation passes over a device booked before it would end; a
renewal into a booking is refused ``reserved``; bad intervals are ``invalid_interval``.
"""

from __future__ import annotations

import asyncpg
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import Keys
from schemas.messages import (
    Allocated,
    Claimed,
    DeviceSpec,
    Failed,
    QuotaSpec,
    Renewed,
    ReservationCancelled,
    Reserved,
    notification_decoder,
)
from stages.context import StageContext
from stages.settings import Settings
from stages.tools.admin import delete_keys, write_behind_drained
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, tick_through_timers, wait_until

MIN = 60_000


async def drained(redis: Redis, keys: Keys) -> None:
    await wait_until(lambda: write_behind_drained(redis, keys))


async def reservation_row(pg: asyncpg.Pool, rid: str) -> asyncpg.Record:
    async with pg.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM reservations WHERE id = $1", rid)
    assert row is not None
    return row


async def events_of(redis: Redis, keys: Keys, reservation_id: str) -> list[str]:
    notes = [notification_decoder.decode(f[b"d"])
             for _, f in await redis.xrange(keys.notifications)]
    return [n.event for n in notes if n.reservation_id == reservation_id]


async def test_booked_active_claimed_completed_billed_once(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="u1")])
    start, end = clock.now_ms() + 5 * MIN, clock.now_ms() + 15 * MIN
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        booked = await client.reserve("u1", start, end, device_id="d1", request_id="r1")
        again = await client.reserve("u1", start, end, device_id="d1", request_id="r1")
        assert isinstance(booked, Reserved), booked
        assert again == booked  # the same request id: its first answer, booked once
        assert (booked.device_id, booked.status, booked.start_ms) == ("d1", "booked", start)
        assert await redis.zcard(keys.bookings("d1")) == 1
        # before the start it cannot be claimed; a plain allocation of 1 min still fits
        early = await client.claim_reservation(booked.reservation_id, "u1")
        assert isinstance(early, Failed) and early.reason == "not_active"

        clock.advance(5 * MIN)  # the start: a tick activates it
        await tick_through_timers(redis, settings, clock)
        status = await redis.hget(keys.reservation(booked.reservation_id), "status")
        assert status == b"active"
        claimed = await client.claim_reservation(booked.reservation_id, "u1", request_id="c1")
        assert isinstance(claimed, Claimed), claimed
        assert (claimed.device.id, claimed.expires_at_ms) == ("d1", end)
        assert await client.claim_reservation(booked.reservation_id, "u1",
                                              request_id="c1") == claimed
        other = await client.claim_reservation(booked.reservation_id, "u2")
        assert isinstance(other, Failed) and other.reason == "not_owner"

    clock.advance(10 * MIN)  # the end: expired there (expire job), then completed
    await tick_through_timers(redis, settings, clock)
    clock.advance(1_000)
    await tick_through_timers(redis, settings, clock)
    assert await redis.hget(keys.reservation(booked.reservation_id), "status") == b"completed"
    assert await redis.hget(keys.device("d1"), "status") == b"available"
    assert await redis.zcard(keys.bookings("d1")) == 0
    await drained(redis, keys)
    row = await reservation_row(pg, booked.reservation_id)
    assert row["status"] == "completed" and str(row["allocation_id"]) == claimed.allocation_id
    assert row["claimed_at"] is not None
    async with pg.acquire() as conn:
        ledger = await conn.fetch("SELECT * FROM billing_ledger WHERE allocation_id = $1",
                                  claimed.allocation_id)
        n_rows = await conn.fetchval("SELECT count(*) FROM reservations")
    assert [(r["duration_seconds"], r["end_reason"]) for r in ledger] == [(600, "expired")]
    assert n_rows == 1
    assert await events_of(redis, keys, booked.reservation_id) == [
        "reservation.booked", "reservation.active", "reservation.claimed",
        "reservation.completed"]


async def test_unclaimed_reservation_ends_no_show_and_frees_the_device(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="u1")])
    start = clock.now_ms() + 2_000
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        booked = await client.reserve("u1", start, start + 60 * MIN)
        assert isinstance(booked, Reserved), booked
        clock.advance(2_000)
        await tick_through_timers(redis, settings, clock)
        assert await redis.hget(keys.device("d1"), "status") == b"allocated"
        # within the grace period it stays held
        clock.advance(settings.reservation_grace_s * 1000 - 1_000)
        await tick_through_timers(redis, settings, clock)
        assert await redis.hget(keys.reservation(booked.reservation_id), "status") == b"active"
        clock.advance(1_000)  # the grace is over
        await tick_through_timers(redis, settings, clock)
        assert await redis.hget(keys.reservation(booked.reservation_id), "status") == b"no_show"
        assert await redis.hget(keys.device("d1"), "status") == b"available"
        late = await client.claim_reservation(booked.reservation_id, "u1")
        assert isinstance(late, Failed) and late.reason == "not_active"
        # the device serves plain allocations again
        got = await client.allocate("u1", duration_minutes=5)
        assert isinstance(got, Allocated) and got.device.id == "d1"
    await drained(redis, keys)
    row = await reservation_row(pg, booked.reservation_id)
    assert (row["status"], row["reason"], row["claimed_at"]) == ("no_show", "no_show", None)
    async with pg.acquire() as conn:
        alloc = await conn.fetchrow("SELECT * FROM device_allocations WHERE id = $1",
                                    row["allocation_id"])
        ledger = await conn.fetch("SELECT * FROM billing_ledger WHERE allocation_id = $1",
                                  row["allocation_id"])
    assert (alloc["status"], alloc["end_reason"]) == ("released", "no_show")
    assert [r["end_reason"] for r in ledger] == ["no_show"]
    assert await events_of(redis, keys, booked.reservation_id) == [
        "reservation.booked", "reservation.active", "reservation.no_show"]


async def test_overlap_refused_plain_allocation_avoids_booking_renewal_refused(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="u1")])
    now = clock.now_ms()
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        booked = await client.reserve("u1", now + 30 * MIN, now + 90 * MIN, device_id="d1")
        assert isinstance(booked, Reserved), booked
        for s, e in ((20, 31), (89, 100), (40, 50), (0, 200)):
            clash = await client.reserve("u1", now + s * MIN, now + e * MIN, device_id="d1")
            assert isinstance(clash, Failed) and clash.reason == "overlaps", (s, e, clash)
        # touching intervals do not overlap
        before = await client.reserve("u1", now + 10 * MIN, now + 30 * MIN, device_id="d1")
        assert isinstance(before, Reserved), before
        # a plain allocation that would run into d1's booking gets d2; a short one fits d1
        long = await client.allocate("u1", duration_minutes=120)
        assert isinstance(long, Allocated) and long.device.id == "d2"
        none = await client.allocate("u1", duration_minutes=120)
        assert isinstance(none, Failed) and none.reason == "no_available_devices"
        short = await client.allocate("u1", duration_minutes=10)
        assert isinstance(short, Allocated) and short.device.id == "d1"
        # renewing it into the booking at +10 min is refused; up to it is fine
        into = await client.renew(short.allocation_id, "u1", extend_seconds=1)
        assert isinstance(into, Failed) and into.reason == "reserved", into
        # a booking of "any device" while both are held: d1 is held until +10, d2 +120
        anyone = await client.reserve("u1", now + 95 * MIN, now + 100 * MIN)
        assert isinstance(anyone, Reserved) and anyone.device_id == "d1"
        taken = await client.reserve("u1", now + 5 * MIN, now + 8 * MIN)
        assert isinstance(taken, Failed) and taken.reason == "overlaps"
        # cancelled, the slot is bookable again
        gone = await client.cancel_reservation(before.reservation_id, "u1", request_id="x1")
        assert isinstance(gone, ReservationCancelled) and gone.previous_status == "booked"
        assert await client.cancel_reservation(before.reservation_id, "u1",
                                               request_id="x1") == gone
        twice = await client.cancel_reservation(before.reservation_id, "u1")
        assert isinstance(twice, Failed) and twice.reason == "not_active"
        ok = await client.renew(short.allocation_id, "u1", extend_minutes=20)
        assert isinstance(ok, Renewed), ok


async def test_bad_intervals_and_blocked_users_get_typed_refusals(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock,
) -> None:
    day = 86_400_000
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1", cpu_cores=4)],
               quotas=[QuotaSpec(user_id="u1"), QuotaSpec(user_id="sus", status="suspended"),
                       QuotaSpec(user_id="brief", expires_at_ms=clock.now_ms() + day),
                       QuotaSpec(user_id="small", max_cpu_per_device=2)])
    now = clock.now_ms()
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        async def refused(user: str, s: int, e: int, **kw: object) -> str:
            reply = await client.reserve(user, s, e, **kw)  # type: ignore[arg-type]
            assert isinstance(reply, Failed), reply
            return reply.reason

        assert await refused("u1", now + MIN, now + MIN) == "invalid_interval"
        assert await refused("u1", now + 2 * MIN, now + MIN) == "invalid_interval"
        assert await refused("u1", now - MIN, now + MIN) == "invalid_interval"
        too_long = now + (settings.max_allocation_s + 1) * 1000
        assert await refused("u1", now + MIN, now + MIN + too_long) == "invalid_interval"
        assert await refused("sus", now + MIN, now + 2 * MIN) == "user_suspended"
        assert await refused("nobody", now + MIN, now + 2 * MIN) == "quota_exceeded"
        assert await refused("brief", now + MIN, now + 2 * day) == "exceeds_quota_expiry"
        assert await refused("u1", now + MIN, now + 2 * MIN,
                             device_id="no-such") == "not_found"
        assert await refused("small", now + MIN, now + 2 * MIN,
                             device_id="d1") == "quota_exceeded"
        assert await refused("u1", now + MIN, now + 2 * MIN,
                             min_cpu_cores=8) == "no_available_devices"
        gone = await client.cancel_reservation("no-such", "u1")
        assert isinstance(gone, Failed) and gone.reason == "not_found"


async def reservation_state(redis: Redis, keys: Keys) -> dict[str, object]:
    """Every reservation key (hashes without empty fields, bookings, schedules) and the
    reservation marks on allocations."""
    state: dict[str, object] = {}
    async for raw in redis.scan_iter(match=f"{keys.prefix}:{{pool}}:*", count=1000):
        name = raw.decode()
        kind = await redis.type(name)
        if ":rsv" in name or ":bookings:" in name or name == keys.booked:
            if kind == b"hash":
                state[name] = {k: v for k, v in (await redis.hgetall(name)).items() if v}
            else:
                state[name] = await redis.zrange(name, 0, -1, withscores=True)
        elif ":alloc:" in name:
            state[name] = await redis.hget(name, "reservation_id")
    return state


async def test_rebuild_restores_bookings_schedules_and_answers(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    from stages.tools.rebuild import rebuild
    from tests.test_rebuild import start_pipeline

    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="u1")])
    now = clock.now_ms()
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        later = await client.reserve("u1", now + 60 * MIN, now + 90 * MIN, device_id="d1",
                                     request_id="r-later")
        soon = await client.reserve("u1", now + MIN, now + 30 * MIN, device_id="d2")
        assert isinstance(later, Reserved) and isinstance(soon, Reserved)
        clock.advance(MIN)
        await tick_through_timers(redis, settings, clock)  # soon: active, not claimed
    await drained(redis, keys)
    await pipeline.close()
    before = await reservation_state(redis, keys)
    assert before[keys.reservation(soon.reservation_id)]  # type: ignore[index]

    await delete_keys(redis, settings.prefix)  # Redis came back empty
    report = await rebuild(redis, keys, pg, settings, clock)
    assert report.reservations == 2
    assert await reservation_state(redis, keys) == before
    from stages.tools.audit import audit

    checked = await audit(redis, keys, pg)  # the active reservation's allocation too
    assert checked["consistent"], checked

    again = await start_pipeline(settings, clock)
    try:
        async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
            retried = await client.reserve("u1", now + 60 * MIN, now + 90 * MIN,
                                           device_id="d1", request_id="r-later")
            assert retried == later  # its first answer, not a second booking
            clash = await client.reserve("u1", now + 70 * MIN, now + 80 * MIN, device_id="d1")
            assert isinstance(clash, Failed) and clash.reason == "overlaps"
            clock.advance(settings.reservation_grace_s * 1000)
            await tick_through_timers(redis, settings, clock)
            assert await redis.hget(keys.reservation(soon.reservation_id), "status") == b"no_show"
            clock.advance(60 * MIN)
            await tick_through_timers(redis, settings, clock)
            assert await redis.hget(keys.reservation(later.reservation_id), "status") == b"active"
    finally:
        await again.close()


async def devsched(settings: Settings, *argv: str) -> tuple[int, str]:
    import asyncio
    import os

    from tests.test_admin import devsched_command

    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix)
    proc = await asyncio.create_subprocess_exec(
        devsched_command(), *argv, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), EVENT_TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def test_reserve_list_and_cancel_commands(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    import orjson

    # the commands take the system's time (offsets from now); the pipeline's clock is
    # moved there so that the start is ahead of it
    from pipeline.clock import SystemClock

    clock.advance(SystemClock().now_ms() - clock.now_ms())
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="u1")])
    code, out = await devsched(settings, "reserve", "u1", "--device", "d1", "--start", "+10m",
                               "--duration", "30m")
    assert code == 0, out
    booked = orjson.loads(out)
    assert booked["type"] == "reserved" and booked["end_ms"] - booked["start_ms"] == 1_800_000
    code, out = await devsched(settings, "reserve", "u1", "--device", "d1", "--start", "+20m",
                               "--end", "+50m")
    assert code == 2 and orjson.loads(out)["reason"] == "overlaps", out
    await drained(redis, keys)
    code, out = await devsched(settings, "reservations", "list", "--json")
    assert code == 0, out
    [listed] = orjson.loads(out)["reservations"]
    assert (listed["reservation_id"], listed["status"]) == (booked["reservation_id"], "booked")
    code, out = await devsched(settings, "reservations", "cancel", booked["reservation_id"],
                               "--user", "u1")
    assert code == 0 and orjson.loads(out)["type"] == "reservation_cancelled", out
    await drained(redis, keys)
    code, out = await devsched(settings, "reservations", "list", "--status", "cancelled")
    assert code == 0 and booked["reservation_id"] in out and "cancelled" in out, out


async def test_a_waiter_is_served_the_device_once_its_booking_is_cancelled(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock,
) -> None:
    import asyncio

    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="u1"), QuotaSpec(user_id="u2")])
    now = clock.now_ms()
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        booked = await client.reserve("u1", now + 10 * MIN, now + 20 * MIN, device_id="d1")
        assert isinstance(booked, Reserved), booked
        # 30 minutes would run into the booking: the request waits instead of taking d1
        waiting = asyncio.create_task(client.allocate("u2", duration_minutes=30,
                                                      wait_seconds=600, request_id="w1"))
        await wait_until(lambda: _is_queued(client, "w1"))
        assert await redis.hget(keys.device("d1"), "status") == b"available"
        gone = await client.cancel_reservation(booked.reservation_id, "u1")
        assert isinstance(gone, ReservationCancelled)
        got = await asyncio.wait_for(waiting, EVENT_TIMEOUT_S)  # served by the cancel's step
        assert isinstance(got, Allocated) and got.device.id == "d1"


async def _is_queued(client: Client, request_id: str) -> bool:
    return request_id in client.queued


async def test_a_redelivered_reserve_or_cancel_changes_nothing_twice(
    redis: Redis, ctx: StageContext, clock: ManualClock,
) -> None:
    """The same admitted entries handed to select twice (a worker that died before its
    ack; the entries are reclaimed and handled again): the second time each request
    gets its stored answer again, and there is still one booking and one change each."""
    from schemas.messages import ReservationChange, change_decoder, reply_decoder
    from tests.test_script_contract import CLIENT, Driver

    d = Driver(redis, ctx, clock)
    await d.start()
    await seed(redis, ctx.keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="u1")])
    now = clock.now_ms()
    await d.through_quota(d.reserve("r1", "u1", now + MIN, now + 2 * MIN, device_id="d1"))
    entries = await d._read(ctx.keys.admitted, "select")
    await d.select.handle(entries)
    await d.select.handle(entries)  # redelivered
    [first, again] = [reply_decoder.decode(f[b"d"]) for _, f in
                      await redis.xrange(ctx.keys.reply(CLIENT))]
    assert isinstance(first, Reserved) and again == first
    assert await redis.zcard(ctx.keys.bookings("d1")) == 1
    await d.through_quota(d.cancel_reservation("c1", first.reservation_id, "u1"))
    entries = await d._read(ctx.keys.admitted, "select")
    await d.select.handle(entries)
    await d.select.handle(entries)  # redelivered
    replies = [reply_decoder.decode(f[b"d"]) for _, f in
               await redis.xrange(ctx.keys.reply(CLIENT))]
    assert isinstance(replies[2], ReservationCancelled) and replies[3] == replies[2]
    changes = [change_decoder.decode(f[b"d"]) for _, f in await redis.xrange(ctx.keys.changes)]
    statuses = [c.status for c in changes if isinstance(c, ReservationChange)]
    assert statuses == ["booked", "cancelled"]  # one change each, not two
    assert await redis.zcard(ctx.keys.bookings("d1")) == 0
    assert await redis.hlen(ctx.keys.booked) == 0
