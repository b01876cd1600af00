"""Replay a trace through the real selection logic, one strategy at a time (``devsched
simulate``).

Each strategy gets a fresh state of its own in Redis (the prefix ``<prefix>-sim-<n>``,
deleted after) and a :class:`pipeline.clock.ManualClock` set to each record's time, so a
week replays in seconds. Nothing is re-implemented: a request is built into the quota
stage's script call by :class:`stages.quota.QuotaStage` (the entry it would read), what
quota.lua admits is read back from the admitted stream and decided by
:class:`stages.select.SelectStage` (select.lua, the strategy in force), a release goes the
same way, device failures and recoveries through :class:`stages.events.EventsStage`
(events.lua), and expiry (with the wait queue's time-outs) through
:func:`stages.jobs.expire_due` at every tick of simulated time (DEVSCHED_TICK_MS). The
outcome is read from the changes stream the scripts write (allocations, ends, refusals,
the wait queue), as persist would. For ``smart`` the model is recomputed every 10 simulated
minutes from the replay's own closed allocations (:func:`stages.smart.build_model`, as the
``refresh_model`` job does from PostgreSQL).

Semantics (docs/trace-format.md): a request served late (it waited) keeps its device as
long as the trace's release says, from when it was served; every user of the trace
gets a quota large enough never to refuse (the replay compares placement, not quotas).
A reservation record is a ``reserve`` request through quota and select at its booking
time; the reservations jobs (:mod:`stages.reservations`: activate_reservations,
cancel_no_shows, complete_reservations) run on every tick after expire, as the timers run
them, with a tick forced at each reservation's start, claim deadline and end; when the
reservation becomes active its user claims it at once (``claim_reservation``) if the
trace says ``showed_up`` (else it ends ``no_show`` after DEVSCHED_RESERVATION_GRACE_S),
releases its allocation at ``released_at_ms`` and cancels it at ``cancelled_at_ms``.

Figures per strategy (:class:`Result`): ``utilisation`` = device-seconds served / (devices x
the trace's length); ``refused`` (and ``refused_by_reason``) = trace requests that got a
failure; ``wait_p50_ms`` / ``wait_p99_ms`` = over the requests that waited in the queue,
from arrival to their final answer (nearest rank; 0 when none waited);
``fragmentation`` = requests refused ``no_available_devices`` while the free devices of
their pool and model had together at least the CPU and memory asked; ``spread`` = mean share
of hosts with an allocation; ``hosts_whole`` = mean share of hosts with every device free
and up; ``fairness`` = Jain's index over users of the share of the device-seconds each
asked for (its releases' lengths) that was served; ``interrupted`` = allocations a device
failure ended; ``unsupported`` = records not replayed (none of the kinds the format
has today); ``reservations`` = booked, refused (by reason), activated, claimed, no_show,
completed, cancelled, cancelled_at_start and ``refused_for_bookings``: plain requests
refused ``no_available_devices`` while a free device that fit them was kept for a booking
within their duration (those are not counted in ``fragmentation``). The claimed
reservations' device-seconds count in ``utilisation``. The means are over samples every
``SAMPLES``-th of the trace.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import text
from pipeline.worker import Entry
from schemas.events import DeviceFailed, DeviceStatusChanged
from schemas.keys import Keys
from schemas.messages import (
    AllocateRequest,
    AllocationChange,
    CancelReservationRequest,
    ClaimReservationRequest,
    DeviceSpec,
    QuotaSpec,
    ReleaseRequest,
    RequestRejected,
    ReservationChange,
    ReserveRequest,
    WaiterChange,
    change_decoder,
    encoder,
)
from schemas.trace import TraceDeviceEvent, TraceRelease, TraceRequest, TraceReservation
from stages.context import StageContext
from stages.events import EventsStage
from stages.jobs import expire_due
from stages.quota import QuotaStage
from stages.reservations import activate_reservations, cancel_no_shows, complete_reservations
from stages.select import SelectStage
from stages.settings import Settings
from stages.smart import HistoryRow, build_model, write_model
from stages.state import mark_state
from stages.tools.admin import add_devices, delete_keys, set_quotas, set_strategy
from stages.tools.trace import Trace, read_trace, summary

SAMPLES = 400
"""Samples of the live figures over a trace (the means and the PNG's curves)."""
MODEL_EVERY_MS = 600_000
"""The smart model is recomputed this often in simulated time (the job's interval)."""
BIG_QUOTA = QuotaSpec(user_id="x", max_devices=100_000, max_cpu_per_device=4096,
                      max_memory_mb_per_device=1 << 30, total_cpu_cores=1 << 30,
                      total_memory_gb=1 << 30, total_storage_gb=1 << 30)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)])


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n sum x^2), 1 when all are equal."""
    squares = sum(v * v for v in values)
    return (sum(values) ** 2) / (len(values) * squares) if squares else 1.0


def _fields(raw: Any) -> dict[bytes, bytes]:
    """A stream entry's fields as bytes (the client answers bytes)."""
    return {k if isinstance(k, bytes) else str(k).encode(): v if isinstance(v, bytes)
            else str(v).encode() for k, v in raw.items()}


