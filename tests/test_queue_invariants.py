"""Batch and wait queue invariants, checked by a hypothesis state machine.

The machine drives the real quota and select stages, the timers' ``expire_due`` (wait
time-outs and expiries) and ``devices add``, one stage step at a time (the contract
test's Driver), with single allocate requests that may wait (``wait_seconds``, a
priority 0..9), batches (all_or_nothing and best_effort), releases, cancels, device
adds and clock moves, on two pools of devices of a few sizes. After every step it reads
Redis and every reply, and checks:

1. an all_or_nothing batch never leaves a partial set: it got all its devices or none;
2. a device is free or held by one active allocation, never both; each user's device
   count equals its active allocations plus the holds of its requests not yet answered
   (every one of them a waiter), and its ``waiting`` count the waiters it has;
3. no device is idle while a waiter it fits waits (pool, minimums; quotas are ample);
4. a freed device goes to the first waiter in queue order that it fits, and the queue
   order is the documented score (arrival - priority x aging step);
5. every request got exactly one final reply (a waiter none yet), a ``queued`` notice
   only when it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, event
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

import stages.select as stages_select
from pipeline.clock import ManualClock
from pipeline.connections import redis_client, text
from pipeline.embedded import ServerUrls
from schemas.keys import Keys
from schemas.messages import (
    Allocated,
    AllocatedBatch,
    DeviceSpec,
    Failed,
    Queued,
    QuotaSpec,
    Released,
    reply_decoder,
)
from stages.context import StageContext
from stages.settings import Settings
from stages.state import mark_state
from stages.timers import expire_due
from stages.tools.admin import add_devices, parse_user_state, set_quotas
from tests.test_allocation_invariants import START_MS, base_settings, fresh_prefix
from tests.test_script_contract import Driver

USERS = ("u0", "u1", "u2")
POOLS = ("a", "b")
SIZES = (1, 2, 4)


class QueueMachine(RuleBasedStateMachine):
    runner: ClassVar[asyncio.Runner]
    base: ClassVar[Settings]

    def __init__(self) -> None:
        super().__init__()
        self.settings = replace(self.base, prefix=fresh_prefix())
        self.keys = Keys(self.settings.prefix)
        self.clock = ManualClock(START_MS)
        self.redis: Redis = redis_client(self.settings)
        ctx = StageContext(redis=self.redis, settings=self.settings, clock=self.clock)
        self.d = Driver(self.redis, ctx, self.clock)
        self.ctx = ctx
        self.n = 0
        self.devices: dict[str, DeviceSpec] = {}
        self.requests: dict[str, dict[str, Any]] = {}
        """request id -> what was asked (kind, user, count, mode, ...)."""
        self.finals: Counter[str] = Counter()
        self.notices: Counter[str] = Counter()
        self.active: dict[str, str] = {}
        """allocation id -> user, as the replies tell."""
        self.cursor = "0-0"
        self.ready = False

    def teardown(self) -> None:
        async def clean() -> None:
            found = [k async for k in self.redis.scan_iter(match=f"{self.settings.prefix}:*",
                                                           count=1000)]
            if found:
                await self.redis.delete(*found)
            await self.redis.aclose()
        self.runner.run(clean())

    @initialize(sizes=st.lists(st.tuples(st.sampled_from(POOLS), st.sampled_from(SIZES)),
                               min_size=1, max_size=3))
    def setup(self, sizes: list[tuple[str, int]]) -> None:
        async def go() -> None:
            await self.d.start()
            await mark_state(self.redis, self.keys, by="test", now_ms=self.clock.now_ms())
            await set_quotas(self.redis, self.keys, self.clock, [
                QuotaSpec(user_id=u, max_devices=40, total_cpu_cores=1000) for u in USERS])
        self.runner.run(go())
        self._add(sizes)
        self.ready = True

    def _add(self, sizes: list[tuple[str, int]]) -> None:
        specs = []
        for pool, cpu in sizes:
            self.n += 1
            specs.append(DeviceSpec(id=f"d{self.n}", pool=pool, cpu_cores=cpu))
        self.devices.update({s.id: s for s in specs})
        before = self._queue()
        self.runner.run(add_devices(self.redis, self.keys, self.clock, specs))
        self._read_replies(before)

    def _rid(self) -> str:
        self.n += 1
        return f"r{self.n}"

    def _through(self, *payloads: bytes) -> None:
        before = self._queue()

        async def go() -> None:
            await self.d.both(*payloads)
        self.runner.run(go())
        self._read_replies(before)

    def _queue(self) -> list[dict[str, Any]]:
        """The waiters in queue order (their records), the order checked against."""
        async def go() -> list[dict[str, Any]]:
            members = await self.redis.zrange(self.keys.queue, 0, -1, withscores=True)
            out = []
            for member, score in members:
                raw = await self.redis.hget(self.keys.waiters, member)
                assert raw is not None, f"waiter {member!r} without a record"
                w = json.loads(raw)
                step = self.settings.queue_aging_step_ms
                assert score == w["queued_at_ms"] - w["priority"] * step, (w, score)
                out.append(w)
            return out
        return self.runner.run(go())

    def _fits(self, w: dict[str, Any], dev: DeviceSpec) -> bool:
        return ((not w["pool"] or w["pool"] == dev.pool) and dev.cpu_cores >= w["min_cpu_cores"]
                and dev.memory_mb >= w["min_memory_mb"])

    def _read_replies(self, queue_before: list[dict[str, Any]]) -> None:
        """Read the new replies; each waiter served must be the first of the queue (as it
        was before this step, less those served or ended since) that its device fits."""
        entries = self.runner.run(self.redis.xrange(self.d.reply_to, min=f"({self.cursor}"))
        remaining = [w for w in queue_before]
        now = self.clock.now_ms()
        for entry_id, fields in entries:
            self.cursor = text(entry_id)
            reply = reply_decoder.decode(fields[b"d"])
            rid = reply.request_id
            if isinstance(reply, Queued):
                self.notices[rid] += 1
                continue
            self.finals[rid] += 1
            asked = self.requests.get(rid, {})
            was_waiting = [w for w in remaining if w["request_id"] == rid]
            if isinstance(reply, Allocated):
                self.active[reply.allocation_id] = reply.user_id
                if was_waiting:
                    dev = self.devices[reply.device.id]
                    live = [w for w in remaining if w["wait_until_ms"] > now]
                    first = next(w for w in live if self._fits(w, dev))
                    assert first["request_id"] == rid, (
                        f"{dev.id} went to {rid}, not to {first['request_id']} ahead of it")
                    event("queue: a waiter served")
            elif isinstance(reply, AllocatedBatch):
                for a in reply.allocations:
                    self.active[a.allocation_id] = a.user_id
                if reply.mode == "all_or_nothing":
                    assert reply.success_count in (0, asked["count"]), reply
                    event(f"batch all_or_nothing: {'all' if reply.success_count else 'none'}")
            elif isinstance(reply, Failed) and was_waiting:
                event(f"queue: ended {reply.reason}")
            elif isinstance(reply, Released) and not reply.already_released:
                self.active.pop(reply.allocation_id, None)
            remaining = [w for w in remaining if w["request_id"] != rid]

    # -- rules --------------------------------------------------------------------------

    @precondition(lambda self: self.ready)
    @rule(user=st.sampled_from(USERS), pool=st.sampled_from([None, *POOLS]),
          cpu=st.sampled_from([0, 1, 2, 4, 8]), wait=st.sampled_from([None, 5, 60, 600, 600, 600]),
          priority=st.integers(0, 9))
    def allocate(self, user: str, pool: str | None, cpu: int, wait: int | None,
                 priority: int) -> None:
        rid = self._rid()
        self.requests[rid] = {"kind": "allocate", "user": user}
        self._through(self.d.allocate(user, rid, pool=pool, min_cpu_cores=cpu,
                                      wait_seconds=wait, priority=priority,
                                      duration_seconds=120))

    @precondition(lambda self: self.ready)
    @rule(user=st.sampled_from(USERS), count=st.integers(2, 4), best_effort=st.booleans(),
          pool=st.sampled_from([None, *POOLS]))
    def allocate_batch(self, user: str, count: int, best_effort: bool, pool: str | None) -> None:
        rid = self._rid()
        self.requests[rid] = {"kind": "batch", "user": user, "count": count}
        self._through(self.d.allocate(user, rid, count=count, pool=pool, duration_seconds=120,
                                      mode="best_effort" if best_effort else "all_or_nothing"))

    @precondition(lambda self: self.ready and self.active)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        aid = data.draw(st.sampled_from(list(self.active)))  # in the order made: ids differ per run
        rid = self._rid()
        self.requests[rid] = {"kind": "release"}
        self._through(self.d.release(rid, allocation_id=aid))

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        waiting = self._queue()
        target = data.draw(st.sampled_from(
            [(w["user_id"], w["request_id"]) for w in waiting] + [("u0", "nothing")]))
        rid = self._rid()
        self.requests[rid] = {"kind": "cancel"}
        self._through(self.d.cancel(rid, target[1], target[0]))

    @precondition(lambda self: self.ready)
    @rule(sizes=st.lists(st.tuples(st.sampled_from(POOLS), st.sampled_from(SIZES)),
                         min_size=1, max_size=2))
    def add_devices(self, sizes: list[tuple[str, int]]) -> None:
        self._add(sizes)

    @precondition(lambda self: self.ready)
    @rule(ms=st.sampled_from([1_000, 6_000, 61_000, 121_000]))
    def time_passes(self, ms: int) -> None:
        before = self._queue()
        self.clock.advance(ms)
        self.runner.run(expire_due(self.ctx))
        self._read_replies(before)
        for aid in [a for a in self.active if not self._is_active(a)]:
            del self.active[aid]

    def _is_active(self, aid: str) -> bool:
        status = self.runner.run(self.redis.hget(self.keys.allocation(aid), "status"))
        return status == b"allocated"

    # -- invariants -----------------------------------------------------------------------

    @precondition(lambda self: self.ready)
    @invariant()
    def the_state_holds_the_invariants(self) -> None:
        snap = self.runner.run(self._snapshot())
        waiters = self._queue()
        now = self.clock.now_ms()
        # 2. devices free or held once; usage = allocations + holds (waiters only)
        held = Counter(d["alloc"] for d in snap["devices"].values() if d["alloc"])
        assert all(n == 1 for n in held.values()), held
        for did, d in snap["devices"].items():
            assert (did in snap["free"]) != bool(d["alloc"]), (did, d)
        waiting_by_user = Counter(w["user_id"] for w in waiters)
        for user, state in snap["users"].items():
            holds = {rid: h for rid, h in state.holds.items()}
            assert set(holds) == {w["request_id"] for w in waiters if w["user_id"] == user}
            assert state.usage["devices"] == len(state.allocations) + len(holds), (user, state)
            assert int(state.quota.get("waiting", "0")) == waiting_by_user[user]
        # 3. no device idle while a live waiter it fits waits
        for did in snap["free"]:
            dev = self.devices[did]
            for w in waiters:
                assert w["wait_until_ms"] <= now or not self._fits(w, dev), (
                    f"{did} free while {w['request_id']} waits for it")
        if waiters:
            event("queue: someone waiting")
        # 5. one final reply per request, none yet for a waiter; notices only for waiters
        waiting_ids = {w["request_id"] for w in waiters}
        for rid in self.requests:
            assert self.finals[rid] == (0 if rid in waiting_ids else 1), (rid, self.finals[rid])
        for rid in self.notices:
            assert self.requests[rid]["kind"] == "allocate"

    async def _snapshot(self) -> dict[str, Any]:
        r, k = self.redis, self.keys
        free: set[str] = set()
        for pool in POOLS:
            free |= {text(m) for m in await r.zrange(k.free(pool), 0, -1)}
        devices = {}
        for did in self.devices:
            h = await r.hgetall(k.device(did))
            devices[did] = {"alloc": text(h.get(b"alloc", b""))}
        users = {u: parse_user_state(await r.hgetall(k.user(u))) for u in USERS}
        return {"free": free, "devices": devices, "users": users}


@contextlib.contextmanager
def bound(machine: Any, servers: ServerUrls) -> Iterator[None]:
    """The machine's event loop and settings for this test."""
    with asyncio.Runner() as runner:
        machine.runner = runner
        machine.base = base_settings(servers)
        yield


