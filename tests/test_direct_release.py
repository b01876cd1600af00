"""Releases skip the quota hop: a producer may add a release straight to the admitted
stream, and select decides it with the same atomicity and idempotency.

How we know:
- the client's release never reaches the request stream (its entries are counted) and
  is answered; the same request id sent again, either way, gets the first answer;
- a release sent the old way, on the request stream, is still forwarded and answered;
- a release by allocation id leaves no stored answer: the allocation it closed names it
  (``released_by``) and is kept at least as long as the idempotency window, and the same
  request again gets its first answer from there, while another request for the same
  allocation is answered ``already_released`` (and that answer is kept); a release by
  device id keeps its answer, so that its request delivered again after the device went
  to someone else answers as before and leaves the new allocation active;
- what select gets straight from a producer is validated as quota validates it: a
  broken release, or any other kind of request, gets one ``invalid_request`` reply (or a
  dead letter when it names no reply stream of ours) and nothing is done (the allocation
  stays active); select's group is left with nothing pending.
"""

from __future__ import annotations

import orjson
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import GROUP_SELECT, Keys
from schemas.messages import (
    Allocated,
    DeviceSpec,
    Failed,
    QuotaSpec,
    Released,
    ReleasedBatch,
    reply_decoder,
)
from schemas.runtime import dead_decoder
from stages.settings import Settings
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, wait_until


async def select_idle(redis: Redis, keys: Keys) -> bool:
    """Every admitted entry delivered to and acked by the select group."""
    groups = {g["name"].decode(): g for g in await redis.xinfo_groups(keys.admitted)}
    last = await redis.xrevrange(keys.admitted, count=1)
    g = groups.get(GROUP_SELECT)
    return g is not None and g["pending"] == 0 and g["last-delivered-id"] == last[0][0]


async def test_a_release_goes_straight_to_select_and_is_answered_once(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}") for i in range(4)],
               quotas=[QuotaSpec(user_id="u1")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("u1")
        assert isinstance(got, Allocated), got
        requests_before = await redis.xlen(keys.requests)
        rel = await client.release(allocation_id=got.allocation_id, user_id="u1",
                                   request_id="rel-1")
        assert isinstance(rel, Released) and not rel.already_released
        assert await redis.xlen(keys.requests) == requests_before  # quota never saw it
        # the same request id again, straight or through quota: the first answer
        again = await client.release(allocation_id=got.allocation_id, user_id="u1",
                                     request_id="rel-1")
        assert again == rel
        via_quota = await client.send("rel-1", orjson.dumps({
            "type": "release", "request_id": "rel-1", "reply_to": client.reply_stream,
            "allocation_id": got.allocation_id, "user_id": "u1"}))
        assert via_quota == rel
        # the old way still works: a release on the request stream is forwarded
        second = await client.allocate("u1")
        assert isinstance(second, Allocated), second
        old_way = await client.send("rel-2", orjson.dumps({
            "type": "release", "request_id": "rel-2", "reply_to": client.reply_stream,
            "allocation_id": second.allocation_id}))
        assert isinstance(old_way, Released) and not old_way.already_released
        # a batch release goes straight too
        batch = [await client.allocate("u1") for _ in range(2)]
        ids = [a.allocation_id for a in batch if isinstance(a, Allocated)]
        assert len(ids) == 2
        before = await redis.xlen(keys.requests)
        done = await client.release_many(ids, user_id="u1")
        assert isinstance(done, ReleasedBatch), done
        assert await redis.xlen(keys.requests) == before
    await wait_until(lambda: select_idle(redis, keys))


async def test_a_release_is_answered_again_from_the_allocation_it_closed_or_from_its_kept_answer(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="u1")])
    kept = f"{keys.prefix}:{{pool}}:req:"
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("u1")
        assert isinstance(got, Allocated), got
        rel = await client.release(allocation_id=got.allocation_id, user_id="u1",
                                   request_id="rel-a")
        assert isinstance(rel, Released) and not rel.already_released, rel
        record = keys.allocation(got.allocation_id)
        assert await redis.hget(record, "released_by") == b"rel-a"
        assert await redis.ttl(record) >= min(settings.idempotency_ttl_s,
                                              settings.released_ttl_s) - 5
        assert not await redis.exists(kept + "rel-a")  # the allocation is the record
        clock.advance(7_000)  # a later delivery answers with the first one's times
        assert await client.release(allocation_id=got.allocation_id, user_id="u1",
                                    request_id="rel-a") == rel
        other = await client.release(allocation_id=got.allocation_id, request_id="rel-b")
        assert isinstance(other, Released) and other.already_released, other
        assert await redis.exists(kept + "rel-b")
        assert await client.release(allocation_id=got.allocation_id,
                                    request_id="rel-b") == other
        # by device id: the answer is kept, the device's next holder is not released
        second = await client.allocate("u1")
        assert isinstance(second, Allocated) and second.device.id == "d1", second
        by_device = await client.release(device_id="d1", request_id="rel-d")
        assert isinstance(by_device, Released), by_device
        assert by_device.allocation_id == second.allocation_id
        assert await redis.exists(kept + "rel-d")
        third = await client.allocate("u1")
        assert isinstance(third, Allocated) and third.device.id == "d1", third
        assert await client.release(device_id="d1", request_id="rel-d") == by_device
        assert await redis.hget(keys.allocation(third.allocation_id), "status") == b"allocated"
    await wait_until(lambda: select_idle(redis, keys))


