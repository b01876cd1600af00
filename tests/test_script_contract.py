"""The contract between the Lua scripts and the Structs: every message a script emits
decodes with the strict decoders.

Each script (quota, select, expire, admin, events) is driven through every path it has
on the real Redis, by the stages' own code (QuotaStage, SelectStage, expire_due,
add_devices, set_quotas, EventsStage): every refusal reason, invalid input, dead
letters, allocation, no device, quota exceeded at select, a user blocked between quota
and select, release by allocation and by device, a second release, not_found,
not_owner, expiry, device and quota updates, idempotent repeats, and each of the 15
events with every reason it releases for (plus stale, duplicate, ignored and invalid
events), an allocation asking for replace_on_failure moved to an equivalent device (its
request repeated: the stored answer names the new device) and one ended for want of an
equivalent device. Then EVERY
entry the scripts added to the reply stream, the admitted stream, the changes stream
and the dead stream is decoded with the strict decoders (every Struct Lua emits
forbids unknown fields), and the kinds seen must be exactly the kinds expected, so no
path silently drops out of the run.

That the test bites is shown by running the same paths with one emitted key renamed
in one script's source (loaded under its own SHA) and seeing strict decoding fail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import orjson
import pytest
from redis.asyncio import Redis

import stages.events
import stages.jobs
import stages.quota
import stages.reservations
import stages.select
import stages.timers
import stages.tools.admin
from pipeline.clock import ManualClock
from pipeline.connections import text
from pipeline.scripts import Script
from pipeline.worker import Entry
from schemas.keys import GROUP_EVENTS, GROUP_QUOTA, GROUP_SELECT, Keys
from schemas.messages import (
    Allocated,
    AllocatedBatch,
    AllocateRequest,
    AllocationChange,
    AllocationRenewed,
    AllocationReplaced,
    Cancelled,
    CancelRequest,
    CancelReservationRequest,
    Claimed,
    ClaimReservationRequest,
    DeviceEventApplied,
    DeviceSpec,
    DeviceUpserted,
    Failed,
    Queued,
    QuotaSet,
    QuotaSpec,
    Released,
    ReleasedBatch,
    ReleaseRequest,
    Renewed,
    RenewRequest,
    RequestRejected,
    ReservationCancelled,
    ReservationChange,
    Reserved,
    ReserveRequest,
    UserEventApplied,
    WaiterChange,
    change_decoder,
    decode_admitted,
    encoder,
    reply_decoder,
)
from schemas.rows import TenantOp
from schemas.runtime import dead_decoder
from stages.context import StageContext
from stages.events import EventsStage
from stages.quota import QuotaStage
from stages.reservations import activate_reservations, cancel_no_shows, complete_reservations
from stages.scripts import ADMIN, EVENTS, EXPIRE, QUOTA, RESERVATIONS, SELECT
from stages.select import SelectStage, allocation_id
from stages.state import state_epoch
from stages.timers import expire_due
from stages.tools.admin import add_devices, set_quotas

CLIENT = "contract"
"""The reply stream every request of the run names (one producer)."""


@dataclass
class Run:
    """One run of every path: what it wrote itself (not the scripts' output)."""

    keys: Keys
    own_admitted: set[str] = field(default_factory=set)
    """Admitted entries the test added directly (to reach select's own error paths)."""


class Driver:
    """Feeds requests through the real stages, one stage step at a time."""

    def __init__(self, redis: Redis, ctx: StageContext, clock: ManualClock) -> None:
        self.redis, self.ctx, self.clock = redis, ctx, clock
        self.keys = ctx.keys
        self.reply_to = self.keys.reply(CLIENT)
        self.quota = QuotaStage(ctx)
        self.quota_fail_open = QuotaStage(
            replace(ctx, settings=replace(ctx.settings, quota_fail_open=True)))
        self.quota_rate_limited = QuotaStage(replace(ctx, settings=replace(
            ctx.settings, rate_user_per_s=1.0, rate_user_burst=1, rate_tenant_per_s=1.0,
            rate_tenant_burst=1)))
        self.select = SelectStage(ctx)
        self.events = EventsStage(ctx)
        self.run = Run(self.keys)

    async def start(self) -> None:
        for stream, group in ((self.keys.requests, GROUP_QUOTA),
                              (self.keys.admitted, GROUP_SELECT),
                              (self.keys.events, GROUP_EVENTS)):
            await self.redis.xgroup_create(stream, group, id="0", mkstream=True)

    async def through_events(self, *events: dict[str, Any] | bytes) -> None:
        for n, ev in enumerate(events):
            if isinstance(ev, dict):
                ev = orjson.dumps({"event_id": f"{ev['type']}-{n}-{self.clock.now_ms()}",
                                   "occurred_at_ms": self.clock.now_ms(), **ev})
            await self.redis.xadd(self.keys.events, {"d": ev})
        await self.events.handle(await self._read(self.keys.events, GROUP_EVENTS))

    def allocate(self, user: str, rid: str, **fields: Any) -> bytes:
        return encoder.encode(AllocateRequest(request_id=rid, user_id=user,
                                              reply_to=self.reply_to, **fields))

    def renew(self, rid: str, aid: str, user: str, **fields: Any) -> bytes:
        return encoder.encode(RenewRequest(request_id=rid, reply_to=self.reply_to,
                                           allocation_id=aid, user_id=user, **fields))

    def cancel(self, rid: str, cancel_request_id: str, user: str) -> bytes:
        return encoder.encode(CancelRequest(request_id=rid, reply_to=self.reply_to,
                                            cancel_request_id=cancel_request_id, user_id=user))

    def reserve(self, rid: str, user: str, start: int, end: int, **fields: Any) -> bytes:
        return encoder.encode(ReserveRequest(request_id=rid, user_id=user, reply_to=self.reply_to,
                                             start_ms=start, end_ms=end, **fields))

    def cancel_reservation(self, rid: str, reservation_id: str, user: str) -> bytes:
        return encoder.encode(CancelReservationRequest(
            request_id=rid, reply_to=self.reply_to, reservation_id=reservation_id, user_id=user))

    def claim(self, rid: str, reservation_id: str, user: str) -> bytes:
        return encoder.encode(ClaimReservationRequest(
            request_id=rid, reply_to=self.reply_to, reservation_id=reservation_id, user_id=user))

    def release(self, rid: str, **fields: Any) -> bytes:
        return encoder.encode(ReleaseRequest(request_id=rid, reply_to=self.reply_to, **fields))

    async def _read(self, stream: str, group: str) -> list[Entry]:
        reply = await self.redis.xreadgroup(group, "contract", {stream: ">"}, count=10_000)
        return [Entry(stream, text(eid), dict(fields)) for _s, items in reply
                for eid, fields in items]

    async def through_quota(self, *payloads: bytes, fail_open: bool = False,
                            rate_limited: bool = False) -> None:
        for payload in payloads:
            await self.redis.xadd(self.keys.requests, {"d": payload})
        stage = (self.quota_fail_open if fail_open else
                 self.quota_rate_limited if rate_limited else self.quota)
        await stage.handle(await self._read(self.keys.requests, GROUP_QUOTA))

    async def through_select(self) -> None:
        await self.select.handle(await self._read(self.keys.admitted, GROUP_SELECT))

    async def both(self, *payloads: bytes, fail_open: bool = False) -> None:
        await self.through_quota(*payloads, fail_open=fail_open)
        await self.through_select()

    async def admitted_directly(self, fields: dict[str, bytes]) -> None:
        entry_id = await self.redis.xadd(self.keys.admitted, fields)  # type: ignore[arg-type]
        self.run.own_admitted.add(text(entry_id))


async def every_path(redis: Redis, ctx: StageContext, clock: ManualClock) -> Run:
    """Drive quota, select, expire and admin through every path they have."""
    d = Driver(redis, ctx, clock)
    await d.start()
    keys, now = ctx.keys, clock.now_ms()

    # admin: devices (one updated after), quotas with and without an expiry
    await add_devices(redis, keys, clock, [
        DeviceSpec(id="d1", pool="p1", cpu_cores=2, memory_mb=4096),
        DeviceSpec(id="d2", name="second", pool="p1", cpu_cores=4, memory_mb=8192),
        DeviceSpec(id="d3", pool="p2", model="big", cpu_cores=8, memory_mb=16384),
        DeviceSpec(id="d4", pool="p1", cpu_cores=2, memory_mb=5000),
        DeviceSpec(id="d5", pool="p5", cpu_cores=2, memory_mb=4096),
        DeviceSpec(id="idle", pool="p3", cpu_cores=1, memory_mb=1024),
    ])
    await add_devices(redis, keys, clock, [
        DeviceSpec(id="d2", name="second", pool="p1", cpu_cores=4, memory_mb=8192,
                   storage_mb=65536)])
    await set_quotas(redis, keys, clock, [
        QuotaSpec(user_id="ok"),
        QuotaSpec(user_id="other"),
        QuotaSpec(user_id="susp", status="suspended"),
        QuotaSpec(user_id="overdue", status="overdue"),
        QuotaSpec(user_id="lapsed", status="expired"),
        QuotaSpec(user_id="past", expires_at_ms=now - 1),
        QuotaSpec(user_id="full", max_devices=0),
        QuotaSpec(user_id="small", max_cpu_per_device=1, max_memory_mb_per_device=1024),
        QuotaSpec(user_id="nocpu", total_cpu_cores=0),
        QuotaSpec(user_id="nomem", total_memory_gb=0),
        QuotaSpec(user_id="sto", total_storage_gb=64),
        QuotaSpec(user_id="race", total_cpu_cores=2, expires_at_ms=now + 86_400_000),
    ])

    # quota refuses, one reason each, and a refused request repeated gets its answer again
    await d.both(
        d.allocate("nobody", "r-none"), d.allocate("susp", "r-susp"),
        d.allocate("overdue", "r-overdue"), d.allocate("lapsed", "r-lapsed"),
        d.allocate("past", "r-past"), d.allocate("full", "r-full"),
        d.allocate("small", "r-cpu-per", min_cpu_cores=2),
        d.allocate("small", "r-mem-per", min_memory_mb=2048),
        d.allocate("nocpu", "r-nocpu"), d.allocate("nomem", "r-nomem"),
        d.allocate("susp", "r-susp"),
    )
    # invalid input: answered when it names a reply stream of ours, else dead-lettered
    await d.both(
        orjson.dumps({"type": "allocate", "request_id": "r-bad", "user_id": "ok",
                      "reply_to": d.reply_to, "duration_minutes": 0}),
        orjson.dumps({"type": "release", "request_id": "r-naming-nothing",
                      "reply_to": d.reply_to}),
        b"{not json",
    )
    # a release a producer sent straight to select (no `c`) that names nothing: select
    # refuses it as quota would (a refuse row: failed reply, rejected change)
    await d.admitted_directly({"d": orjson.dumps({"type": "release",
                                                  "request_id": "r-direct-bad",
                                                  "reply_to": d.reply_to})})
    await d.through_select()
    # rate limits: a user's second request and a tenant's second (another user) at once
    await d.through_quota(d.allocate("other", "r-rate-1", pool="nowhere"),
                          d.allocate("other", "r-rate-2"),
                          d.allocate("ok", "r-rate-t1", tenant_id="acme", pool="nowhere"),
                          d.allocate("small", "r-rate-t2", tenant_id="acme"),
                          rate_limited=True)
    await d.through_select()
    # fail-open admits a user with no quota; select allocates within no caps
    await d.both(d.allocate("nobody", "r-open", pool="p2"), fail_open=True)

    # allocate (d1); the same request again while in flight (re-admitted with its hold)
    # and after (the stored answer); then no device (pool, model)
    await d.through_quota(d.allocate("ok", "r-1", pool="p1"), d.allocate("ok", "r-1", pool="p1"))
    await d.through_select()
    await d.both(d.allocate("ok", "r-1", pool="p1"))
    await d.both(d.allocate("ok", "r-2", pool="p1", duration_seconds=60))  # d4
    await d.both(d.allocate("ok", "r-nopool", pool="nowhere"),
                 d.allocate("ok", "r-nomodel", model="tiny"))
    # two admitted while the CPU total allowed one more device: the second is refused at
    # select, against the device the first took (d5)
    await d.both(d.allocate("race", "r-race-1", pool="p5"), d.allocate("race", "r-race-2"))
    # total storage used up (d2, 64 GB) then the quota lowered: refused at quota
    await d.both(d.allocate("sto", "r-sto-1", pool="p1"))
    await set_quotas(redis, keys, clock, [QuotaSpec(user_id="sto", total_storage_gb=1)])
    await d.both(d.allocate("sto", "r-sto-2"))
    # select's own refusals: an allocate quota never admitted; an undecodable entry
    await d.admitted_directly({"d": d.allocate("ok", "r-unadmitted"), "c": b"0 0 0"})
    await d.admitted_directly({"d": b"[]", "c": b""})
    await d.through_select()

    # releases: by allocation, by device, again, and each way to fail
    epoch = await state_epoch(redis, keys) or ""

    def made(user: str, rid: str) -> str:  # the id select gave, at the unmoved clock
        return allocation_id(epoch, user, rid, now)

    first = made("ok", "r-1")
    await d.both(
        d.release("x-1", allocation_id=first, user_id="ok"),
        d.release("x-1b", allocation_id=first),
        d.release("x-owner", allocation_id=made("race", "r-race-1"), user_id="other"),
        d.release("x-unknown", allocation_id="no-such-allocation"),
        d.release("x-nodev", device_id="no-such-device"),
        d.release("x-idle", device_id="idle"),
        d.release("x-elsewhere", allocation_id=made("race", "r-race-1"),
                  device_id="d1"),
        d.release("x-by-device", device_id="d3"),
    )
    await d.both(d.release("x-1", allocation_id=first, user_id="ok"))  # answered before

    # renewals: extended (and the same request again: its first answer), then each
    # refusal at select (unknown, another user's, ended, past the quota's expiry, past the
    # longest length) and at quota (suspended, no extension given)
    stored = made("sto", "r-sto-1")
    await d.both(d.renew("n-1", stored, "sto", extend_minutes=10))
    await d.both(d.renew("n-1", stored, "sto", extend_minutes=10))
    await d.both(
        d.renew("n-unknown", "no-such-allocation", "ok", extend_minutes=1),
        d.renew("n-owner", stored, "ok", extend_minutes=1),
        d.renew("n-ended", first, "ok", extend_minutes=1),
        d.renew("n-quota", made("race", "r-race-1"), "race", extend_minutes=2 * 1440),
        d.renew("n-long", stored, "sto", extend_seconds=31_536_000),
        d.renew("n-susp", stored, "susp", extend_minutes=1),
        d.renew("n-none", stored, "sto"),
    )

    # expiry: r-2 lasts 60 s; released after it expired, it says so
    clock.advance(61_000)
    assert await expire_due(ctx) == 1
    await d.both(d.release("x-2", allocation_id=made("ok", "r-2")))

    await every_event_path(d)
    await every_batch_path(d)
    await every_queue_path(d)
    await every_reservation_path(d)
    return d.run


async def every_reservation_path(d: Driver) -> None:
    """Reservations: booked by device and by specs (and the same request again), each
    refusal at quota and at select, cancel (booked, active, and its failures), claim
    (before the start, after it, again), a renewal into a booking refused and one that
    claims, then the jobs: activation (one device still held past its expires-at, closed
    first; one down: device_unavailable; one missed; one of a user blocked since), a
    no-show, and the completion of an expired one."""
    redis, keys, clock, ctx = d.redis, d.keys, d.clock, d.ctx
    await add_devices(redis, keys, clock, [DeviceSpec(id=f"rv-{i}", pool="pr") for i in range(5)])
    await set_quotas(redis, keys, clock, [
        QuotaSpec(user_id="rv"), QuotaSpec(user_id="rv-2"),
        QuotaSpec(user_id="rv-brief", expires_at_ms=clock.now_ms() + 3_600_000),
        QuotaSpec(user_id="rv-small", max_cpu_per_device=1),
        QuotaSpec(user_id="rv-susp", status="suspended")])
    now, minute = clock.now_ms(), 60_000

    async def reservation_of(user: str, rid: str) -> str:
        # read leniently: what the scripts emitted is decoded strictly at the end
        raw = await redis.get(keys.user(user).replace(":user", f":req:{rid}"))
        assert raw is not None, rid
        found = orjson.loads(raw)["reservation_id"]
        assert isinstance(found, str)
        return found

    # a plain allocation on rv-0 for 2 minutes (past its expires-at, unexpired, at start)
    await d.both(d.allocate("rv", "rv-plain", pool="pr", duration_seconds=120))
    await d.both(
        d.reserve("rv-a", "rv", now + 2 * minute, now + 10 * minute, device_id="rv-0"),
        d.reserve("rv-b", "rv", now + 5 * minute, now + 10 * minute, pool="pr"),  # rv-1
        d.reserve("rv-c", "rv", now + 20 * minute, now + 30 * minute, device_id="rv-2"),
        d.reserve("rv-d", "rv-2", now + 5 * minute, now + 10 * minute, device_id="rv-3"),
        d.reserve("rv-e", "rv", now + 5 * minute, now + 6 * minute, device_id="rv-4"),
        d.reserve("rv-f", "rv", now + minute, now + 2 * minute, device_id="rv-4"),
        d.reserve("rv-g", "rv", now + 5 * minute, now + 15 * minute, device_id="rv-2"),
    )
    await d.both(d.reserve("rv-a", "rv", now + 2 * minute, now + 10 * minute, device_id="rv-0"))
    await d.both(
        d.reserve("rv-x-overlap", "rv", now + 3 * minute, now + 4 * minute, device_id="rv-0"),
        d.reserve("rv-x-past", "rv", now - minute, now + minute),
        d.reserve("rv-x-dev", "rv", now + minute, now + 2 * minute, device_id="nowhere"),
        d.reserve("rv-x-quota", "rv-brief", now + minute, now + 2 * 3_600_000),
        d.reserve("rv-x-none", "rv", now + minute, now + 2 * minute, model="none"),
        d.reserve("rv-x-cap", "rv-small", now + minute, now + 2 * minute, device_id="rv-1"),
        d.reserve("rv-x-order", "rv", now + 2 * minute, now + minute),
        d.reserve("rv-x-susp", "rv-susp", now + minute, now + 2 * minute),
    )
    rsv = {rid: await reservation_of("rv", rid)
           for rid in ("rv-a", "rv-b", "rv-c", "rv-e", "rv-f", "rv-g")}
    # blocked between quota and select; then rv-d's user is overdue at its start
    await d.through_quota(d.reserve("rv-x-blocked", "rv-2", now + minute, now + 2 * minute))
    await set_quotas(redis, keys, clock, [QuotaSpec(user_id="rv-2", status="overdue")])
    await d.through_select()
    await d.both(d.cancel_reservation("rv-k1", rsv["rv-c"], "rv"),
                 d.cancel_reservation("rv-k2", "no-such", "rv"),
                 d.cancel_reservation("rv-k3", rsv["rv-b"], "rv-2"),
                 d.claim("rv-m1", rsv["rv-b"], "rv"))
    await d.both(d.cancel_reservation("rv-k4", rsv["rv-c"], "rv"))  # ended: not_active
    clock.advance(minute)  # rv-f starts
    await activate_reservations(ctx)
    active_f = text(await redis.hget(keys.reservation(rsv["rv-f"]), "allocation_id"))
    # renewing rv-f's allocation into rv-e's booking is refused; a short one claims it
    await d.both(d.renew("rv-n1", active_f, "rv", extend_minutes=10),
                 d.renew("rv-n2", active_f, "rv", extend_seconds=30))
    clock.advance(minute)  # rv-a starts: rv-plain, past its expires-at, is closed first
    await activate_reservations(ctx)
    await d.both(d.claim("rv-m2", rsv["rv-a"], "rv"), d.claim("rv-m2", rsv["rv-a"], "rv"))
    await d.through_events({"type": "device.maintenance", "device_id": "rv-2"})
    # rv-b and rv-e start (rv-f's allocation past its end is closed first); rv-d's user is
    # overdue; rv-g's device is down
    clock.advance(3 * minute)
    await activate_reservations(ctx)
    await d.both(d.cancel_reservation("rv-k5", rsv["rv-b"], "rv"))  # active: released
    clock.advance(ctx.settings.reservation_grace_s * 1000)  # rv-e never claimed: no_show
    await cancel_no_shows(ctx)
    clock.advance(10 * minute)
    await expire_due(ctx)
    await complete_reservations(ctx)  # rv-a (expired at its end) and rv-f: completed
    # one the timers first see after its end
    await d.both(d.reserve("rv-missed", "rv", clock.now_ms() + minute,
                           clock.now_ms() + 2 * minute, device_id="rv-1"))
    clock.advance(3 * minute)
    await activate_reservations(ctx)



async def every_queue_path(d: Driver) -> None:
    """The wait queue: queued (and told again), served by a release (select), by an
    expiry (expire), by a device coming back (events) and by an admin add (admin);
    timed out by expire; cancelled (and a cancel of nothing); over the per-user cap."""
    redis, keys, clock, ctx = d.redis, d.keys, d.clock, d.ctx
    await add_devices(redis, keys, clock, [DeviceSpec(id="q-1", pool="pq"),
                                           DeviceSpec(id="q-2", pool="pq")])
    await set_quotas(redis, keys, clock, [QuotaSpec(user_id="qa"), QuotaSpec(user_id="qb")])
    await d.both(d.allocate("qa", "q-held", pool="pq", duration_seconds=30),
                 d.allocate("qa", "q-held-2", pool="pq", duration_seconds=3600))
    await d.both(d.allocate("qb", "q-w1", pool="pq", wait_seconds=600, priority=2),
                 d.allocate("qb", "q-w2", pool="pq", wait_seconds=600))
    await d.both(d.allocate("qb", "q-w1", pool="pq", wait_seconds=600, priority=2))  # again
    held = orjson.loads(await redis.get(keys.user("qa").replace(":user", ":req:q-held-2")))
    await d.both(d.release("q-rel", allocation_id=held["allocation_id"]))  # -> q-w1
    clock.advance(31_000)
    await expire_due(ctx)  # q-held expires -> q-w2
    # a device event brings one back; an admin add; each to a waiter
    await d.both(d.allocate("qb", "q-w3", pool="pq", wait_seconds=600),
                 d.allocate("qb", "q-w4", pool="pq", wait_seconds=600))
    await d.through_events({"type": "device.created", "device_id": "q-3", "pool": "pq"})
    await add_devices(redis, keys, clock, [DeviceSpec(id="q-4", pool="pq")])
    # time out, cancel, cancel of nothing, the per-user cap (0 here)
    await d.both(d.allocate("qb", "q-late", pool="pq", wait_seconds=1),
                 d.allocate("qb", "q-cancel", pool="pq", wait_seconds=600))
    await d.both(d.cancel("q-c", "q-cancel", "qb"), d.cancel("q-c-none", "q-none", "qb"))
    clock.advance(2_000)
    await expire_due(ctx)
    capped = SelectStage(replace(ctx, settings=replace(ctx.settings, queue_max_per_user=0)))
    await d.through_quota(d.allocate("qb", "q-full", pool="pq", wait_seconds=60))
    await capped.handle(await d._read(keys.admitted, GROUP_SELECT))


async def every_batch_path(d: Driver) -> None:
    """Batches: all or nothing that fits and that does not, best effort, one refused at
    admission, one answered again, and a release batch with every kind of result."""
    redis, keys, clock = d.redis, d.keys, d.clock
    await add_devices(redis, keys, clock, [DeviceSpec(id=f"bt-{i}", pool="pb") for i in range(3)])
    await set_quotas(redis, keys, clock, [QuotaSpec(user_id="batch"),
                                          QuotaSpec(user_id="batch-1", max_devices=1)])
    await d.both(d.allocate("batch", "b-all", pool="pb", count=2),
                 d.allocate("batch", "b-none", pool="pb", count=5),
                 d.allocate("batch", "b-some", pool="pb", count=3, mode="best_effort"),
                 d.allocate("batch-1", "b-over", pool="pb", count=2))
    await d.both(d.allocate("batch", "b-all", pool="pb", count=2))  # answered before
    epoch = await state_epoch(redis, keys) or ""

    def made(user: str, rid: str, i: int) -> str:  # device i of a batch, at the unmoved clock
        return allocation_id(epoch, user, f"{rid}#{i}", clock.now_ms())

    await d.both(d.release("b-rel", user_id="batch", allocation_ids=[
        made("batch", "b-all", 1), made("batch", "b-all", 2), "no-such-allocation"]))
    await d.both(d.release("b-rel-2", user_id="other", allocation_ids=[
        made("batch", "b-all", 1), made("batch", "b-some", 1)]))


async def every_event_path(d: Driver) -> None:
    """Each of the 15 events, each releasing for its reason where it can, and the events
    that change nothing (stale, duplicate, unknown entity) or do not decode."""
    redis, keys, clock = d.redis, d.keys, d.clock
    device_events = ("failed", "deleted", "stopped", "error", "maintenance")
    await add_devices(redis, keys, clock, [DeviceSpec(id=f"ev-{n}", pool=f"pe-{n}")
                                           for n in device_events])
    await add_devices(redis, keys, clock, [DeviceSpec(id=f"eu-{i}", pool="pu") for i in range(8)])
    users = ("del", "sus", "quota", "exc", "pay", "over", "blocked")
    await set_quotas(redis, keys, clock, [QuotaSpec(user_id="evd")] + [
        QuotaSpec(user_id=f"u-{u}") for u in users])
    # the maintenance one asked for a replacement but its pool has no other device: ended
    await d.both(*(d.allocate("evd", f"e-{n}", pool=f"pe-{n}",
                              replace_on_failure=n == "maintenance") for n in device_events))
    # replacement instead of loss: two equal devices in one pool, the allocation's moves
    await add_devices(redis, keys, clock, [DeviceSpec(id=f"rp-{n}", pool="prp", adb_port=port)
                                           for n, port in (("a", 5601), ("b", 5602))])
    moving = d.allocate("evd", "e-replace", pool="prp", replace_on_failure=True)
    await d.both(moving)
    # read leniently: what the scripts emitted is decoded strictly at the end, not here
    moved = orjson.loads(await redis.get(keys.user("evd").replace(":user", ":req:e-replace")))
    on = text(await redis.hget(keys.allocation(moved["allocation_id"]), "device_id"))
    await d.both(*(d.allocate(f"u-{u}", f"e-{u}-{i}", pool="pu")
                   for u, n in (("del", 1), ("sus", 1), ("quota", 2), ("exc", 2), ("pay", 1),
                                ("over", 1)) for i in range(n)))
    await d.through_events(
        {"type": "device.failed", "device_id": "ev-failed", "version": 1, "reason": "crash"},
        {"type": "device.deleted", "device_id": "ev-deleted"},
        {"type": "device.status_changed", "device_id": "ev-stopped", "status": "stopped"},
        {"type": "device.status_changed", "device_id": "ev-error", "status": "error"},
        {"type": "device.maintenance", "device_id": "ev-maintenance", "info": "screen",
         "expected_end_ms": clock.now_ms() + 3_600_000},
        {"type": "device.status_changed", "device_id": "ev-failed", "status": "running",
         "version": 2},
        {"type": "device.failed", "device_id": "ev-failed", "version": 1},  # stale
        {"type": "device.failed", "device_id": "no-such-device"},  # ignored
        {"type": "device.created", "device_id": "ev-new", "name": "new", "pool": "pe-new"},
        {"type": "device.failed", "device_id": on, "reason": "moved"},
        {"type": "user.deleted", "user_id": "u-del"},
        {"type": "user.suspended", "user_id": "u-sus", "reason": "terms"},
        {"type": "user.activated", "user_id": "u-sus"},
        {"type": "user.quota_updated", "user_id": "u-quota", "max_devices": 1},
        {"type": "user.quota_updated", "user_id": "u-new", "expires_at_ms": clock.now_ms() + 1},
        {"type": "billing.balance_low", "user_id": "u-pay", "balance": 1.5},
        *({"type": "billing.payment_failed", "user_id": "u-pay", "amount": 9.5}
          for _ in range(3)),
        {"type": "billing.payment_success", "user_id": "u-pay", "amount": 9.5, "balance": 1.0},
        {"type": "billing.overdue", "user_id": "u-over", "amount": 12.25, "days": 3},
        {"type": "billing.recharged", "user_id": "u-over", "amount": 20.0},
        # the service's standing: overdue again (no older than the recharge), then an
        # answer observed before it all (stale)
        {"type": "billing.standing", "user_id": "u-over", "status": "overdue",
         "balance": -3.0, "observed_at_ms": clock.now_ms()},
        {"type": "billing.standing", "user_id": "u-over", "status": "ok", "observed_at_ms": 0},
        {"type": "user.suspended", "user_id": "nobody-known"},  # ignored
        b'{"type": "user.suspended"}',  # invalid: dead
    )
    await set_quotas(redis, keys, clock, [QuotaSpec(user_id="u-exc", max_devices=1)])
    dup = {"type": "user.quota_exceeded", "user_id": "u-exc", "event_id": "exc-once"}
    await d.through_events(dup, dup)
    # the moved allocation's request again: its stored answer names the new device
    await d.both(moving)
    # blocked between quota and select: admitted, then suspended, then refused at select
    await d.through_quota(d.allocate("u-blocked", "r-blocked"))
    await d.through_events({"type": "user.suspended", "user_id": "u-blocked"})
    await d.through_select()


# --- reading everything back, strictly -----------------------------------------------


async def entries(redis: Redis, stream: str) -> list[tuple[str, dict[bytes, bytes]]]:
    return [(text(eid), dict(fields)) for eid, fields in await redis.xrange(stream)]


def kind_of(message: object) -> str:
    if isinstance(message, Failed):
        return f"reply failed {message.reason}"
    if isinstance(message, Released):
        return f"reply released {message.status}" + (" again" if message.already_released else "")
    if isinstance(message, Allocated):
        return "reply allocated"
    if isinstance(message, Renewed):
        return "reply renewed"
    if isinstance(message, AllocationRenewed):
        return "change allocation_renewed"
    if isinstance(message, AllocationReplaced):
        return f"change allocation_replaced {message.replace_reason}"
    if isinstance(message, AllocatedBatch):
        return "reply allocated_batch " + ("some" if message.success_count else "none")
    if isinstance(message, ReleasedBatch):
        return "reply released_batch"
    if isinstance(message, Queued):
        return "reply queued"
    if isinstance(message, Cancelled):
        return "reply cancelled"
    if isinstance(message, Reserved):
        return "reply reserved"
    if isinstance(message, ReservationCancelled):
        return f"reply reservation_cancelled {message.previous_status}"
    if isinstance(message, Claimed):
        return "reply claimed"
    if isinstance(message, ReservationChange):
        why = f" {message.reason}" if message.reason not in (None, message.status) else ""
        claimed = " claimed" if message.status == "active" and message.claimed_at_ms else ""
        return f"change reservation {message.status}{claimed}{why}"
    if isinstance(message, AllocationChange):
        why = f" {message.reason}" if message.reason not in (None, message.status) else ""
        return f"change allocation {message.status}{why}"
    if isinstance(message, RequestRejected):
        return f"change rejected {message.reason}"
    if isinstance(message, DeviceEventApplied):
        return f"change device_event {message.event}"
    if isinstance(message, UserEventApplied):
        return f"change user_event {message.event}"
    if isinstance(message, DeviceUpserted):
        return "change device"
    if isinstance(message, QuotaSet):
        return "change quota" + (" expiring" if message.expires_at_ms is not None else "")
    if isinstance(message, WaiterChange):
        return f"change waiter {message.status}" + (f" {message.reason}" if message.reason
                                                     else "")
    raise AssertionError(message)


async def decode_everything(redis: Redis, run: Run) -> list[str]:
    """Every entry the scripts added, decoded strictly; yields the kind of each."""
    keys = run.keys
    seen: list[str] = []
    for _id, fields in await entries(redis, keys.reply(CLIENT)):
        assert list(fields) == [b"d"]
        seen.append(kind_of(reply_decoder.decode(fields[b"d"])))
    for entry_id, fields in await entries(redis, keys.admitted):
        if entry_id not in run.own_admitted:
            admitted = decode_admitted(fields)
            seen.append(f"admitted {admitted.d.__class__.__name__} hold={bool(admitted.c)}")
    for _id, fields in await entries(redis, keys.changes):
        assert list(fields) == [b"d"]
        seen.append(kind_of(change_decoder.decode(fields[b"d"])))
    for _id, fields in await entries(redis, keys.dead):
        assert list(fields) == [b"d"]
        seen.append(f"dead from {dead_decoder.decode(fields[b'd']).stage}")
    return seen


EXPECTED = {
    "reply allocated",
    "reply allocated_batch some",
    "reply allocated_batch none",
    "reply released_batch",
    "reply renewed",
    "admitted RenewRequest hold=False",
    "change allocation_renewed",
    *(f"reply failed {reason}" for reason in (
        "not_active", "exceeds_quota_expiry", "exceeds_max_duration")),
    *(f"change rejected {reason}" for reason in (
        "not_found", "not_owner", "not_active", "exceeds_quota_expiry", "exceeds_max_duration")),
    "reply released released",
    "reply released released again",
    "reply released expired again",
    *(f"reply failed {reason}" for reason in (
        "quota_exceeded", "user_suspended", "billing_overdue", "invalid_request",
        "no_available_devices", "not_found", "not_owner", "rate_limited", "timed_out",
        "cancelled", "queue_full")),
    "reply queued",
    "reply cancelled",
    "admitted CancelRequest hold=False",
    "admitted AllocateRequest hold=True",
    "admitted ReleaseRequest hold=False",
    "change allocation allocated",
    "change allocation_replaced device_failed",
    "change allocation released",
    "change allocation expired",
    *(f"change rejected {reason}" for reason in (
        "quota_exceeded", "user_suspended", "billing_overdue", "invalid_request",
        "no_available_devices", "rate_limited", "timed_out", "cancelled", "queue_full")),
    "change waiter waiting",
    *(f"change waiter left {reason}" for reason in ("allocated", "timed_out", "cancelled")),
    "change device",
    "change quota",
    "change quota expiring",
    "dead from quota",
    "dead from select",
    "dead from events",
    *(f"change allocation released {reason}" for reason in (
        "device_failed", "device_deleted", "device_stopped", "device_error",
        "device_maintenance", "user_deleted", "user_suspended", "quota_reduced",
        "quota_exceeded", "payment_failed", "billing_overdue")),
    *(f"change device_event device.{kind}" for kind in (
        "failed", "deleted", "status_changed", "maintenance", "created")),
    *(f"change user_event {kind}" for kind in (
        "user.deleted", "user.suspended", "user.activated", "user.quota_updated",
        "user.quota_exceeded", "billing.payment_failed", "billing.balance_low",
        "billing.overdue", "billing.payment_success", "billing.recharged",
        "billing.standing")),
    # reservations
    "reply reserved",
    "reply reservation_cancelled booked",
    "reply reservation_cancelled active",
    "reply claimed",
    "admitted ReserveRequest hold=False",
    "admitted CancelReservationRequest hold=False",
    "admitted ClaimReservationRequest hold=False",
    *(f"reply failed {reason}" for reason in ("overlaps", "invalid_interval", "reserved")),
    *(f"change rejected {reason}" for reason in ("overlaps", "invalid_interval", "reserved")),
    "change reservation booked",
    "change reservation active",
    "change reservation active claimed",
    "change reservation completed",
    "change reservation no_show",
    "change reservation cancelled",
    *(f"change reservation cancelled {reason}" for reason in (
        "device_unavailable", "billing_overdue", "missed")),
    "change allocation released no_show",
}
"""Every kind of entry the scripts emit: each must appear in one run of every path."""


async def test_every_message_every_script_emits_decodes_strictly(
    redis: Redis, ctx: StageContext, clock: ManualClock
) -> None:
    run = await every_path(redis, ctx, clock)
    seen = await decode_everything(redis, run)
    assert set(seen) == EXPECTED
    # every quota refusal has its own message; spot-check that each reason path ran
    messages = [reply_decoder.decode(f[b"d"]) for _i, f in await entries(
        redis, ctx.keys.reply(CLIENT))]
    texts = {m.message for m in messages if isinstance(m, Failed)}
    for expected in ("No quota configured", "is suspended", "Billing overdue", "Quota is expired",
                     "Quota expired", "Device quota exceeded", "CPU per device",
                     "Memory per device", "Total CPU quota", "Total memory quota",
                     "Total storage quota", "Resource quota exceeded", "not admitted by quota",
                     "belongs to another user", "has no allocation", "is not on device",
                     "No available device", "Rate limit of user other",
                     "Rate limit of tenant acme", "Requested: 2"):
        assert any(expected in t for t in texts), expected
    (direct_bad,) = [m for m in messages if m.request_id == "r-direct-bad"]
    assert isinstance(direct_bad, Failed) and direct_bad.reason == "invalid_request"
    assert "release needs allocation_id" in direct_bad.message
    # suspended between quota and select: refused by select, its hold given back
    (blocked,) = [m for m in messages if m.request_id == "r-blocked"]
    assert isinstance(blocked, Failed) and blocked.reason == "user_suspended"
    assert (await redis.hgetall(ctx.keys.user("u-blocked")))[b"used_devices"] == b"0"
    # the queue: each waiter told it waits, then served by select (a release), expire (an
    # expiry), events (a device back) and admin (a device added), in that order
    by_request: dict[str, list[str]] = {}
    for m in messages:
        by_request.setdefault(m.request_id, []).append(kind_of(m))
    assert by_request["q-w1"] == ["reply queued", "reply queued", "reply allocated"]
    for rid in ("q-w2", "q-w3", "q-w4"):
        assert by_request[rid] == ["reply queued", "reply allocated"], rid
    served = {m.request_id: m.device.id for m in messages if isinstance(m, Allocated)}
    assert (served["q-w3"], served["q-w4"]) == ("q-3", "q-4")
    assert by_request["q-late"] == ["reply queued", "reply failed timed_out"]
    assert by_request["q-cancel"] == ["reply queued", "reply failed cancelled"]
    assert by_request["q-full"] == ["reply failed queue_full"]
    # the moved allocation's request repeated: answered with the device it moved to
    first_answer, again = [m for m in messages if m.request_id == "e-replace"]
    assert isinstance(first_answer, Allocated) and isinstance(again, Allocated)
    assert {first_answer.device.id, again.device.id} == {"rp-a", "rp-b"}
    assert again.adb_port == {"rp-a": 5601, "rp-b": 5602}[again.device.id]
    assert (again.allocation_id, again.expires_at_ms) == (first_answer.allocation_id,
                                                          first_answer.expires_at_ms)


# --- the contract test bites ------------------------------------------------------------

SCRIPT_SLOTS = {"quota": (stages.quota, "QUOTA"), "select": (stages.select, "SELECT"),
                "expire": (stages.jobs, "EXPIRE"), "admin": (stages.tools.admin, "ADMIN"),
                "events": (stages.events, "EVENTS"),
                "reservations": (stages.reservations, "RESERVATIONS")}
"""Where each stage finds its script (module, name), to load a renamed copy there."""

RENAMES = [
    # (script, text in its source, replacement, what strict decoding names)
    (SELECT, "previous_expires_at_ms = previous,", "previous_expires = previous,",
     "previous_expires"),
    (SELECT, "rec.extended_seconds = row.extend_seconds", "rec.extended = row.extend_seconds",
     "extended"),
    (SELECT, "device_id = device_id, expires_at_ms = expires,",
     "device = device_id, expires_at_ms = expires,", "device"),
    (QUOTA, "remaining_devices = remaining", "remaining = remaining", "remaining"),
    (QUOTA, "user_id = opt(uid), tenant_id", "user_id = opt(uid), tenant", "tenant"),
    (QUOTA, "'d', row.payload, 'c', ''", "'d', row.payload, 'hold', ''", "hold"),
    (QUOTA, "retry_after_ms = retry_after", "retry_after = retry_after", "retry_after"),
    (SELECT, "adb_port = tonumber(d[5])", "port = tonumber(d[5])", "port"),
    (SELECT, "device = {id = dev, name = d[3]", "device = {id = dev, label = d[3]", "label"),
    (SELECT, "already_released = already", "already = already", "already"),
    (SELECT, "duration_minutes = minutes", "minutes = minutes", "minutes"),
    (EXPIRE, "released_at_ms = released_at, duration_minutes",
     "ended_at_ms = released_at, duration_minutes", "ended_at_ms"),
    (ADMIN, "storage_mb = dev.storage_mb", "storage = dev.storage_mb", "storage"),
    (ADMIN, "expires_at_ms = q.expires_at_ms or", "expires = q.expires_at_ms or", "expires"),
    (EVENTS, "previous_status = opt(previous), reason", "previous = opt(previous), reason",
     "previous"),
    (EVENTS, "expected_end_ms = opt(row.expected_end_ms)", "end_ms = opt(row.expected_end_ms)",
     "end_ms"),
    (EVENTS, "released_allocations = released", "released = released", "released"),
    (EVENTS, "failure_threshold = failures and", "threshold = failures and", "threshold"),
    (SELECT, "reason = reason}", "end_reason = reason}", "end_reason"),
    (SELECT, "rec.replace_on_failure = true end", "rec.replace = true end", "replace"),
    (EVENTS, "rec.previous_device_id, rec.device_name = old_id, d[3]",
     "rec.previous_device, rec.device_name = old_id, d[3]", "previous_device"),
    (EVENTS, "rec.adb_host, rec.adb_port = d[4], tonumber(d[5])",
     "rec.host, rec.adb_port = d[4], tonumber(d[5])", "host"),
    (EVENTS, "rec.replace_reason, rec.event", "rec.because, rec.event", "because"),
    (EVENTS, "replacement_device_id = rec and rec.kind", "replaced_by = rec and rec.kind",
     "replaced_by"),
    (EVENTS, "answer.adb_host, answer.adb_port = d[4]", "answer.host, answer.adb_port = d[4]",
     "host"),
    (SELECT, """'","success_count":' .. #allocations""", """'","successes":' .. #allocations""",
     "successes"),
    (SELECT, """#releases .. ',"failed_count":'""", """#releases .. ',"fails":'""", "fails"),
    (SELECT, "position = position", "place = position", "place"),
    (SELECT, "wait_until_ms = wait_until, priority", "until_ms = wait_until, priority",
     "until_ms"),
    (SELECT, "cancel_request_id = row.cancel_request_id}", "cancelled = row.cancel_request_id}",
     "cancelled"),
    (EXPIRE, "allocated_at_ms = now, expires_at_ms = expires, adb_host",
     "allocated_at_ms = now, expires_ms = expires, adb_host", "expires_ms"),
    (SELECT, "device_name = name, pool = r.pool", "name = name, pool = r.pool", "name"),
    (SELECT, "previous_status = was,", "was = was,", "was"),
    (SELECT, "adb_port = tonumber(d[3])}", "port = tonumber(d[3])}", "port"),
    (SELECT, "claim_by_ms = opt(r.claim_by_ms)", "claim_by = opt(r.claim_by_ms)", "claim_by"),
    (RESERVATIONS, "rec.device_name, rec.adb_host, rec.adb_port = d[7]",
     "rec.device, rec.adb_host, rec.adb_port = d[7]", "device"),
    (RESERVATIONS, "start_ms = r.start_ms, end_ms = r.end_ms, status = r.status,",
     "start = r.start_ms, end_ms = r.end_ms, status = r.status,", "start"),
]


@pytest.mark.parametrize(("script", "old", "new", "named"), RENAMES,
                         ids=[f"{s.name}:{n}" for s, _o, _n, n in RENAMES])
async def test_a_key_renamed_in_one_script_fails_strict_decoding(
    redis: Redis, ctx: StageContext, clock: ManualClock, monkeypatch: pytest.MonkeyPatch,
    script: Script[Any, Any], old: str, new: str, named: str,
) -> None:
    assert script.body.count(old) == 1, f"{old!r} must name one place in {script.name}"
    renamed = Script(script.name, script.keys, script.call, script.body.replace(old, new))
    assert renamed.sha != script.sha
    module, attribute = SCRIPT_SLOTS[script.name]
    monkeypatch.setattr(module, attribute, renamed)
    run = await every_path(redis, ctx, clock)
    with pytest.raises(msgspec.ValidationError, match=re.escape(f"`{named}`")):
        await decode_everything(redis, run)


async def test_replies_held_for_replicas_decode_strictly_and_are_every_reply(
    redis: Redis, ctx: StageContext, clock: ManualClock
) -> None:
    """With DEVSCHED_REPLICAS_TO_ACK (here no replica answers, so nothing is released),
    select writes its replies to the held stream instead: each held entry is exactly
    ``s`` (its reply stream), ``d`` (the reply, decoded strictly) and ``t`` (the TTL), and
    the held replies plus those other scripts sent directly are every kind of reply."""
    held_ctx = replace(ctx, settings=replace(ctx.settings, replicas_to_ack=1,
                                             replicas_timeout_ms=1))
    run = await every_path(redis, held_ctx, clock)
    seen = await decode_everything(redis, run)
    held = await entries(redis, ctx.keys.replies_held)
    assert held
    for _id, fields in held:
        assert sorted(fields) == [b"d", b"s", b"t"]
        assert fields[b"s"] == ctx.keys.reply(CLIENT).encode()
        assert int(fields[b"t"]) == ctx.settings.reply_ttl_s
        seen.append(kind_of(reply_decoder.decode(fields[b"d"])))
    assert set(seen) == EXPECTED
    direct = {kind_of(reply_decoder.decode(f[b"d"]))
              for _i, f in await entries(redis, ctx.keys.reply(CLIENT))}
    assert "reply released released" not in direct  # select's own: held, not sent


# --- schedules.lua ----------------------------------------------------------------------


async def every_schedules_path(ctx: StageContext, clock: ManualClock) -> Any:
    """Drive schedules.lua through every path that emits something: tenants created, plan
    changed, unchanged, deleted (and not found, unknown plan), from events (applied,
    duplicate, stale, a newer version of an unchanged tenant), overrides set, cleared and
    run out, a schedule paused and resumed, a batch run whose tenants failed (the retry
    queue) and a tenant retried until permanently failed; then the dump (decoded
    strictly by ``dump`` itself) with every list filled. Returns the dump's raw JSON."""
    import stages.schedules as sched
    from schemas.rows import BatchClaim, BatchFinish, RetryClaim, RetryFinish, TenantFailure

    r, s = ctx.redis, ctx.settings
    now = clock.now_ms()

    def op(tenant: str, plan: str | None = None, **event: Any) -> TenantOp:
        return TenantOp(action="delete" if plan is None else "set", tenant_id=tenant,
                        plan=plan, **event)

    statuses = await sched.apply_tenants(r, s, now, [
        op("ta", "basic"), op("tb", "premium"), op("tc", "enterprise"), op("ta", "standard"),
        op("ta", "standard"), op("tc"), op("nobody"), op("tx", "no-such-plan"),
        op("te", "basic", event_id="e1", version=2), op("te", "basic", event_id="e1", version=2),
        op("te", "premium", event_id="e2", version=1),
        op("te", "basic", event_id="e3", version=5)])
    assert [st for _t, st in statuses] == [
        "created", "created", "created", "plan_changed", "unchanged", "deleted", "not_found",
        "unknown_plan", "created", "duplicate", "stale", "unchanged"]
    assert await sched.set_override(r, s, now, "tb", 30 * 60_000, now + 3_600_000)
    assert await sched.set_override(r, s, now, "ta", 30 * 60_000, now + 7_200_000)
    assert await sched.set_override(r, s, now, "ta", None, None)
    for action in ("pause", "resume"):
        await sched.control(r, s, now, action, schedule="usage_report:24h")
    clock.advance(3_600_001)  # tb's override runs out at the next call
    now = clock.now_ms()
    assert await sched.set_override(r, s, now, "te", 3_600_000, now + 86_400_000)
    claimed = await sched.call(r, s, now, claim=BatchClaim(
        execution_prefix="x", limit=10, timeout_ms=60_000, schedule="usage_report:6h"))
    (ref, _sid, _kind, _iv, _end, eid, *_rest) = claimed[0]
    await sched.call(r, s, now, finish=BatchFinish(
        batch=text(ref), execution_id=text(eid), status="failed", period_end_ms=now,
        failed=[TenantFailure(tenant_id="ta", error="boom")]))
    await sched.call(r, s, now, finish=BatchFinish(
        batch=text(ref), execution_id=text(eid), status="failed", period_end_ms=now))  # lost
    item = "usage_report|ta"
    for _ in range(s.schedule_max_retries):
        await sched.call(r, s, now, retry_claim=RetryClaim(limit=1, lease_ms=1, token="t",
                                                           item=item))
        await sched.call(r, s, now, retry_finish=RetryFinish(item=item, token="t",
                                                             status="failed", error="again"))
    claimed = await sched.call(r, s, now, claim=BatchClaim(
        execution_prefix="y", limit=10, timeout_ms=60_000, schedule="usage_report:1h"))
    (ref, _sid, _kind, _iv, _end, eid, *_rest) = claimed[0]
    await sched.call(r, s, now, finish=BatchFinish(
        batch=text(ref), execution_id=text(eid), status="failed", period_end_ms=now,
        failed=[TenantFailure(tenant_id="te", error="waiting")]))
    state = await sched.dump(r, s, now)  # decoded strictly
    assert state["retry"] and state["failed"] and state["tenants"] and state["overrides"]
    return await sched.call(r, s, now, dump=True, members=True)


SCHEDULE_CHANGES = {
    *(f"change tenant {action} active" for action in (
        "created", "plan_changed", "event_version", "override_set", "override_cleared",
        "override_expired")),
    "change tenant deleted deleted",
    "change schedule paused",
    "change schedule resumed",
}
"""Every change schedules.lua emits: each must appear in one run of every path."""


def schedule_change_kind(change: object) -> str:
    from schemas.messages import ScheduleChange, TenantChange

    if isinstance(change, TenantChange):
        return f"change tenant {change.action} {change.status}"
    if isinstance(change, ScheduleChange):
        return "change schedule " + ("paused" if change.paused else "resumed")
    raise AssertionError(change)


async def test_every_change_and_dump_of_schedules_lua_decodes_strictly(
    redis: Redis, ctx: StageContext, clock: ManualClock
) -> None:
    from schemas.messages import TenantChange
    from schemas.schedules import ScheduleDump

    raw = await every_schedules_path(ctx, clock)
    state = msgspec.json.decode(raw, type=ScheduleDump)
    assert isinstance(state.tenants, list) and {t.id for t in state.tenants} == {"ta", "tb", "te"}
    assert isinstance(state.failed, list) and state.failed[0].error == "again"
    changes = [change_decoder.decode(f[b"d"]) for _i, f in await entries(redis,
                                                                          ctx.keys.changes)]
    assert {schedule_change_kind(c) for c in changes} == SCHEDULE_CHANGES
    versions = [c.version for c in changes]
    assert versions == sorted(set(versions))  # one counter, every change a new version
    [te] = [c for c in changes if isinstance(c, TenantChange) and c.action == "event_version"]
    assert (te.tenant_id, te.event_version, te.plan) == ("te", 5, "basic")
    [gone] = [c for c in changes if isinstance(c, TenantChange) and c.status == "deleted"]
    assert (gone.tenant_id, gone.plan) == ("tc", "enterprise")


SCHEDULES_RENAMES = [
    # (text in schedules.lua, replacement, the names strict decoding may report)
    ("c.override_ms, c.override_until_ms = tonumber(h[2])",
     "c.override_ms, c.until_ms = tonumber(h[2])", ("until_ms",)),
    ("if h[4] then c.created_at_ms = tonumber(h[4]) end",
     "if h[4] then c.created = tonumber(h[4]) end", ("created",)),
    ("schedule_id = c.schedule, paused", "schedule = c.schedule, paused",
     ("schedule", "schedule_id")),
    ("due_ms = tonumber(retry[i + 1])", "due_at = tonumber(retry[i + 1])", ("due_at", "due_ms")),
    ("state.tenant_count = redis.call", "state.tenants_n = redis.call",
     ("tenants_n", "tenant_count")),
    ("local b = {ref = ref, number = n,", "local b = {ref = ref, num = n,", ("num", "number")),
]


@pytest.mark.parametrize(("old", "new", "named"), SCHEDULES_RENAMES,
                         ids=[n[0] for _o, _n, n in SCHEDULES_RENAMES])
async def test_a_key_renamed_in_schedules_lua_fails_strict_decoding(
    redis: Redis, ctx: StageContext, clock: ManualClock, monkeypatch: pytest.MonkeyPatch,
    old: str, new: str, named: tuple[str, ...],
) -> None:
    import stages.schedules
    from stages.scripts import SCHEDULES

    assert SCHEDULES.body.count(old) == 1, f"{old!r} must name one place in schedules.lua"
    renamed = Script(SCHEDULES.name, SCHEDULES.keys, SCHEDULES.call,
                     SCHEDULES.body.replace(old, new))
    monkeypatch.setattr(stages.schedules, "SCHEDULES", renamed)
    pattern = "|".join(re.escape(f"`{n}`") for n in named)
    with pytest.raises(msgspec.ValidationError, match=pattern):
        await every_schedules_path(ctx, clock)
        for _i, f in await entries(redis, ctx.keys.changes):
            change_decoder.decode(f[b"d"])
