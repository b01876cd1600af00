"""The priority wait queue: an allocate request with wait_seconds waits for a device.

Through the real pipeline on the ManualClock: a request that finds no fitting device gets
a ``queued`` notice with its position, then exactly one final reply; the device a
release frees goes to the waiter in the same step (never back to the free pool, where a
newcomer could take it), the higher priority waiter first, and aging lets an older low
priority waiter beat a newer high priority one past the documented bound (9 aging
steps); a wait ends ``timed_out`` on the timer tick with its quota hold given back; a
cancel request ends it ``cancelled``; a user past DEVSCHED_QUEUE_MAX_PER_USER waiting
requests is refused ``queue_full``; an expiry, a device event bringing a device back and
an admin add feed the queue; the same request sent again while waiting is told where it
stands (one waiter), and after it was served gets its first answer (one allocation).
How we know: the replies on the reply streams, the queue keys, the user's usage and
holds, and the free pool, read after each step.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import Keys
from schemas.messages import (
    Allocated,
    AllocateRequest,
    Cancelled,
    DeviceSpec,
    Failed,
    Queued,
    QuotaSpec,
    encoder,
    reply_decoder,
)
from stages.settings import Settings
from stages.tools.admin import add_devices, queue, stats, user_state
from stages.tools.client import Client
from tests.conftest import (
    EVENT_TIMEOUT_S,
    RunningPipeline,
    seed,
    tick_through_timers,
    wait_until,
)
from tests.test_admin import devsched
from tests.test_events import send


async def queued(client: Client, request_id: str) -> Queued:
    """Wait for the request's queued notice."""
    await wait_until(lambda: _has(client, request_id))
    return client.queued[request_id]


async def _has(client: Client, request_id: str) -> bool:
    return request_id in client.queued


def waiting(client: Client, user: str, rid: str, **kw: Any) -> asyncio.Task[Allocated | Failed]:
    return asyncio.create_task(client.allocate(user, request_id=rid, wait_seconds=kw.pop(
        "wait_seconds", 600), **kw))