async def test_what_a_producer_sends_to_select_is_validated_as_quota_would(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="u1")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("u1")
        assert isinstance(got, Allocated), got
        reply_to = client.reply_stream
        cases: dict[str, tuple[dict[str, object], str]] = {
            "naming_nothing": ({"type": "release", "request_id": "x1", "reply_to": reply_to},
                               "release needs allocation_id, device_id or allocation_ids"),
            "both_ways": ({"type": "release", "request_id": "x2", "reply_to": reply_to,
                           "allocation_id": got.allocation_id, "allocation_ids": ["a"]},
                          "allocation_ids excludes"),
            "an_allocate": ({"type": "allocate", "request_id": "x3", "user_id": "u1",
                             "reply_to": reply_to}, f"send this request to {keys.requests}"),
            "a_renew": ({"type": "renew", "request_id": "x4", "user_id": "u1",
                         "reply_to": reply_to, "allocation_id": got.allocation_id,
                         "extend_minutes": 5}, "only a release may be sent"),
            "unknown_field": ({"type": "release", "request_id": "x5", "reply_to": reply_to,
                               "allocation_id": got.allocation_id, "colour": "red"},
                              "unknown field `colour`"),
            "oversized": ({"type": "release", "request_id": "x6", "reply_to": reply_to,
                           "allocation_id": "a" * (settings.max_message_bytes + 1)},
                          f"exceeds {settings.max_message_bytes}"),
        }
        for request, _ in cases.values():
            await redis.xadd(keys.admitted, {"d": orjson.dumps(request)})
        # no reply stream of ours: a dead letter (never a write to a foreign stream)
        foreign = {"type": "release", "request_id": "x7", "reply_to": "elsewhere",
                   "allocation_id": got.allocation_id}
        foreign_id = await redis.xadd(keys.admitted, {"d": orjson.dumps(foreign)})

        async def answered() -> bool:
            return await redis.xlen(reply_to) >= 1 + len(cases)  # allocated + the cases

        await wait_until(answered)
        await wait_until(lambda: select_idle(redis, keys))
        replies = {r.request_id: r for r in
                   (reply_decoder.decode(f[b"d"]) for _, f in await redis.xrange(reply_to))}
        for (request, text) in cases.values():
            reply = replies[str(request["request_id"])]
            assert isinstance(reply, Failed) and reply.reason == "invalid_request", reply
            assert text in reply.message, (text, reply.message)
        letters = [dead_decoder.decode(f[b"d"]) for _, f in await redis.xrange(keys.dead)]
        assert [(d.entry_id, d.stage) for d in letters] == [(foreign_id.decode(), GROUP_SELECT)]
        assert "reply_to must start with" in letters[0].error
        assert await redis.xlen("elsewhere") == 0
        # nothing was done: the allocation is still there to release
        rel = await client.release(allocation_id=got.allocation_id, user_id="u1")
        assert isinstance(rel, Released) and not rel.already_released