def run_machine(machine: Any, servers: ServerUrls, examples: int, steps: int) -> None:
    with bound(machine, servers):
        run_state_machine_as_test(machine, settings=hsettings(
            max_examples=examples, stateful_step_count=steps, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ))


def break_script(monkeypatch: pytest.MonkeyPatch, module: Any, script: Any, old: str,
                 new: str) -> None:
    """The stage ``module`` runs ``script`` with ``old`` replaced by ``new`` (to show an
    invariant bites); hypothesis' event() is off, as the machine runs outside it."""
    from pipeline.scripts import Script

    assert script.body.count(old) == 1
    monkeypatch.setattr(module, script.name.upper(), Script(
        script.name, script.keys, script.call, script.body.replace(old, new)))
    monkeypatch.setattr(sys.modules[__name__], "event", lambda *_a: None)


def test_batches_and_the_wait_queue_keep_their_invariants(servers: ServerUrls) -> None:
    run_machine(QueueMachine, servers, examples=60, steps=40)


def test_the_machine_would_see_a_device_left_idle(servers: ServerUrls,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The invariant bites: with offer_device turned off (a freed device goes back to the
    free pool), a release while a fitting waiter waits fails invariant 3."""
    import stages.select
    from stages.scripts import SELECT

    break_script(monkeypatch, stages.select, SELECT,
                 "  if queue_count(P) == 0 then return false end", "  if true then return false end")
    with bound(QueueMachine, servers):
        m = QueueMachine()
        try:
            m.setup([("a", 2)])
            m.allocate("u0", "a", 0, None, 0)
            m.allocate("u1", "a", 0, 600, 0)
            m.the_state_holds_the_invariants()
            (aid,) = m.active
            rid = m._rid()
            m.requests[rid] = {"kind": "release"}
            m._through(m.d.release(rid, allocation_id=aid))
            with pytest.raises(AssertionError, match="free while"):
                m.the_state_holds_the_invariants()
        finally:
            m.teardown()


# --- rate limits ---------------------------------------------------------------------

RATE_USERS = {"r0": "t0", "r1": "t0", "r2": "t1", "r3": None}
"""user -> tenant: two users share t0's bucket, r3 has no tenant (its own bucket only)."""


class RateMachine(RuleBasedStateMachine):
    """Rate limits (A12) at admission, through the real quota stage with the manual clock:
    bursts of requests from users of shared and separate tenants, and the clock moving by
    any amount. Checked after every step, for each user's and each tenant's bucket: in
    every window [t0, t1] of the clock no more requests passed the limit than
    rate x (t1 - t0) + burst; every refusal is ``rate_limited`` with retry_after_ms > 0;
    and a request sent once that much time has passed (nothing else taken from its
    buckets since) passes."""

    runner: ClassVar[asyncio.Runner]
    base: ClassVar[Settings]

    def __init__(self) -> None:
        super().__init__()
        self.settings = replace(self.base, prefix=fresh_prefix())
        self.keys = Keys(self.settings.prefix)
        self.clock = ManualClock(START_MS)
        self.redis: Redis = redis_client(self.settings)
        self.d: Driver | None = None
        self.n = 0
        self.cursor = "0-0"
        self.passed: dict[str, list[int]] = {}
        """bucket ('user:U' / 'tenant:T') -> the clock at each request that passed it."""
        self.refused: dict[str, tuple[int, int, int]] = {}
        """user -> (refused at, retry_after_ms, passes of its buckets then) of its last
        refusal."""
        self.rates: dict[str, tuple[float, int]] = {}

    def teardown(self) -> None:
        async def clean() -> None:
            found = [k async for k in self.redis.scan_iter(match=f"{self.settings.prefix}:*",
                                                           count=1000)]
            if found:
                await self.redis.delete(*found)
            await self.redis.aclose()
        self.runner.run(clean())

    @initialize(user=st.sampled_from([(0.5, 1), (2.0, 3), (10.0, 0)]),
                tenant=st.sampled_from([(1.0, 4), (3.0, 2), (0.25, 0)]))
    def setup(self, user: tuple[float, int], tenant: tuple[float, int]) -> None:
        self.settings = replace(self.settings, rate_user_per_s=user[0], rate_user_burst=user[1],
                                rate_tenant_per_s=tenant[0], rate_tenant_burst=tenant[1])
        ctx = StageContext(redis=self.redis, settings=self.settings, clock=self.clock)
        self.d = Driver(self.redis, ctx, self.clock)
        # a burst of 0 means the rate rounded up (stages/quota.py)
        self.rates = {"user": (user[0], user[1] or max(1, math.ceil(user[0]))),
                      "tenant": (tenant[0], tenant[1] or max(1, math.ceil(tenant[0])))}

        async def go() -> None:
            assert self.d is not None
            await self.d.start()
            await mark_state(self.redis, self.keys, by="test", now_ms=self.clock.now_ms())
            await set_quotas(self.redis, self.keys, self.clock, [
                QuotaSpec(user_id=u, max_devices=10_000) for u in RATE_USERS])
        self.runner.run(go())

    def _buckets(self, user: str) -> list[str]:
        tenant = RATE_USERS[user]
        return [f"user:{user}"] + ([f"tenant:{tenant}"] if tenant else [])

    def _taken(self, user: str) -> int:
        return sum(len(self.passed.get(b, [])) for b in self._buckets(user))

    def _send(self, user: str, n: int) -> dict[str, Failed | None]:
        """Send n requests of `user` through quota; each one's refusal, None if it passed."""
        assert self.d is not None
        rids = []
        for _ in range(n):
            self.n += 1
            rids.append(f"q{self.n}")
        payloads = [self.d.allocate(user, rid, tenant_id=RATE_USERS[user]) for rid in rids]
        self.runner.run(self.d.through_quota(*payloads))
        entries = self.runner.run(self.redis.xrange(self.d.reply_to, min=f"({self.cursor}"))
        refusals: dict[str, Failed | None] = dict.fromkeys(rids)
        for entry_id, fields in entries:
            self.cursor = text(entry_id)
            reply = reply_decoder.decode(fields[b"d"])
            if isinstance(reply, Failed) and reply.reason == "rate_limited":
                refusals[reply.request_id] = reply
        now = self.clock.now_ms()
        for rid in rids:
            refusal = refusals[rid]
            if refusal is None:
                for b in self._buckets(user):
                    self.passed.setdefault(b, []).append(now)
            else:
                # a refusal must name a wait (the bucket's arithmetic on the injected clock);
                # retry_after_the_refusal replays it: a request at that instant is admitted,
                # so a wait of 0 (the same instant, the same empty bucket) would fail there
                assert refusal.retry_after_ms is not None, refusal
                self.refused[user] = (now, refusal.retry_after_ms, self._taken(user))
        return refusals

    @precondition(lambda self: self.d is not None)
    @rule(user=st.sampled_from(list(RATE_USERS)), n=st.integers(1, 6))
    def requests(self, user: str, n: int) -> None:
        refusals = self._send(user, n)
        event(f"rate: {sum(r is not None for r in refusals.values())} of {n} refused")

    @precondition(lambda self: self.d is not None)
    @rule(ms=st.sampled_from([1, 99, 250, 500, 1_000, 4_000, 30_000]))
    def time_passes(self, ms: int) -> None:
        self.clock.advance(ms)

    @precondition(lambda self: self.d is not None and self.refused)
    @rule(data=st.data())
    def retry_after_the_refusal(self, data: st.DataObject) -> None:
        user = data.draw(st.sampled_from(sorted(self.refused)))
        at, wait, taken = self.refused.pop(user)
        if self._taken(user) != taken:
            return  # its buckets gave tokens to others since: the promise was for then
        self.clock.advance(max(0, at + wait - self.clock.now_ms()))
        (refusal,) = self._send(user, 1).values()
        assert refusal is None, f"{user} refused again {wait} ms after: {refusal}"
        event("rate: admitted after retry_after_ms")

    @precondition(lambda self: self.d is not None)
    @invariant()
    def no_window_passes_more_than_rate_times_window_plus_burst(self) -> None:
        for bucket, times in self.passed.items():
            per_s, burst = self.rates[bucket.split(":")[0]]
            for i, start in enumerate(times):
                for j in range(i, len(times)):
                    window_ms = times[j] - start
                    assert j - i + 1 <= burst + per_s * window_ms / 1000 + 1e-9, (
                        f"{bucket}: {j - i + 1} passed in {window_ms} ms "
                        f"(rate {per_s}/s, burst {burst})")


def test_rate_limits_keep_their_bound_and_their_retry_after(servers: ServerUrls) -> None:
    run_machine(RateMachine, servers, examples=40, steps=30)


def test_the_rate_machine_would_see_a_window_over_its_bound(servers: ServerUrls,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The bound bites: with the buckets never emptied (the token taken is put back), a
    burst past it fails the window invariant."""
    import stages.quota
    from stages.scripts import QUOTA

    break_script(monkeypatch, stages.quota, QUOTA, "bucket_keep(ukey, u - 1000,",
                 "bucket_keep(ukey, u,")
    with bound(RateMachine, servers):
        m = RateMachine()
        try:
            m.setup((2.0, 3), (3.0, 2))
            m.requests("r3", 5)  # no tenant: only the user's bucket, which never empties
            with pytest.raises(AssertionError, match="passed in 0 ms"):
                m.no_window_passes_more_than_rate_times_window_plus_burst()
        finally:
            m.teardown()


async def test_a_freed_device_reaches_the_first_waiter_it_fits_however_deep(
    redis: Redis, ctx: StageContext, clock: ManualClock,
) -> None:
    """Behind 60 waiters the device cannot serve (too small for them, in two classes) and
    one its user's quota cannot take now, the first waiter it fits gets it on release;
    the others keep their places."""
    ctx = replace(ctx, settings=replace(ctx.settings, queue_max_per_user=100))
    d = Driver(redis, ctx, clock)
    d.select = stages_select.SelectStage(ctx)
    await d.start()
    keys = ctx.keys
    await mark_state(redis, keys, by="test", now_ms=clock.now_ms())
    await add_devices(redis, keys, clock, [DeviceSpec(id="small", cpu_cores=2)])
    await set_quotas(redis, keys, clock, [
        QuotaSpec(user_id="holder"), QuotaSpec(user_id="big", max_devices=100,
                                                max_cpu_per_device=64, total_cpu_cores=10_000),
        QuotaSpec(user_id="tight", max_cpu_per_device=1), QuotaSpec(user_id="fits")])
    await d.both(d.allocate("holder", "held"))
    (held,) = [reply_decoder.decode(f[b"d"]) for _i, f in await redis.xrange(d.reply_to)]
    assert isinstance(held, Allocated)
    await d.both(*[d.allocate("big", f"big-{i}", min_cpu_cores=8 + i % 2, wait_seconds=600)
                   for i in range(60)])
    await d.both(d.allocate("tight", "tight-1", wait_seconds=600))  # quota: 1 CPU a device
    await d.both(d.allocate("fits", "fits-1", wait_seconds=600))
    assert await redis.zcard(keys.queue) == 62
    await d.both(d.release("rel", allocation_id=held.allocation_id))
    last = reply_decoder.decode((await redis.xrevrange(d.reply_to, count=1))[0][1][b"d"])
    assert isinstance(last, Released)
    answers = [reply_decoder.decode(f[b"d"]) for _i, f in await redis.xrange(d.reply_to)]
    (served,) = [a for a in answers if isinstance(a, Allocated) and a.request_id != "held"]
    assert (served.request_id, served.device.id) == ("fits-1", "small")
    assert await redis.zcard(keys.queue) == 61
    assert await redis.scard(keys.prefix + ":{pool}:wq_classes") == 3  # big x2, tight's
