"""Allocation invariants under concurrent load, checked against a reference model.

A hypothesis state machine drives the real pipeline (the quota and select stages
on Redis Streams, the timers' ``expire_due``) with bursts of concurrent allocate,
release and retried requests from several users and two producers, on a few
devices of different sizes and small quotas, while a ManualClock moves between
bursts. After every step it reads Redis and checks:

1. a device is either in exactly one free pool or held by exactly one active
   allocation, never both and never two;
2. each user's usage counters equal the sum over that user's active allocations,
   and no quota hold is left once every request is answered;
3. no user is ever over a quota limit;
4. every request got exactly one reply (all replies read off the reply streams);
5. the outcome of every burst is one the model allows.

The model states the documented rules: quota refuses what the quota can never
allow and admits a request by holding one device of the user's count; select gives
the smallest free device (CPU, then memory) that meets the minimums and fits what
the quota still allows (per-device caps, totals minus current usage), then settles
the hold. Requests enter the stages in request-stream order, but admission of a
later request may happen before selection of an earlier one, so the model accepts
the outcome of every such interleaving (which includes the one-request-at-a-time
run). Releases and expiries end an allocation at exact clock seconds.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar, cast

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, note
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

import stages.tools.client
from pipeline.clock import ManualClock
from pipeline.connections import redis_client
from pipeline.embedded import ServerUrls
from schemas.keys import GROUP_QUOTA, GROUP_SELECT, Keys
from schemas.messages import (
    Allocated,
    DeviceSpec,
    Failed,
    QuotaSpec,
    Reply,
    encoder,
    reply_decoder,
)
from stages.app import serve
from stages.context import StageContext
from stages.select import allocation_id
from stages.settings import Settings
from stages.state import mark_state
from stages.timers import expire_due
from stages.tools.admin import add_devices, parse_user_state, set_quotas
from stages.tools.client import Client

FIT_SCALE = 1 << 30
"""Free-pool score of a device: cpu * FIT_SCALE + memory (common.lua's fit_score)."""
START_MS = 1_700_000_000_000
GHOST = "ghost"
"""A user without a quota record: every allocation is refused."""
SETTLE_TIMEOUT_S = 30.0
"""Longest wait for the stages to drain and the producers to read every reply (an upper
bound a busy shared machine never reaches; a passing run never waits it out)."""


def base_settings(servers: ServerUrls) -> Settings:
    base = Settings.from_env().with_urls(servers.redis_url, servers.database_url)
    return replace(base, block_ms=50, claim_idle_ms=2_000, claim_every_ms=100, batch_size=64)


def fresh_prefix() -> str:
    return f"inv{uuid.uuid4().hex[:10]}"


# --- reading every reply ------------------------------------------------------------------


class CountingReplyDecoder:
    """Stands in for the producer's reply decoder and counts replies per request id.

    The Client reads its reply stream in order and drops a second reply to a request
    it already resolved; counting at the decoder sees every reply entry.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def decode(self, raw: bytes) -> Reply:
        reply: Reply = reply_decoder.decode(raw)
        self.counts[reply.request_id] += 1
        return reply


# --- the reference model ------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    id: str
    cpu: int
    mem: int
    sto: int


@dataclass(frozen=True)
class Allocation:
    id: str
    device: str
    user: str
    allocated_at: int
    expires_at: int
    cpu: int
    mem: int
    sto: int
    status: str = "allocated"
    ended_at: int | None = None
    duration: int | None = None


@dataclass(frozen=True)
class AllocOp:
    rid: str
    user: str
    min_cpu: int
    min_mem: int
    seconds: int
    producer: int


@dataclass(frozen=True)
class ReleaseOp:
    rid: str
    user: str | None
    allocation_id: str | None
    device_id: str | None
    producer: int


Op = AllocOp | ReleaseOp
Outcome = tuple[Any, ...]


@dataclass(frozen=True)
class Usage:
    devices: int = 0
    cpu: int = 0
    mem: int = 0
    sto: int = 0


@dataclass
class Model:
    devices: dict[str, Device]
    quotas: dict[str, QuotaSpec]
    allocations: dict[str, Allocation]
    holder: dict[str, str | None]
    last: dict[str, str]
    holds: dict[str, str]
    """Request id -> user, for admitted requests not yet selected: one device each."""
    epoch: str = ""
    """The state marker's epoch, part of every allocation id."""

    def copy(self) -> Model:
        return Model(self.devices, self.quotas, dict(self.allocations), dict(self.holder),
                     dict(self.last), dict(self.holds), self.epoch)

    def active(self) -> list[Allocation]:
        return [a for a in self.allocations.values() if a.status == "allocated"]

    def allocated_usage(self, user: str) -> Usage:
        mine = [a for a in self.active() if a.user == user]
        return Usage(len(mine), sum(a.cpu for a in mine), sum(a.mem for a in mine),
                     sum(a.sto for a in mine))

    def caps(self, q: QuotaSpec, used: Usage) -> tuple[int, int, int]:
        """How large one more device of the user may be: (cpu, memory, storage)."""
        return (min(q.max_cpu_per_device, q.total_cpu_cores - used.cpu),
                min(q.max_memory_mb_per_device, q.total_memory_gb * 1024 - used.mem),
                q.total_storage_gb * 1024 - used.sto)

    @staticmethod
    def no_room(op: AllocOp, caps: tuple[int, int, int]) -> bool:
        cap_cpu, cap_mem, cap_sto = caps
        return cap_cpu < max(op.min_cpu, 1) or cap_mem < max(op.min_mem, 1) or cap_sto < 0

    # quota: refuse (the outcome) or hold one device of the count (None)
    def admit(self, op: AllocOp, now: int) -> Outcome | None:
        q = self.quotas.get(op.user)
        if q is None:
            return ("failed", "quota_exceeded", 0)
        if q.status == "suspended":
            return ("failed", "user_suspended", None)
        if q.status == "overdue":
            return ("failed", "billing_overdue", None)
        if q.status != "active" or (q.expires_at_ms is not None and q.expires_at_ms <= now):
            return ("failed", "quota_exceeded", 0)
        used = self.allocated_usage(op.user)
        held = sum(1 for user in self.holds.values() if user == op.user)
        if used.devices + held >= q.max_devices:
            return ("failed", "quota_exceeded", 0)
        remaining = q.max_devices - used.devices - held
        if op.min_cpu > q.max_cpu_per_device or op.min_mem > q.max_memory_mb_per_device:
            return ("failed", "quota_exceeded", remaining)
        if self.no_room(op, self.caps(q, used)):
            return ("failed", "quota_exceeded", remaining)
        self.holds[op.rid] = op.user
        return None

    # select: the smallest free device that meets the minimums and fits the quota's room
    def select(self, op: AllocOp, now: int) -> Outcome:
        del self.holds[op.rid]
        caps = self.caps(self.quotas[op.user], self.allocated_usage(op.user))
        cap_cpu, cap_mem, cap_sto = caps
        fitting = [
            d for d in self.devices.values()
            if self.holder[d.id] is None and op.min_cpu <= d.cpu <= cap_cpu
            and op.min_mem <= d.mem <= cap_mem and d.sto <= cap_sto
        ]
        if not fitting:
            reason = "quota_exceeded" if self.no_room(op, caps) else "no_available_devices"
            return ("failed", reason, None)
        best = min(fitting, key=lambda d: (d.cpu, d.mem))
        aid = allocation_id(self.epoch, op.user, op.rid, now)
        self.allocations[aid] = Allocation(aid, best.id, op.user, now, now + op.seconds * 1000,
                                           best.cpu, best.mem, best.sto)
        self.holder[best.id] = aid
        return ("allocated", best.id)

    def close(self, aid: str, end: int, status: str) -> Allocation:
        a = self.allocations[aid]
        closed = replace(a, status=status, ended_at=end, duration=(end - a.allocated_at) // 1000)
        self.allocations[aid] = closed
        self.holder[a.device] = None
        self.last[a.device] = aid
        return closed

    def release(self, op: ReleaseOp, now: int) -> Outcome:
        aid = op.allocation_id
        if aid is None:
            assert op.device_id is not None
            if op.device_id not in self.devices:
                return ("failed", "not_found", None)
            aid = self.holder[op.device_id]
            if aid is None:  # a device nobody holds: not_found, whatever it held before
                return ("failed", "not_found", None)
        a = self.allocations.get(aid)
        if a is None or (op.device_id is not None and a.device != op.device_id):
            return ("failed", "not_found", None)
        if op.user is not None and a.user != op.user:
            return ("failed", "not_owner", None)
        already = a.status != "allocated"
        if not already:
            a = self.close(aid, now, "released")
        return ("released", a.id, a.device, a.user, a.ended_at, a.duration, already, a.status)

    def expire(self, now: int) -> int:
        due = [a for a in self.active() if a.expires_at <= now]
        for a in due:
            self.close(a.id, a.expires_at, "expired")
        return len(due)


def burst_outcomes(model: Model, ops: list[Op], now: int,
                   selected_order: list[str]) -> dict[tuple[Outcome, ...], Model]:
    """Every outcome of ``ops`` (allocations in request-stream order: the order quota
    admits them) the pipeline may produce, given ``selected_order``: the request ids in
    the order select read them on the admitted stream (the allocations quota admitted,
    and every release: a release goes straight there, or through quota unchanged).

    Each allocation is selected after it is admitted; one quota refuses never gets to
    select. Any interleaving of the two sequences that agrees with what reached the
    admitted stream is possible (a branch where the model refuses an allocation that
    reached it, or admits one that did not, is not what happened). Outcomes are in the
    order of ``ops``."""
    position = {op.rid: i for i, op in enumerate(ops)}
    allocs = [i for i, op in enumerate(ops) if isinstance(op, AllocOp)]
    reached = set(selected_order)
    sel = [position[rid] for rid in selected_order]
    found: dict[tuple[Outcome, ...], Model] = {}

    def walk(m: Model, admitted: int, selected: int, out: tuple[Outcome | None, ...]) -> None:
        if admitted == len(allocs) and selected == len(sel):
            found.setdefault(tuple(o for o in out if o is not None), m)
            return
        if admitted < len(allocs):
            i = allocs[admitted]
            op = ops[i]
            assert isinstance(op, AllocOp)
            m2 = m.copy()
            refused = m2.admit(op, now)
            if (refused is None) == (op.rid in reached):  # agrees with the admitted stream
                walk(m2, admitted + 1, selected, out[:i] + (refused,) + out[i + 1:])
        if selected == len(sel):
            return
        i = sel[selected]
        op = ops[i]
        if isinstance(op, ReleaseOp):
            m2 = m.copy()
            result = m2.release(op, now)
            walk(m2, admitted, selected + 1, out[:i] + (result,) + out[i + 1:])
        elif allocs.index(i) < admitted:
            m2 = m.copy()
            result = m2.select(op, now)
            walk(m2, admitted, selected + 1, out[:i] + (result,) + out[i + 1:])

    walk(model, 0, 0, (None,) * len(ops))
    return found


def one_at_a_time(model: Model, ops: list[Op], now: int) -> tuple[Outcome, ...]:
    """The outcome when each request is fully decided before the next is admitted."""
    m = model.copy()
    out: list[Outcome] = []
    for op in ops:
        if isinstance(op, ReleaseOp):
            out.append(m.release(op, now))
        else:
            out.append(m.admit(op, now) or m.select(op, now))
    return tuple(out)


def observed(reply: Reply) -> Outcome:
    if isinstance(reply, Allocated):
        return ("allocated", reply.device.id)
    if isinstance(reply, Failed):
        return ("failed", reply.reason, reply.remaining_devices)
    return ("released", reply.allocation_id, reply.device_id, reply.user_id, reply.released_at_ms,
            reply.duration_seconds, reply.already_released, reply.status)


# --- strategies ---------------------------------------------------------------------------

devices_st = st.lists(
    st.tuples(st.sampled_from([1, 2, 4, 8]), st.sampled_from([2048, 4096, 8192, 16384]),
              st.sampled_from([0, 8192, 16384])),
    min_size=3, max_size=6, unique_by=lambda d: (d[0], d[1]),  # distinct sizes: one best fit
)
quota_st: st.SearchStrategy[dict[str, Any]] = st.builds(
    dict,
    status=st.sampled_from(["active"] * 12 + ["suspended", "overdue", "expired"]),
    expires_in_ms=st.one_of(st.none(), st.none(), st.none(), st.integers(120_000, 1_800_000)),
    max_devices=st.integers(1, 3),
    max_cpu_per_device=st.sampled_from([2, 4, 8]),
    max_memory_mb_per_device=st.sampled_from([4096, 8192, 16384]),
    total_cpu_cores=st.integers(3, 12),
    total_memory_gb=st.integers(6, 24),
    total_storage_gb=st.sampled_from([16, 24, 32, 64]),
)
min_cpu_st = st.sampled_from([0, 0, 0, 1, 2, 4, 16])
min_mem_st = st.sampled_from([0, 0, 0, 2048, 4096, 8192, 20000])


# --- the state machine --------------------------------------------------------------------


class AllocationMachine(RuleBasedStateMachine):
    """One example: a fresh key prefix, its own quota and select stages, two producers."""

    runner: ClassVar[asyncio.Runner]
    base: ClassVar[Settings]
    replies: ClassVar[CountingReplyDecoder]

    def __init__(self) -> None:
        super().__init__()
        self.settings = replace(self.base, prefix=fresh_prefix())
        self.keys = Keys(self.settings.prefix)
        self.clock = ManualClock(START_MS)
        self.model: Model | None = None
        self.sent: Counter[str] = Counter()
        self.replies.counts.clear()
        self.first_replies: dict[str, tuple[Op, Reply]] = {}
        self.stream_cursor = "0-0"
        self.admitted_cursor = "0-0"
        self.rids = 0
        self.sentinels = 0
        self.stop = asyncio.Event()
        self.clients: list[Client] = []
        self.redis: Redis | None = None
        self.stages: asyncio.Task[None] | None = None
        self.runner.run(self._start())

    async def _start(self) -> None:
        self.redis = redis_client(self.settings)
        self.stages = asyncio.create_task(serve(["quota", "select"], self.settings, self.clock,
                                                stop=self.stop, install_signals=False))
        for _ in range(2):
            client = Client(self.settings, timeout_s=SETTLE_TIMEOUT_S)
            await client.start()
            self.clients.append(client)

    def teardown(self) -> None:
        self.runner.run(self._stop())

    async def _stop(self) -> None:
        self.stop.set()
        for client in self.clients:
            await client.close()
        if self.stages is not None:
            await asyncio.wait_for(self.stages, SETTLE_TIMEOUT_S)
        if self.redis is not None:
            keys = [k async for k in self.redis.scan_iter(match=f"{self.settings.prefix}:*",
                                                          count=1000)]
            if keys:
                await self.redis.delete(*keys)
            await self.redis.aclose()

    # -- setup ------------------------------------------------------------------------------

    @initialize(devices=devices_st, quotas=st.lists(quota_st, min_size=2, max_size=4))
    def seed(self, devices: list[tuple[int, int, int]], quotas: list[dict[str, Any]]) -> None:
        specs = [DeviceSpec(id=f"d{i}", cpu_cores=c, memory_mb=m, storage_mb=s)
                 for i, (c, m, s) in enumerate(devices)]
        qspecs = [
            QuotaSpec(user_id=f"u{i}", status=q["status"],
                      expires_at_ms=None if q["expires_in_ms"] is None
                      else START_MS + q["expires_in_ms"],
                      **{k: v for k, v in q.items() if k not in ("status", "expires_in_ms")})
            for i, q in enumerate(quotas)
        ]
        assert self.redis is not None
        # a fixed epoch: allocation ids (and the order the rules draw them in) are the same
        # when hypothesis replays an example
        epoch = self.runner.run(mark_state(self.redis, self.keys, by="test",
                                           now_ms=self.clock.now_ms(), epoch="0" * 16))
        self.runner.run(add_devices(self.redis, self.keys, self.clock, specs))
        self.runner.run(set_quotas(self.redis, self.keys, self.clock, qspecs))
        self.model = Model(
            devices={s.id: Device(s.id, s.cpu_cores, s.memory_mb, s.storage_mb) for s in specs},
            quotas={q.user_id: q for q in qspecs}, allocations={},
            holder={s.id: None for s in specs}, last={}, holds={}, epoch=epoch,
        )

    def _ready(self) -> bool:
        return self.model is not None

    def _rid(self) -> str:
        self.rids += 1
        return f"r{self.rids}"

    @property
    def users(self) -> list[str]:
        assert self.model is not None
        return sorted(self.model.quotas)

    # -- drawing requests -------------------------------------------------------------------

    def _draw_alloc(self, data: st.DataObject, user: str | None = None) -> AllocOp:
        return AllocOp(
            rid=self._rid(),
            user=user or data.draw(st.sampled_from([*self.users] * 3 + [GHOST]), label="user"),
            min_cpu=data.draw(min_cpu_st, label="min_cpu"),
            min_mem=data.draw(min_mem_st, label="min_mem"),
            seconds=data.draw(st.one_of(st.integers(1, 3).map(lambda m: m * 60),
                                        st.integers(1, 180)), label="seconds"),
            producer=data.draw(st.integers(0, 1), label="producer"),
        )

    def _draw_release(self, data: st.DataObject) -> ReleaseOp:
        """A release drawn with the same draws whatever the model holds: which requests of
        a concurrent burst got a device is up to the race, so a draw whose kind or bounds
        followed the model (its allocations, the active ones) would differ when hypothesis
        replays a prefix (FlakyStrategyDefinition). Every draw here has fixed bounds; the
        model only decides what the values mean."""
        assert self.model is not None
        rid, producer = self._rid(), data.draw(st.integers(0, 1), label="producer")
        kind = data.draw(st.sampled_from(
            ["owner", "owner", "owner", "anyone", "other", "device", "unknown"]),
            label="release kind")
        user = data.draw(st.sampled_from(self.users), label="user")
        device = data.draw(st.sampled_from([*sorted(self.model.devices), "d-missing"]),
                           label="device")
        recent = data.draw(st.sampled_from([True, True, True, False]), label="recent")
        pick = data.draw(st.integers(0, 1023), label="allocation")
        other = data.draw(st.integers(0, len(self.users) - 1), label="other user")
        known = sorted(self.model.allocations)
        if not known and kind not in ("device", "unknown"):
            kind = "unknown"  # nothing allocated yet: a release of an unknown id
        if kind == "unknown":
            return ReleaseOp(rid, user, f"nope-{rid}", None, producer)
        if kind == "device":
            return ReleaseOp(rid, user, None, device, producer)
        active = sorted(a.id for a in self.model.active())
        among = active if active and recent else known
        a = self.model.allocations[among[pick % len(among)]]
        if kind == "owner":
            return ReleaseOp(rid, a.user, a.id, None, producer)
        if kind == "anyone":
            return ReleaseOp(rid, None, a.id, None, producer)
        others = [u for u in [*self.users, GHOST] if u != a.user]  # len(users) of them
        return ReleaseOp(rid, others[other % len(others)], a.id, None, producer)

    # -- rules ------------------------------------------------------------------------------

    @precondition(_ready)
    @rule(data=st.data(), size=st.integers(2, 5))
    def identical_requests_at_once(self, data: st.DataObject, size: int) -> None:
        """A burst of one user's same request: successes are bounded by devices and quota."""
        first = self._draw_alloc(data, data.draw(st.sampled_from(self.users), label="user"))
        ops: list[Op] = [first]
        ops += [replace(first, rid=self._rid(), producer=i % 2) for i in range(1, size)]
        self._burst(ops, [])

    @precondition(_ready)
    @rule(data=st.data(), size=st.integers(1, 5))
    def allocations_from_several_users_at_once(self, data: st.DataObject, size: int) -> None:
        self._burst([self._draw_alloc(data) for _ in range(size)], [])

    @precondition(_ready)
    @rule(data=st.data(), size=st.integers(1, 5), retries=st.integers(0, 2))
    def allocations_releases_and_retries_at_once(
        self, data: st.DataObject, size: int, retries: int
    ) -> None:
        ops: list[Op] = [
            self._draw_alloc(data) if data.draw(st.sampled_from([True, False, False]),
                                                label="allocate?")
            else self._draw_release(data)
            for _ in range(size)
        ]
        earlier = sorted(self.first_replies)
        again = data.draw(st.lists(st.sampled_from(earlier), max_size=retries, unique=True)
                          if earlier else st.just([]), label="retried")
        self._burst(ops, [self.first_replies[rid][0] for rid in again])

    @precondition(_ready)
    @rule(ms=st.integers(0, 120_000), run_expiry=st.booleans())
    def time_passes(self, ms: int, run_expiry: bool) -> None:
        """The clock moves; the timers' expire_due closes exactly what is past expires-at."""
        assert self.model is not None and self.redis is not None
        self.clock.advance(ms)
        if run_expiry:
            ctx = StageContext(redis=self.redis, settings=self.settings, clock=self.clock)
            closed = self.runner.run(expire_due(ctx))
            assert closed == self.model.expire(self.clock.now_ms())

    def _upcoming_expiries(self) -> list[int]:
        now = self.clock.now_ms()
        return [a.expires_at for a in self.model.active() if a.expires_at >= now] if self.model else []

    @precondition(_ready)
    @rule()
    def expire_due_at_exactly_expires_at(self) -> None:
        """An allocation expires at its expires-at instant, not one millisecond later. (Not
        a precondition on the model's expiries: the rules enabled must not depend on a
        concurrent burst's race, or a replayed prefix would draw differently.)"""
        assert self.model is not None and self.redis is not None
        due = self._upcoming_expiries()
        if not due:
            return  # nothing active to expire now
        self.clock.set(min(due))
        ctx = StageContext(redis=self.redis, settings=self.settings, clock=self.clock)
        closed = self.runner.run(expire_due(ctx))
        assert closed == self.model.expire(self.clock.now_ms()) >= 1

    # -- one burst --------------------------------------------------------------------------

    def _burst(self, ops: list[Op], retried: list[Op]) -> None:
        assert self.model is not None
        now = self.clock.now_ms()
        sent = ops + retried
        replies = self.runner.run(self._send_all(sent))
        for op in sent:
            self.sent[op.rid] += 1
        by_rid = {op.rid: reply for op, reply in zip(sent, replies)}
        for op in retried:
            _, first = self.first_replies[op.rid]
            assert by_rid[op.rid] == first, f"retry of {op.rid} got a new answer"
        for op in ops:
            reply = by_rid[op.rid]
            assert reply.request_id == op.rid
            self.first_replies[op.rid] = (op, reply)
            if isinstance(reply, Allocated):
                assert isinstance(op, AllocOp)
                assert reply.user_id == op.user
                assert reply.allocation_id == allocation_id(self.model.epoch, op.user, op.rid,
                                                            now)
                assert reply.allocated_at_ms == now
                assert reply.expires_at_ms == now + op.seconds * 1000
                assert reply.device.status == "allocated"
        order, selected_order = self.runner.run(self._stream_order({op.rid for op in ops}))
        by_order = sorted(ops, key=lambda op: order[op.rid])
        got = tuple(observed(by_rid[op.rid]) for op in by_order)
        allowed = burst_outcomes(self.model, by_order, now, selected_order)
        note(f"burst at {now}: {by_order}\n  got {got}\n  allowed {list(allowed)[:8]}")
        assert got in allowed, (
            f"burst {by_order} at {now} gave {got}; the model allows {sorted(allowed, key=str)}"
        )
        serial = one_at_a_time(self.model, by_order, now)
        event("burst: as if one at a time" if got == serial else
              "burst: a pending hold changed the outcome")
        if any(o[0] == "allocated" for o in got):
            event("burst: some allocated")
        if any(o[1:2] == ("quota_exceeded",) for o in got):
            event("burst: quota refused")
        if any(o[1:2] == ("no_available_devices",) for o in got):
            event("burst: no device fits")
        self.model = allowed[got]

    async def _send_all(self, ops: list[Op]) -> list[Reply]:
        replies = await asyncio.gather(*(self._send(op) for op in ops))
        await self._settle()
        return list(replies)

    async def _send(self, op: Op) -> Reply:
        client = self.clients[op.producer]
        if isinstance(op, AllocOp):
            whole_minutes = op.seconds % 60 == 0
            return await client.allocate(
                op.user, duration_minutes=op.seconds // 60 if whole_minutes else 60,
                duration_seconds=None if whole_minutes else op.seconds,
                min_cpu_cores=op.min_cpu, min_memory_mb=op.min_mem, request_id=op.rid)
        return await client.release(allocation_id=op.allocation_id, device_id=op.device_id,
                                    user_id=op.user, request_id=op.rid)

    async def _settle(self) -> None:
        """Wait until both stages consumed and acked everything, then until each producer
        has read its reply stream to the end (a marker added after the last reply)."""
        assert self.redis is not None
        deadline = asyncio.get_running_loop().time() + SETTLE_TIMEOUT_S
        while not await self._drained():
            assert asyncio.get_running_loop().time() < deadline, "stages did not drain"
            await asyncio.sleep(0.005)
        markers = []
        for client in self.clients:
            self.sentinels += 1
            marker = f"marker-{self.sentinels}"
            markers.append(marker)
            reply = Failed(request_id=marker, reason="not_found", message="end of burst")
            await self.redis.xadd(client.reply_stream, {"d": encoder.encode(reply)})
        while not all(self.replies.counts[m] for m in markers):
            assert asyncio.get_running_loop().time() < deadline, "replies not read"
            await asyncio.sleep(0.005)

    async def _drained(self) -> bool:
        assert self.redis is not None
        for stream, group in ((self.keys.requests, GROUP_QUOTA), (self.keys.admitted, GROUP_SELECT)):
            last = await self.redis.xrevrange(stream, count=1)
            if not last:
                continue
            groups = {g["name"].decode(): g for g in await self.redis.xinfo_groups(stream)}
            g = groups.get(group)
            if g is None or g["pending"] or g["last-delivered-id"] != last[0][0]:
                return False
        return True

    async def _stream_order(self, rids: set[str]) -> tuple[dict[str, int], list[str]]:
        """Position of each new request in the order the producers sent it (the request
        stream, then the releases added straight to the admitted stream), and the request
        ids in the order select read them (the admitted stream: what quota admitted or
        forwarded, and the releases sent there)."""
        assert self.redis is not None
        order: dict[str, int] = {}
        selected: list[str] = []
        for stream, cursor in ((self.keys.requests, "stream_cursor"),
                               (self.keys.admitted, "admitted_cursor")):
            entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                           await self.redis.xrange(stream, min=f"({getattr(self, cursor)}"))
            for entry_id, fields in entries:
                setattr(self, cursor, entry_id.decode())
                rid = msgspec.json.decode(fields[b"d"])["request_id"]
                if rid not in rids:
                    continue
                if stream == self.keys.admitted:
                    if rid not in selected:
                        selected.append(rid)
                    if b"c" in fields:
                        continue  # quota's: sent on the request stream, ordered there
                order[rid] = len(order)
        assert set(order) == rids
        return order, selected

    # -- invariants -------------------------------------------------------------------------

    @precondition(_ready)
    @invariant()
    def every_request_got_exactly_one_reply(self) -> None:
        counts = {rid: n for rid, n in self.replies.counts.items() if rid in self.sent}
        strays = {rid for rid in self.replies.counts
                  if not rid.startswith("marker-") and rid not in self.sent}
        assert counts == dict(self.sent)
        assert not strays, f"replies to requests nobody sent: {strays}"

    @precondition(_ready)
    @invariant()
    def redis_state_holds_the_allocation_invariants(self) -> None:
        assert self.model is not None
        snap = self.runner.run(self._snapshot())
        model = self.model
        devices, free, active, expiry = snap["devices"], snap["free"], snap["active"], snap["expiry"]

        # 1. a device is in exactly one free pool or held by exactly one active allocation
        in_free = Counter(d for members in free.values() for d in members)
        assert all(n == 1 for n in in_free.values()), f"device in two free pools: {in_free}"
        on_device = Counter(a["device_id"] for a in active.values())
        assert all(n == 1 for n in on_device.values()), f"device held twice: {on_device}"
        for did, d in devices.items():
            held_by = d["alloc"]
            assert (did in in_free) != bool(held_by), f"{did}: free={did in in_free} alloc={held_by}"
            assert d["status"] == ("allocated" if held_by else "available"), (did, d)
            if held_by:
                assert held_by in active and active[held_by]["device_id"] == did, (did, held_by)
            else:
                dev = model.devices[did]
                (score,) = [s for members in free.values() for m, s in members.items() if m == did]
                assert score == dev.cpu * FIT_SCALE + dev.mem
        for aid, a in active.items():
            assert a["status"] == "allocated" and devices[a["device_id"]]["alloc"] == aid
        assert expiry == {aid: int(a["expires_at_ms"]) for aid, a in active.items()}

        # 2. usage equals the sum over active allocations; no hold outlives its request
        for user in [*self.users, GHOST]:
            mine = [a for a in active.values() if a["user_id"] == user]
            usage = {k: int(v) for k, v in snap["usage"][user].items()}
            expected = {"devices": len(mine), "cpu": sum(int(a["cpu_cores"]) for a in mine),
                        "mem": sum(int(a["memory_mb"]) for a in mine),
                        "sto": sum(int(a["storage_mb"]) for a in mine)}
            assert {k: usage.get(k, 0) for k in expected} == expected, (user, usage)
            assert snap["holds"][user] == {}, f"{user} has holds left: {snap['holds'][user]}"
            assert set(snap["allocs"][user]) == {aid for aid, a in active.items()
                                                 if a["user_id"] == user}

            # 3. within quota
            q = model.quotas.get(user)
            if q is None:
                assert not mine
                continue
            assert expected["devices"] <= q.max_devices
            assert expected["cpu"] <= q.total_cpu_cores
            assert expected["mem"] <= q.total_memory_gb * 1024
            assert expected["sto"] <= q.total_storage_gb * 1024
            for a in mine:
                assert int(a["cpu_cores"]) <= q.max_cpu_per_device
                assert int(a["memory_mb"]) <= q.max_memory_mb_per_device

        # 5. Redis agrees with the model
        assert set(active) == {a.id for a in model.active()}
        for a in model.active():
            r = active[a.id]
            assert (r["device_id"], r["user_id"], int(r["allocated_at_ms"]),
                    int(r["expires_at_ms"])) == (a.device, a.user, a.allocated_at, a.expires_at)
        assert {did: d["alloc"] or None for did, d in devices.items()} == model.holder
        statuses = Counter(a.status for a in model.allocations.values())
        assert snap["stats"] == {"allocated": len(model.allocations),
                                 "released": statuses["released"], "expired": statuses["expired"]}

    async def _snapshot(self) -> dict[str, Any]:
        assert self.redis is not None and self.model is not None
        k, r = self.keys, self.redis

        def text(h: dict[bytes, bytes]) -> dict[str, str]:
            return {a.decode(): b.decode() for a, b in h.items()}

        pools = sorted(cast(bytes, p).decode() for p in await r.smembers(k.pools))
        dev_ids = sorted(self.model.devices)
        users = [*self.users, GHOST]
        async with r.pipeline(transaction=True) as pipe:
            for pool in pools:
                pipe.zrange(k.free(pool), 0, -1, withscores=True)
            for did in dev_ids:
                pipe.hgetall(k.device(did))
            pipe.zrange(k.expiry, 0, -1, withscores=True)
            pipe.hgetall(k.stats)
            for user in users:
                pipe.hgetall(k.user(user))
            res: Iterator[Any] = iter(await pipe.execute())
        free = {pool: {m.decode(): int(s) for m, s in next(res)} for pool in pools}
        devices = {did: text(next(res)) for did in dev_ids}
        # the expiry schedule holds every active allocation, and nothing else
        expiry = {m.decode(): int(s) for m, s in next(res)}
        active_ids = sorted(expiry)
        stats = {key: int(v) for key, v in text(next(res)).items()}
        per_user = {user: parse_user_state(next(res)) for user in users}
        async with r.pipeline(transaction=False) as pipe:
            for aid in active_ids:
                pipe.hgetall(k.allocation(aid))
            active = {aid: text(h) for aid, h in zip(active_ids, await pipe.execute())}
        return {
            "free": free, "devices": devices, "active": active, "expiry": expiry,
            "stats": {"allocated": stats.get("allocated", 0), "released": stats.get("released", 0),
                      "expired": stats.get("expired", 0)},
            "usage": {u: state.usage for u, state in per_user.items()},
            "holds": {u: state.holds for u, state in per_user.items()},
            "allocs": {u: state.allocations for u, state in per_user.items()},
        }


def test_concurrent_allocate_release_expire_keep_the_allocation_invariants(
    servers: ServerUrls, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies = CountingReplyDecoder()
    monkeypatch.setattr(stages.tools.client, "reply_decoder", replies)
    with asyncio.Runner() as runner:
        AllocationMachine.runner = runner
        AllocationMachine.base = base_settings(servers)
        AllocationMachine.replies = replies
        run_state_machine_as_test(AllocationMachine, settings=hsettings(
            max_examples=25, stateful_step_count=40, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ))


# --- best fit -----------------------------------------------------------------------------


def test_allocation_takes_the_smallest_device_that_meets_the_minimums(servers: ServerUrls) -> None:
    """resource_based: the least CPU, then the least memory, among free devices that meet
    the request's minimum CPU and memory; no_available_devices when none does. Each
    example uses a pool of its own on one running pipeline."""
    settings = replace(base_settings(servers), prefix=fresh_prefix())
    keys, clock, stop = Keys(settings.prefix), ManualClock(START_MS), asyncio.Event()
    examples = iter(range(1_000_000))

    with asyncio.Runner() as runner:
        redis = redis_client(settings)
        client = Client(settings, timeout_s=SETTLE_TIMEOUT_S)

        async def start() -> asyncio.Task[None]:
            task = asyncio.create_task(serve(["quota", "select"], settings, clock, stop=stop,
                                             install_signals=False))
            await mark_state(redis, keys, by="test", now_ms=clock.now_ms())
            await set_quotas(redis, keys, clock, [QuotaSpec(
                user_id="u", max_devices=100_000, max_cpu_per_device=4096,
                max_memory_mb_per_device=1 << 30, total_cpu_cores=1 << 30,
                total_memory_gb=1 << 30, total_storage_gb=1 << 30)])
            await client.start()
            return task

        stages_task = runner.run(start())
        try:
            @hsettings(max_examples=150, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow])
            @given(
                sizes=st.lists(st.tuples(st.integers(1, 16), st.integers(1, 32).map(lambda g: g * 512)),
                               min_size=1, max_size=40),  # over 32: select pages the pool
                min_cpu=st.integers(0, 17), min_mem=st.integers(0, 17_000),
            )
            def check(sizes: list[tuple[int, int]], min_cpu: int, min_mem: int) -> None:
                pool = f"p{next(examples)}"
                specs = [DeviceSpec(id=f"{pool}-d{i}", pool=pool, cpu_cores=c, memory_mb=m)
                         for i, (c, m) in enumerate(sizes)]
                runner.run(add_devices(redis, keys, clock, specs))
                got = runner.run(client.allocate("u", min_cpu_cores=min_cpu, min_memory_mb=min_mem,
                                                 pool=pool))
                meets = [(s.cpu_cores, s.memory_mb) for s in specs
                         if s.cpu_cores >= min_cpu and s.memory_mb >= min_mem]
                if not meets:
                    assert isinstance(got, Failed) and got.reason == "no_available_devices", got
                    return
                assert isinstance(got, Allocated), got
                chosen = next(s for s in specs if s.id == got.device.id)
                assert (chosen.cpu_cores, chosen.memory_mb) == min(meets)

            check()
        finally:
            async def stop_all() -> None:
                stop.set()
                await client.close()
                await asyncio.wait_for(stages_task, SETTLE_TIMEOUT_S)
                found = [k async for k in redis.scan_iter(match=f"{settings.prefix}:*", count=1000)]
                if found:
                    await redis.delete(*found)
                await redis.aclose()

            runner.run(stop_all())