async def test_a_waiter_gets_the_device_a_release_frees_at_once(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="only")],
               quotas=[QuotaSpec(user_id="a"), QuotaSpec(user_id="b")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        held = await client.allocate("a")
        assert isinstance(held, Allocated)
        # without wait_seconds: refused at once, as before
        refused = await client.allocate("b")
        assert isinstance(refused, Failed) and refused.reason == "no_available_devices"
        task = waiting(client, "b", "wait-1")
        notice = await queued(client, "wait-1")
        assert (notice.position, notice.priority) == (1, 0)
        assert notice.wait_until_ms == clock.now_ms() + 600_000
        assert not task.done()
        # the wait holds a device of b's quota, as an admitted request does
        assert (await user_state(redis, keys, "b")).holds == {"wait-1": "0 0 0"}
        listed = await queue(redis, keys, clock)
        assert [(w.position, w.request_id, w.user_id) for w in listed] == [(1, "wait-1", "b")]
        clock.advance(5_000)
        assert (await queue(redis, keys, clock))[0].waited_ms == 5_000
        released = await client.release(allocation_id=held.allocation_id)
        assert released.__class__.__name__ == "Released"
        got = await asyncio.wait_for(task, EVENT_TIMEOUT_S)
        assert isinstance(got, Allocated) and got.device.id == "only", got
        # handed over in the release's own step: never back in the free pool
        assert (await stats(redis, keys)).free == 0
        assert await queue(redis, keys, clock) == []
        state = await user_state(redis, keys, "b")
        assert state.holds == {} and list(state.allocations) == [got.allocation_id]
        assert state.usage["devices"] == 1 and state.quota.get("waiting") == "0"
        # the same request again: its first answer, no second allocation
        again = await client.allocate("b", request_id="wait-1", wait_seconds=600)
        assert again == got
    assert (await user_state(redis, keys, "b")).usage["devices"] == 1


async def test_higher_priority_first_then_arrival_and_aging_bounds_the_wait(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="only")],
               quotas=[QuotaSpec(user_id=u) for u in ("holder", "low", "high", "old", "new")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        held = await client.allocate("holder")
        assert isinstance(held, Allocated)
        low = waiting(client, "low", "low-1", priority=1)
        assert (await queued(client, "low-1")).position == 1
        clock.advance(1_000)
        high = waiting(client, "high", "high-1", priority=5)
        notice = await queued(client, "high-1")
        assert (notice.position, notice.priority) == (1, 5)  # ahead of the older low one
        assert [w.request_id for w in await queue(redis, keys, clock)] == ["high-1", "low-1"]
        await client.release(allocation_id=held.allocation_id)
        first = await asyncio.wait_for(high, EVENT_TIMEOUT_S)
        assert isinstance(first, Allocated) and not low.done()
        await client.release(allocation_id=first.allocation_id)
        second = await asyncio.wait_for(low, EVENT_TIMEOUT_S)
        assert isinstance(second, Allocated)

        # aging: a priority 0 waiter older by more than 9 steps beats a priority 9 newcomer
        step = settings.queue_aging_step_ms
        old = waiting(client, "old", "old-1", priority=0)
        await queued(client, "old-1")
        clock.advance(9 * step + 1)
        new = waiting(client, "new", "new-1", priority=9)
        assert (await queued(client, "new-1")).position == 2
        await client.release(allocation_id=second.allocation_id)
        served = await asyncio.wait_for(old, EVENT_TIMEOUT_S)
        assert isinstance(served, Allocated) and not new.done()
        await client.release(allocation_id=served.allocation_id)
        assert isinstance(await asyncio.wait_for(new, EVENT_TIMEOUT_S), Allocated)


async def test_aging_step_orders_by_score_exactly(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    """A priority 9 waiter arriving 9 steps less 1 ms after a priority 0 one is ahead; at
    9 steps and 1 ms it is behind (the bound of the README)."""
    await seed(redis, keys, clock, devices=[],
               quotas=[QuotaSpec(user_id=u) for u in ("p0", "p9a", "p9b")])
    step = settings.queue_aging_step_ms
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        tasks = [waiting(client, "p0", "p0-1", pool="none")]
        await queued(client, "p0-1")
        clock.advance(9 * step - 1)
        tasks.append(waiting(client, "p9a", "p9-ahead", pool="none", priority=9))
        assert (await queued(client, "p9-ahead")).position == 1
        clock.advance(2)
        tasks.append(waiting(client, "p9b", "p9-behind", pool="none", priority=9))
        assert (await queued(client, "p9-behind")).position == 3
        assert [w.request_id for w in await queue(redis, keys, clock)] == [
            "p9-ahead", "p0-1", "p9-behind"]
        for user, rid in (("p0", "p0-1"), ("p9a", "p9-ahead"), ("p9b", "p9-behind")):
            assert isinstance(await client.cancel(rid, user), Cancelled)
        for task in tasks:
            got = await asyncio.wait_for(task, EVENT_TIMEOUT_S)
            assert isinstance(got, Failed) and got.reason == "cancelled"


async def test_a_wait_times_out_on_the_timer_tick_and_gives_its_hold_back(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[], quotas=[QuotaSpec(user_id="u")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        task = waiting(client, "u", "short", wait_seconds=5)
        await queued(client, "short")
        assert (await user_state(redis, keys, "u")).usage["devices"] == 1
        clock.advance(4_000)
        await tick_through_timers(redis, settings, clock)
        assert not task.done()
        clock.advance(1_000)
        await tick_through_timers(redis, settings, clock)
        got = await asyncio.wait_for(task, EVENT_TIMEOUT_S)
        assert isinstance(got, Failed) and got.reason == "timed_out", got
        state = await user_state(redis, keys, "u")
        assert state.usage["devices"] == 0 and state.holds == {}
        assert await queue(redis, keys, clock) == []
        assert await redis.zcard(keys.queue_deadline) == 0
        # the request again: its answer, kept
        again = await client.allocate("u", request_id="short", wait_seconds=5)
        assert again == got


async def test_cancel_a_waiting_request(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[], quotas=[QuotaSpec(user_id="u")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        task = waiting(client, "u", "w", pool="p", priority=3)
        await queued(client, "w")
        # devsched queue lists it (JSON, a table, the --pool filter)
        listed = orjson.loads(await devsched(settings, "queue", "--json"))["waiters"]
        assert [(w["position"], w["request_id"], w["user_id"], w["pool"], w["priority"])
                for w in listed] == [(1, "w", "u", "p", 3)]
        assert listed[0]["waited_ms"] >= 0
        table = await devsched(settings, "queue", "--pool", "p")
        header, row = table.splitlines()[:2]
        assert "WAITED_MS" in header and row.split()[:4] == ["1", "w", "u", "p"]
        assert orjson.loads(await devsched(settings, "queue", "--pool", "q", "--json")) == {
            "waiters": []}
        wrong_user = await client.cancel("w", "someone-else")
        assert isinstance(wrong_user, Failed) and wrong_user.reason == "not_found"
        done = await client.cancel("w", "u", request_id="c-1")
        assert isinstance(done, Cancelled) and done.cancel_request_id == "w"
        got = await asyncio.wait_for(task, EVENT_TIMEOUT_S)
        assert isinstance(got, Failed) and got.reason == "cancelled"
        assert await client.cancel("w", "u", request_id="c-1") == done  # its first answer
        late = await client.cancel("w", "u")
        assert isinstance(late, Failed) and late.reason == "not_found"
    state = await user_state(redis, keys, "u")
    assert state.usage["devices"] == 0 and state.holds == {}
    assert await redis.hlen(keys.waiters) == 0


async def test_per_user_cap_of_waiting_requests(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    cap = settings.queue_max_per_user
    await seed(redis, keys, clock, devices=[],
               quotas=[QuotaSpec(user_id="u", max_devices=cap + 5), QuotaSpec(user_id="v")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        tasks = [waiting(client, "u", f"w-{i}", pool="p") for i in range(cap)]
        for i in range(cap):
            await queued(client, f"w-{i}")
        over = await client.allocate("u", request_id="w-over", pool="p", wait_seconds=60)
        assert isinstance(over, Failed) and over.reason == "queue_full", over
        other = waiting(client, "v", "v-1", pool="p")  # another user is not capped by u's
        assert (await queued(client, "v-1")).position == cap + 1
        assert (await user_state(redis, keys, "u")).usage["devices"] == cap
        for i in range(cap):
            await client.cancel(f"w-{i}", "u")
        await client.cancel("v-1", "v")
        for task in (*tasks, other):
            await asyncio.wait_for(task, EVENT_TIMEOUT_S)
    assert (await user_state(redis, keys, "u")).usage["devices"] == 0


async def test_an_expiry_a_device_event_and_an_admin_add_feed_the_queue(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1", pool="p"),
                                            DeviceSpec(id="d2", pool="p")],
               quotas=[QuotaSpec(user_id="a"), QuotaSpec(user_id="b")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        short = await client.allocate("a", pool="p", duration_seconds=30)
        assert isinstance(short, Allocated)
        await send(redis, keys, {"type": "device.maintenance", "event_id": "m-1",
                                 "occurred_at_ms": clock.now_ms(), "device_id": "d2"})
        # expiry
        t1 = waiting(client, "b", "b-1", pool="p")
        await queued(client, "b-1")
        clock.advance(31_000)
        await tick_through_timers(redis, settings, clock)
        got = await asyncio.wait_for(t1, EVENT_TIMEOUT_S)
        assert isinstance(got, Allocated) and got.device.id == short.device.id
        # a device event bringing a device back
        t2 = waiting(client, "b", "b-2", pool="p")
        await queued(client, "b-2")
        await send(redis, keys, {"type": "device.status_changed", "event_id": "up-1",
                                 "occurred_at_ms": clock.now_ms(), "device_id": "d2",
                                 "status": "running"})
        got2 = await asyncio.wait_for(t2, EVENT_TIMEOUT_S)
        assert isinstance(got2, Allocated) and got2.device.id == "d2"
        # an admin add
        t3 = waiting(client, "a", "a-2", pool="p", min_cpu_cores=4)
        await queued(client, "a-2")
        await add_devices(redis, keys, clock, [DeviceSpec(id="small", pool="p", cpu_cores=2)])
        assert not t3.done() and (await stats(redis, keys)).free == 1  # does not fit
        await add_devices(redis, keys, clock, [DeviceSpec(id="big", pool="p", cpu_cores=8)])
        got3 = await asyncio.wait_for(t3, EVENT_TIMEOUT_S)
        assert isinstance(got3, Allocated) and got3.device.id == "big"
    assert await queue(redis, keys, clock) == []


async def test_the_same_request_while_waiting_is_one_waiter(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[], quotas=[QuotaSpec(user_id="u")])
    other = keys.reply("other-producer")
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        task = waiting(client, "u", "w", pool="p")
        await queued(client, "w")
        again = AllocateRequest(request_id="w", user_id="u", reply_to=other, pool="p",
                                wait_seconds=600)
        await redis.xadd(keys.requests, {"d": encoder.encode(again)})

        async def answered() -> bool:
            return bool(await redis.xlen(other))
        await wait_until(answered)
        (_id, fields), = await redis.xrange(other)
        notice = reply_decoder.decode(fields[b"d"])
        assert isinstance(notice, Queued) and notice.position == 1
        assert await redis.hlen(keys.waiters) == 1 and await redis.zcard(keys.queue) == 1
        state = await user_state(redis, keys, "u")
        assert state.usage["devices"] == 1 and state.quota["waiting"] == "1"
        await add_devices(redis, keys, clock, [DeviceSpec(id="d", pool="p")])
        got = await asyncio.wait_for(task, EVENT_TIMEOUT_S)
        assert isinstance(got, Allocated)
    state = await user_state(redis, keys, "u")
    assert state.usage["devices"] == 1 and len(state.allocations) == 1


async def test_wait_seconds_is_bounded_and_single_device_only(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[], quotas=[QuotaSpec(user_id="u")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        for body in ({"wait_seconds": 0}, {"wait_seconds": 3601},
                     {"wait_seconds": 5, "count": 2}):
            raw = orjson.dumps({"type": "allocate", "request_id": f"bad-{len(body)}-"
                                f"{body['wait_seconds']}", "user_id": "u",
                                "reply_to": client.reply_stream, **body})
            got = await client.send(orjson.loads(raw)["request_id"], raw)
            assert isinstance(got, Failed) and got.reason == "invalid_request", got


async def test_a_wait_ending_and_an_expiry_on_the_same_tick(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    """One timer call ends a wait, then expires an allocation: the device it frees still
    goes to the other waiter (the state machine found the count of waiters going wrong
    here once: read after the waiter left, the freed device stayed idle)."""
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d", pool="p", cpu_cores=1)],
               quotas=[QuotaSpec(user_id="a"), QuotaSpec(user_id="b")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        held = await client.allocate("a", pool="p", duration_seconds=30)
        assert isinstance(held, Allocated)
        stays = waiting(client, "b", "stays", pool="p")
        ends = waiting(client, "b", "ends", min_cpu_cores=2, wait_seconds=5)
        await queued(client, "stays")
        await queued(client, "ends")
        clock.advance(31_000)
        await tick_through_timers(redis, settings, clock)
        ended = await asyncio.wait_for(ends, EVENT_TIMEOUT_S)
        assert isinstance(ended, Failed) and ended.reason == "timed_out"
        got = await asyncio.wait_for(stays, EVENT_TIMEOUT_S)
        assert isinstance(got, Allocated) and got.device.id == "d", got
    assert (await stats(redis, keys)).free == 0