@dataclass
class _Req:
    rec: TraceRequest
    hold_ms: int | None
    queued: bool = False
    served_ms: int | None = None
    allocation_id: str | None = None
    device_id: str | None = None
    end_ms: int | None = None
    end_reason: str | None = None
    refused: str | None = None
    answered_ms: int | None = None


@dataclass
class _Rsv:
    rec: TraceReservation
    reservation_id: str | None = None
    device_id: str | None = None
    status: str | None = None
    reason: str | None = None
    refused: str | None = None
    allocation_id: str | None = None
    served_ms: int | None = None
    end_ms: int | None = None
    activated: bool = False
    claimed: bool = False


RSV_PREFIX = "rsv."
"""The request ids of a trace reservation's requests: rsv.<reservation_id>[.claim|...]."""


@dataclass
class Result:
    strategy: str
    utilisation: float
    refused: int
    refused_by_reason: dict[str, int]
    requests: int
    served: int
    queued: int
    wait_p50_ms: float
    wait_p99_ms: float
    fragmentation: int
    spread: float
    hosts_whole: float
    fairness: float
    interrupted: int
    unsupported: int
    replay_s: float
    reservations: dict[str, Any] = field(default_factory=dict)
    """booked, refused, refused_by_reason, activated, claimed, no_show, completed,
    cancelled (by their users), cancelled_at_start (device_unavailable, missed, ...),
    refused_for_bookings (plain requests refused no_available_devices while a free device
    that fit them was kept for a booking), device_s (device-seconds the claimed ones
    held, in ``utilisation``)."""
    series: dict[str, list[float]] = field(default_factory=dict)
    """Per sample: t_h (hours from the start), busy (devices allocated), refused (so far)."""

    def figures(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("series")
        out.pop("strategy")
        return out


class Replay:
    """One strategy's replay of one trace on its own prefix."""

    def __init__(self, redis: Redis, settings: Settings, trace: Trace, strategy: str) -> None:
        self.trace = trace
        self.strategy = strategy
        self.settings = replace(settings, prefix=f"{settings.prefix}-sim-{uuid.uuid4().hex[:8]}",
                                replicas_to_ack=0, rate_user_per_s=0.0, rate_tenant_per_s=0.0,
                                billing_url="")
        self.keys = Keys(self.settings.prefix)
        self.clock = ManualClock(trace.header.start_ms)
        self.ctx = StageContext(redis=redis, settings=self.settings, clock=self.clock)
        self.redis = redis
        self.quota = QuotaStage(self.ctx)
        self.select = SelectStage(self.ctx)
        self.events = EventsStage(self.ctx)
        self.reply_to = self.keys.reply("simulate")
        self.devices = {d.id: d for d in trace.devices}
        self.hosts = sorted({d.host for d in trace.devices})
        self.pools = sorted({d.pool for d in trace.devices})
        self.reqs: dict[str, _Req] = {}
        self.rsvs: dict[str, _Rsv] = {}  # by the reserve request id
        self.rsv_by_alloc: dict[str, _Rsv] = {}
        self.bookings: dict[str, dict[str, tuple[int, int]]] = {}  # device -> rid -> interval
        self.refused_for_bookings = 0
        self.by_alloc: dict[str, _Req] = {}
        self.held: dict[str, str] = {}  # device -> allocation
        self.down: set[str] = set()
        self.fragmentation = 0
        self.unsupported = 0
        self.changes_from = "0-0"
        self.admitted_from = "0-0"
        self.entry_seq = 0
        self.last_expire_ms = -1
        self.refused_series: list[float] = []

    # --- the script calls, as the stages make them ---------------------------------

    def _entry(self, stream: str, payload: bytes) -> Entry:
        self.entry_seq += 1
        return Entry(stream=stream, id=f"{self.entry_seq}-0", fields={b"d": payload})

    async def _request(self, payload: bytes) -> None:
        """quota.lua on the request, then select.lua on what it admitted."""
        await self.quota.handle([self._entry(self.keys.requests, payload)])
        got = await self.redis.xrange(self.keys.admitted, f"({self.admitted_from}", "+")
        if got:
            self.admitted_from = text(got[-1][0])
            entries = [Entry(stream=self.keys.admitted, id=text(i), fields=_fields(f))
                       for i, f in got]
            await self.select.handle(entries)
        await self._read_changes()

    async def _event(self, payload: bytes) -> None:
        await self.events.handle([self._entry(self.keys.events, payload)])
        await self._read_changes()

    async def _expire(self) -> None:
        """The tick's jobs, in the registry's order (stages/jobs.py): expire, then (with
        reservations in the trace) activate_reservations, cancel_no_shows,
        complete_reservations, as the timers run them."""
        now = self.clock.now_ms()
        if now - self.last_expire_ms >= self.settings.tick_ms:
            self.last_expire_ms = now
            await expire_due(self.ctx)
            if self.rsvs:
                await activate_reservations(self.ctx)
                await cancel_no_shows(self.ctx)
                await complete_reservations(self.ctx)
            await self._read_changes()

    # --- what happened (the changes stream) -----------------------------------------

    async def _read_changes(self) -> None:
        got = await self.redis.xrange(self.keys.changes, f"({self.changes_from}", "+")
        if not got:
            return
        self.changes_from = text(got[-1][0])
        for _id, fields in got:
            change = change_decoder.decode(_fields(fields)[b"d"])
            if isinstance(change, AllocationChange):
                await self._allocation(change)
            elif isinstance(change, RequestRejected):
                await self._rejected(change)
            elif isinstance(change, ReservationChange):
                self._reservation(change)
            elif isinstance(change, WaiterChange) and change.status == "waiting":
                r = self.reqs.get(change.request_id)
                if r is not None:
                    r.queued = True
        if self.entry_seq % 500 == 0:
            await self.redis.xtrim(self.keys.changes, maxlen=0)
            await self.redis.xtrim(self.keys.admitted, maxlen=0)

    def _reservation(self, c: ReservationChange) -> None:
        v = self.rsvs.get(c.request_id)
        if v is None:
            return
        v.reservation_id, v.device_id, v.status, v.reason = (
            c.reservation_id, c.device_id, c.status, c.reason)
        if c.status in ("booked", "active"):
            self.bookings.setdefault(c.device_id, {})[c.reservation_id] = (c.start_ms, c.end_ms)
        else:
            self.bookings.get(c.device_id, {}).pop(c.reservation_id, None)
        if c.status == "active" and not v.activated:
            v.activated = True
            v.allocation_id = c.allocation_id
            rec = v.rec
            now = self.clock.now_ms()
            if rec.showed_up and (rec.cancelled_at_ms is None or rec.cancelled_at_ms > now):
                self._push(now, "rsv_claim", c.request_id)
                if rec.released_at_ms is not None:
                    self._push(max(now, rec.released_at_ms), "rsv_release", c.request_id)
        if c.claimed_at_ms is not None:
            v.claimed = True

    async def _allocation(self, c: AllocationChange) -> None:
        v = self.rsvs.get(c.request_id)
        if v is not None:  # the allocation a reservation became
            if c.status == "allocated":
                if v.served_ms is None:
                    v.served_ms, v.allocation_id = c.allocated_at_ms, c.allocation_id
                    self.rsv_by_alloc[c.allocation_id] = v
                    self.held[c.device_id] = c.allocation_id
            elif v.end_ms is None and c.allocation_id == v.allocation_id:
                v.end_ms = c.released_at_ms if c.released_at_ms is not None else c.at_ms
                if self.held.get(c.device_id) == c.allocation_id:
                    del self.held[c.device_id]
            return
        r = self.reqs.get(c.request_id)
        if c.status == "allocated":
            if r is None or r.served_ms is not None:
                return
            r.served_ms, r.answered_ms = c.allocated_at_ms, c.at_ms
            r.allocation_id, r.device_id = c.allocation_id, c.device_id
            self.by_alloc[c.allocation_id] = r
            self.held[c.device_id] = c.allocation_id
            if r.hold_ms is not None:
                self._push(c.allocated_at_ms + r.hold_ms, "release", r.rec.request_id)
            return
        r = self.by_alloc.get(c.allocation_id)
        if r is None or r.end_ms is not None:
            return
        r.end_ms = c.released_at_ms if c.released_at_ms is not None else c.at_ms
        r.end_reason = c.reason or c.status
        if self.held.get(c.device_id) == c.allocation_id:
            del self.held[c.device_id]

    async def _rejected(self, c: RequestRejected) -> None:
        v = self.rsvs.get(c.request_id)
        if v is not None:
            if v.refused is None and v.status is None:
                v.refused = c.reason
            return
        r = self.reqs.get(c.request_id)
        if r is None or r.refused is not None or r.served_ms is not None:
            return
        r.refused, r.answered_ms = c.reason, c.at_ms
        if c.reason == "no_available_devices" and self.bookings and \
                await self._kept_for_booking(r.rec):
            self.refused_for_bookings += 1
        elif c.reason == "no_available_devices" and await self._capacity_was_free(r.rec):
            self.fragmentation += 1

    async def _capacity_was_free(self, rec: TraceRequest) -> bool:
        """The free devices of the request's pool (all without one) and model had, in
        total, the CPU and memory it asked."""
        cpu = mem = 0
        for pool in ([rec.pool] if rec.pool else self.pools):
            for raw in await self.redis.zrange(self.keys.free(pool), 0, -1):
                d = self.devices.get(text(raw))
                if d is not None and (rec.model is None or d.model == rec.model):
                    cpu, mem = cpu + d.cpu_cores, mem + d.memory_mb
        return cpu >= max(rec.min_cpu_cores, 1) and mem >= rec.min_memory_mb

    async def _kept_for_booking(self, rec: TraceRequest) -> bool:
        """A free device of the request's pool and model, large enough, was passed over
        for a booking within ``[now, now + duration)`` (select.lua's unbooked)."""
        now = self.clock.now_ms()
        until = now + rec.duration_seconds * 1000
        for pool in ([rec.pool] if rec.pool else self.pools):
            for raw in await self.redis.zrange(self.keys.free(pool), 0, -1):
                d = self.devices.get(text(raw))
                if (d is not None and (rec.model is None or d.model == rec.model)
                        and d.cpu_cores >= rec.min_cpu_cores
                        and d.memory_mb >= rec.min_memory_mb
                        and any(s < until and e > now
                                for s, e in self.bookings.get(d.id, {}).values())):
                    return True
        return False

    # --- the replay -------------------------------------------------------------------

    def _push(self, at_ms: int, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at_ms, self.seq, kind, payload))

    async def setup(self) -> None:
        await mark_state(self.redis, self.keys, by="simulate", now_ms=self.clock.now_ms())
        await add_devices(self.redis, self.keys, self.clock, [
            DeviceSpec(id=d.id, name=d.id, host=d.host, pool=d.pool, model=d.model,
                       cpu_cores=d.cpu_cores, memory_mb=d.memory_mb, storage_mb=d.storage_mb)
            for d in self.trace.devices])
        users = sorted({r.user_id for r in self.trace.records
                        if isinstance(r, TraceRequest | TraceReservation)})
        await set_quotas(self.redis, self.keys, self.clock,
                         [msgspec.structs.replace(BIG_QUOTA, user_id=u) for u in users])
        await set_strategy(self.redis, self.keys, self.strategy)
        await self._read_changes()

    async def refresh_model(self) -> None:
        """What the refresh_model job computes, from the replay's own history."""
        now = self.clock.now_ms()
        window_s = min(14 * 86_400.0, max(1.0, (now - self.trace.header.start_ms) / 1000))
        rows = [HistoryRow(r.rec.user_id, r.device_id, self.devices[r.device_id].model,
                           (r.end_ms - r.served_ms) / 1000, r.rec.model, r.end_reason)
                for r in self.by_alloc.values()
                if r.end_ms is not None and r.served_ms is not None and r.device_id
                and now - r.end_ms <= window_s * 1000]
        await write_model(self.redis, self.keys, build_model(
            rows, {d.id: d.model for d in self.trace.devices}, window_s))

    def sample(self, t: int) -> tuple[int, float, float]:
        busy = len(self.held)
        used_hosts = {self.devices[d].host for d in self.held}
        whole = {d.host for d in self.trace.devices} - used_hosts - {
            self.devices[d].host for d in self.down}
        return busy, len(used_hosts) / len(self.hosts), len(whole) / len(self.hosts)

    async def run(self) -> Result:
        t0 = time.monotonic()
        trace = self.trace
        start, end = trace.header.start_ms, trace.header.end_ms
        holds: dict[str, int] = {}
        asks: dict[str, int] = {}
        for rec in trace.records:
            if isinstance(rec, TraceRequest):
                asks[rec.request_id] = rec.at_ms
        for rec in trace.records:
            if isinstance(rec, TraceRelease) and rec.request_id in asks:
                holds[rec.request_id] = rec.at_ms - asks[rec.request_id]
        self.heap: list[tuple[int, int, str, Any]] = []
        self.seq = 0
        grace_ms = self.settings.reservation_grace_s * 1000
        for rec in trace.records:
            if not isinstance(rec, TraceRelease):
                self._push(rec.at_ms, "record", rec)
            if isinstance(rec, TraceReservation):
                # the ticks that move it along: its start, its claim deadline, its end
                self.rsvs[RSV_PREFIX + rec.reservation_id] = _Rsv(rec)
                for t in (rec.start_ms, rec.start_ms + grace_ms, rec.end_ms):
                    self._push(t, "tick", None)
                if rec.cancelled_at_ms is not None:
                    self._push(rec.cancelled_at_ms, "rsv_cancel", RSV_PREFIX + rec.reservation_id)
        step = max(1, (end - start) // SAMPLES)
        for k in range(1, SAMPLES + 1):
            self._push(start + k * step, "sample", None)
        if self.strategy == "smart":
            for t in range(start + MODEL_EVERY_MS, end, MODEL_EVERY_MS):
                self._push(t, "model", None)
        try:
            return await self._replay(start, end, holds, t0)
        finally:
            await delete_keys(self.redis, self.settings.prefix)

    async def _replay(self, start: int, end: int, holds: dict[str, int], t0: float) -> Result:
        await self.setup()
        series: dict[str, list[float]] = {"t_h": [], "busy": [], "refused": []}
        spread, whole = [], []
        while self.heap:
            at, _seq, kind, payload = heapq.heappop(self.heap)
            if at > end:
                break
            self.clock.set(at)
            if kind == "tick":
                self.last_expire_ms = -1
            await self._expire()
            if kind == "record":
                await self._record(payload, holds)
            elif kind == "release":
                r = self.reqs[payload]
                if r.end_ms is None and r.allocation_id:
                    await self._request(encoder.encode(ReleaseRequest(
                        request_id=f"{payload}.release", reply_to=self.reply_to,
                        allocation_id=r.allocation_id, user_id=r.rec.user_id)))
            elif kind == "model":
                await self.refresh_model()
            elif kind.startswith("rsv_"):
                await self._rsv_step(kind, payload)
            else:
                busy, s, w = self.sample(at)
                spread.append(s)
                whole.append(w)
                series["t_h"].append((at - start) / 3_600_000)
                series["busy"].append(busy)
                series["refused"].append(sum(1 for r in self.reqs.values() if r.refused))
        self.clock.set(end)
        self.last_expire_ms = -1
        await self._expire()
        return self._result(start, end, spread, whole, series, time.monotonic() - t0)

    async def _record(self, rec: Any, holds: dict[str, int]) -> None:
        if isinstance(rec, TraceRequest):
            self.reqs[rec.request_id] = _Req(rec, holds.get(rec.request_id))
            await self._request(encoder.encode(AllocateRequest(
                request_id=rec.request_id, user_id=rec.user_id, reply_to=self.reply_to,
                min_cpu_cores=rec.min_cpu_cores, min_memory_mb=rec.min_memory_mb,
                duration_seconds=rec.duration_seconds, pool=rec.pool, model=rec.model,
                wait_seconds=rec.wait_seconds, priority=rec.priority or 0)))
        elif isinstance(rec, TraceDeviceEvent):
            at = self.clock.now_ms()
            event_id = f"sim-{rec.device_id}-{rec.event}-{at}"
            if rec.event == "failed":
                self.down.add(rec.device_id)
                payload = encoder.encode(DeviceFailed(event_id=event_id, occurred_at_ms=at,
                                                      device_id=rec.device_id))
            else:
                self.down.discard(rec.device_id)
                payload = encoder.encode(DeviceStatusChanged(
                    event_id=event_id, occurred_at_ms=at, device_id=rec.device_id,
                    status="running"))
            await self._event(payload)
        elif isinstance(rec, TraceReservation):
            await self._request(encoder.encode(ReserveRequest(
                request_id=RSV_PREFIX + rec.reservation_id, user_id=rec.user_id,
                reply_to=self.reply_to, start_ms=rec.start_ms, end_ms=rec.end_ms,
                min_cpu_cores=rec.min_cpu_cores, min_memory_mb=rec.min_memory_mb,
                pool=rec.pool, model=rec.model)))
        else:
            self.unsupported += 1

    async def _rsv_step(self, kind: str, rid: str) -> None:
        """The user's side of a reservation: claim it (showed up), release its allocation,
        cancel it; each a request through quota and select."""
        v = self.rsvs[rid]
        if v.reservation_id is None or v.status not in ("booked", "active"):
            return
        if kind == "rsv_claim":
            payload = encoder.encode(ClaimReservationRequest(
                request_id=f"{rid}.claim", reply_to=self.reply_to,
                reservation_id=v.reservation_id, user_id=v.rec.user_id))
        elif kind == "rsv_release":
            if v.allocation_id is None or v.end_ms is not None:
                return
            payload = encoder.encode(ReleaseRequest(
                request_id=f"{rid}.release", reply_to=self.reply_to,
                allocation_id=v.allocation_id, user_id=v.rec.user_id))
        else:
            payload = encoder.encode(CancelReservationRequest(
                request_id=f"{rid}.cancel", reply_to=self.reply_to,
                reservation_id=v.reservation_id, user_id=v.rec.user_id))
        await self._request(payload)

    def _result(self, start: int, end: int, spread: list[float], whole: list[float],
                series: dict[str, list[float]], replay_s: float) -> Result:
        served_ms = 0
        by_reason: dict[str, int] = {}
        waits: list[float] = []
        asked: dict[str, float] = {}
        got: dict[str, float] = {}
        interrupted = 0
        for r in self.reqs.values():
            user = r.rec.user_id
            asked[user] = asked.get(user, 0.0) + (
                r.hold_ms if r.hold_ms is not None else r.rec.duration_seconds * 1000)
            if r.served_ms is not None:
                held = max(0, min(r.end_ms if r.end_ms is not None else end, end) - r.served_ms)
                served_ms += held
                got[user] = got.get(user, 0.0) + held
                if r.end_reason and r.end_reason.startswith("device_"):
                    interrupted += 1
            if r.refused:
                by_reason[r.refused] = by_reason.get(r.refused, 0) + 1
            if r.queued:
                waits.append((r.answered_ms if r.answered_ms is not None else end) - r.rec.at_ms)
        rsv_ms = 0
        for v in self.rsvs.values():
            if v.claimed and v.served_ms is not None:
                rsv_ms += max(0, min(v.end_ms if v.end_ms is not None else end, end)
                              - v.served_ms)
        served_ms += rsv_ms
        shares = [min(1.0, got.get(u, 0.0) / a) for u, a in asked.items() if a > 0]
        capacity = len(self.trace.devices) * max(1, end - start)
        return Result(
            strategy=self.strategy, utilisation=round(served_ms / capacity, 4),
            refused=sum(by_reason.values()), refused_by_reason=dict(sorted(by_reason.items())),
            requests=len(self.reqs),
            served=sum(1 for r in self.reqs.values() if r.served_ms is not None),
            queued=len(waits), wait_p50_ms=percentile(waits, 50),
            wait_p99_ms=percentile(waits, 99), fragmentation=self.fragmentation,
            spread=round(sum(spread) / len(spread), 4) if spread else 0.0,
            hosts_whole=round(sum(whole) / len(whole), 4) if whole else 0.0,
            fairness=round(jain(shares), 4) if shares else 1.0, interrupted=interrupted,
            unsupported=self.unsupported, replay_s=round(replay_s, 2), series=series,
            reservations=self._reservation_figures(rsv_ms))

    def _reservation_figures(self, rsv_ms: int) -> dict[str, Any]:
        vs = list(self.rsvs.values())
        refused: dict[str, int] = {}
        for v in vs:
            if v.refused:
                refused[v.refused] = refused.get(v.refused, 0) + 1
        return {
            "trace": len(vs),
            "booked": sum(1 for v in vs if v.reservation_id is not None),
            "refused": sum(refused.values()),
            "refused_by_reason": dict(sorted(refused.items())),
            "activated": sum(1 for v in vs if v.activated),
            "claimed": sum(1 for v in vs if v.claimed),
            "no_show": sum(1 for v in vs if v.status == "no_show"),
            "completed": sum(1 for v in vs if v.status == "completed"),
            "cancelled": sum(1 for v in vs if v.status == "cancelled"
                             and v.reason == "cancelled"),
            "cancelled_at_start": sum(1 for v in vs if v.status == "cancelled"
                                      and v.reason != "cancelled"),
            "refused_for_bookings": self.refused_for_bookings,
            "device_s": round(rsv_ms / 1000, 3),
        }


async def simulate(redis: Redis, settings: Settings, trace: Trace,
                   strategies: Sequence[str]) -> list[Result]:
    """Replay ``trace`` under each strategy in turn."""
    return [await Replay(redis, settings, trace, s).run() for s in strategies]


def report(results: Sequence[Result], trace: Trace) -> dict[str, Any]:
    """The JSON of ``devsched simulate --json``."""
    return {"strategies": {r.strategy: r.figures() for r in results}, "trace": summary(trace)}


COLUMNS = (("utilisation", "util"), ("refused", "refused"), ("queued", "queued"),
           ("wait_p50_ms", "wait p50 s"), ("wait_p99_ms", "wait p99 s"),
           ("fragmentation", "frag"), ("spread", "spread"), ("hosts_whole", "whole"),
           ("fairness", "fair"), ("interrupted", "interr"))


def table(results: Sequence[Result]) -> str:
    """The figures of each strategy, one row each (waits in seconds)."""
    head = f"{'strategy':<16}" + "".join(f"{title:>11}" for _, title in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in results:
        cells = []
        for key, _ in COLUMNS:
            v = getattr(r, key)
            if key.endswith("_ms"):
                cells.append(f"{v / 1000:>11.1f}")
            elif isinstance(v, float):
                cells.append(f"{v:>11.3f}")
            else:
                cells.append(f"{v:>11}")
        lines.append(f"{r.strategy:<16}" + "".join(cells))
    reasons = sorted({k for r in results for k in r.refused_by_reason})
    if reasons:
        lines.append("refused by reason: " + "; ".join(
            f"{r.strategy} " + ", ".join(f"{k} {r.refused_by_reason.get(k, 0)}" for k in reasons)
            for r in results))
    for r in results:
        v = r.reservations
        if v.get("trace"):
            lines.append(
                f"reservations {r.strategy}: {v['booked']} booked of {v['trace']}, refused "
                + (", ".join(f"{k} {n}" for k, n in v["refused_by_reason"].items()) or "0")
                + f"; activated {v['activated']}, claimed {v['claimed']}, no_show "
                f"{v['no_show']}, completed {v['completed']}, cancelled {v['cancelled']}, "
                f"cancelled at start {v['cancelled_at_start']}; plain requests refused for "
                f"bookings {v['refused_for_bookings']}")
    return "\n".join(lines)


def plot(results: Sequence[Result], path: str) -> None:
    """A PNG comparing the strategies over time: devices in use, refusals so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for r in results:
        top.plot(r.series["t_h"], r.series["busy"], label=r.strategy, linewidth=0.9)
        bottom.plot(r.series["t_h"], r.series["refused"], label=r.strategy, linewidth=1.2)
    top.set_ylabel("devices allocated")
    bottom.set_ylabel("requests refused (cumulative)")
    bottom.set_xlabel("hours from the trace's start")
    top.legend(loc="upper right", fontsize="small")
    top.set_title("devsched simulate: strategies compared on one trace")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_commands(sub: Any, run: Any) -> None:
    """``devsched trace record|generate`` and ``devsched simulate``; ``run(fn)`` runs
    ``fn(redis, pg_or_None, settings)`` with the servers (the CLI's)."""
    from stages.tools.admin import STRATEGIES

    tr = sub.add_parser("trace", help="record or generate a trace of demand "
                                      "(docs/trace-format.md)").add_subparsers(
        dest="sub", required=True)
    s = tr.add_parser("record", help="the history PostgreSQL holds, as a trace")
    s.add_argument("--out", required=True)
    s.add_argument("--since-ms", type=int)
    s.add_argument("--until-ms", type=int)
    s.set_defaults(fn=lambda a: cmd_trace_record(a, run))
    s = tr.add_parser("generate", help="a synthetic trace, the same for the same options")
    s.add_argument("--out", required=True)
    s.add_argument("--days", type=float, default=7.0)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--hosts", type=int, default=10)
    s.add_argument("--devices-per-host", type=int, default=4)
    s.add_argument("--users", type=int, default=40)
    s.add_argument("--heavy-users", type=int, default=4)
    s.add_argument("--load", type=float, default=1.0,
                   help="scales the arrival rate (1: the busiest hours offer the capacity)")
    s.set_defaults(fn=cmd_trace_generate)
    s = sub.add_parser("simulate", help="replay a trace through the real scripts under "
                                        "each strategy and compare them")
    s.add_argument("trace")
    s.add_argument("--strategy", action="append", choices=STRATEGIES,
                   help="repeat for several (default: all)")
    s.add_argument("--json", action="store_true", help="last line: the figures as JSON")
    s.add_argument("--png", help="write a PNG comparing the strategies over time")
    s.set_defaults(fn=lambda a: cmd_simulate(a, run))


def cmd_trace_generate(args: argparse.Namespace) -> int:
    from stages.tools.trace import GenerateOptions, generate, write_trace

    trace = generate(GenerateOptions(days=args.days, seed=args.seed, hosts=args.hosts,
                                     devices_per_host=args.devices_per_host, users=args.users,
                                     heavy_users=args.heavy_users, load=args.load))
    write_trace(args.out, trace)
    print(json.dumps(summary(trace)))
    return 0


def cmd_trace_record(args: argparse.Namespace, run: Any) -> int:
    from stages.tools.trace import record, write_trace

    async def go(_redis: Redis, pg: Any, _settings: Settings) -> int:
        trace = await record(pg, since_ms=args.since_ms, until_ms=args.until_ms)
        write_trace(args.out, trace)
        print(json.dumps(summary(trace)))
        return 0

    result: int = run(go, True)
    return result


def cmd_simulate(args: argparse.Namespace, run: Any) -> int:
    from stages.tools.admin import STRATEGIES
    from stages.tools.trace import TraceError

    try:
        trace = read_trace(args.trace)
    except (OSError, TraceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = list(dict.fromkeys(args.strategy or STRATEGIES))

    async def go(redis: Redis, _pg: Any, settings: Settings) -> int:
        results = await simulate(redis, settings, trace, names)
        print(table(results))
        if args.png:
            plot(results, args.png)
            print(f"wrote {Path(args.png)}")
        if args.json:
            print(msgspec.json.encode(report(results, trace)).decode())
        return 0

    result: int = run(go, False)
    return result
