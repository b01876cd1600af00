"""Bad input on the public request stream never stops the pipeline and is never lost.

Raw entries are XADDed to the requests stream while every stage runs. Each broken
request that names a reply stream of this deployment (``<prefix>:reply:<x>``) gets
exactly one typed ``Failed(reason="invalid_request")`` there, whose message names
the problem; one that names none gets a dead letter on ``Keys.dead`` with stage,
reason and payload. Afterwards a good request is still allocated and the quota
group has nothing pending. A producer with no pipeline behind it gets a typed
``timed_out`` instead of waiting forever.
"""

from __future__ import annotations

import orjson
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import GROUP_QUOTA, GROUP_SELECT, Keys
from schemas.messages import (
    Allocated,
    AllocateRequest,
    DeviceSpec,
    Failed,
    QuotaSpec,
    reply_decoder,
    request_decoder,
)
from schemas.runtime import DeadLetter, dead_decoder
from stages.settings import Settings
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, wait_until


def allocate(reply_to: str, **fields: object) -> dict[str, object]:
    return {"type": "allocate", "request_id": "r-1", "user_id": "u1", "reply_to": reply_to,
            **fields}


async def replies(redis: Redis, stream: str) -> list[object]:
    return [reply_decoder.decode(f[b"d"]) for _, f in await redis.xrange(stream)]


async def dead_letters(redis: Redis, keys: Keys) -> dict[str, DeadLetter]:
    """Dead letters by the id of the entry they replace."""
    letters = [dead_decoder.decode(f[b"d"]) for _, f in await redis.xrange(keys.dead)]
    return {letter.entry_id: letter for letter in letters}


async def quota_idle(redis: Redis, keys: Keys) -> bool:
    """Every request delivered to and acked by the quota group."""
    groups = {g["name"].decode(): g for g in await redis.xinfo_groups(keys.requests)}
    last = await redis.xrevrange(keys.requests, count=1)
    g = groups.get(GROUP_QUOTA)
    return g is not None and g["pending"] == 0 and g["last-delivered-id"] == last[0][0]


async def test_each_broken_request_with_a_reply_stream_gets_one_invalid_request_reply(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="u1")])
    too_big = settings.max_message_bytes + 1
    # case name -> (request, text the reply's message must contain)
    cases: dict[str, tuple[dict[str, object], str]] = {
        "unknown_type": ({**allocate(""), "type": "borrow"}, "`$.type`"),
        "missing_type": ({k: v for k, v in allocate("").items() if k != "type"},
                         "missing required field `type`"),
        "zero_duration": (allocate("", duration_minutes=0), "`$.duration_minutes`"),
        "negative_duration": (allocate("", duration_minutes=-5), "`$.duration_minutes`"),
        "duration_too_large": (allocate("", duration_minutes=525_601), "`$.duration_minutes`"),
        "missing_user_id": ({k: v for k, v in allocate("").items() if k != "user_id"},
                            "missing required field `user_id`"),
        "missing_request_id": ({k: v for k, v in allocate("").items() if k != "request_id"},
                               "missing required field `request_id`"),
        "unknown_field": (allocate("", colour="red"), "unknown field `colour`"),
        "duration_as_string": (allocate("", duration_minutes="60"), "`$.duration_minutes`"),
        "user_id_as_number": (allocate("", user_id=42), "`$.user_id`"),
        "request_id_as_number": (allocate("", request_id=7), "`$.request_id`"),
        "user_id_with_space": (allocate("", user_id="a b"), "`$.user_id`"),
        "oversized": (allocate("", model="x" * too_big), f"exceeds {settings.max_message_bytes}"),
        "release_naming_nothing": ({"type": "release", "request_id": "r-1", "reply_to": ""},
                                   "release needs allocation_id, device_id or allocation_ids"),
    }
    for name, (request, _) in cases.items():
        request["reply_to"] = keys.reply(name)
        await redis.xadd(keys.requests, {"d": orjson.dumps(request)})

    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        good = await client.allocate("u1")
    assert isinstance(good, Allocated), good  # the quota stage survived every case above

    for name, (request, problem) in cases.items():
        got = await replies(redis, keys.reply(name))
        assert len(got) == 1, (name, got)
        reply = got[0]
        assert isinstance(reply, Failed) and reply.reason == "invalid_request", (name, reply)
        assert problem in reply.message, (name, reply.message)
        sent_id = request.get("request_id")
        assert reply.request_id == (sent_id if isinstance(sent_id, str) else ""), (name, reply)
    assert await dead_letters(redis, keys) == {}
    await wait_until(lambda: quota_idle(redis, keys))
    assert (await redis.xpending(keys.requests, GROUP_QUOTA))["pending"] == 0
    assert (await redis.xpending(keys.admitted, GROUP_SELECT))["pending"] == 0
    assert await redis.zcard(keys.expiry) == 1


async def test_broken_request_without_a_reply_stream_is_dead_lettered_with_its_reason(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="u1")])
    foreign = "elsewhere:reply:x"
    huge = orjson.dumps({"type": "allocate", "model": "x" * (settings.max_message_bytes + 1)})
    # case name -> (fields of the entry, text the dead letter's error must contain)
    cases: dict[str, tuple[dict[str, bytes], str]] = {
        "malformed_json": ({"d": b'{"type": "allocate", "request_id": '}, "truncated"),
        "not_utf8": ({"d": b"\xff\xfe\x00"}, "malformed"),
        "json_array": ({"d": b"[1, 2]"}, "Expected `object`"),
        "no_d_field": ({"x": b"1"}, "invalid_request"),
        "missing_reply_to": (
            {"d": orjson.dumps({"type": "allocate", "request_id": "r-2", "user_id": "u1"})},
            "missing required field `reply_to`"),
        "reply_to_not_ours": ({"d": orjson.dumps(allocate(foreign, duration_minutes=0))},
                              "`$.duration_minutes`"),
        "reply_to_as_number": (
            {"d": orjson.dumps({**allocate(""), "reply_to": 5, "duration_minutes": 0})},
            "`$.reply_to`"),
        "release_naming_nothing": (
            {"d": orjson.dumps({"type": "release", "request_id": "r-3"})},
            "missing required field `reply_to`"),
        "oversized": ({"d": huge}, f"exceeds {settings.max_message_bytes}"),
    }
    ids = {}
    for name, (fields, _) in cases.items():
        ids[name] = (await redis.xadd(keys.requests, fields)).decode()

    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        good = await client.allocate("u1")
    assert isinstance(good, Allocated), good

    letters = await dead_letters(redis, keys)
    assert set(letters) == set(ids.values())
    for name, (fields, problem) in cases.items():
        letter = letters[ids[name]]
        assert letter.stage == GROUP_QUOTA and letter.stream == keys.requests, (name, letter)
        assert letter.error.startswith("invalid_request: "), (name, letter.error)
        assert problem in letter.error, (name, letter.error)
        raw = fields.get("d", b"")
        assert letter.payload == raw[:4096].decode("utf-8", "replace"), name
        assert letter.deliveries == 1
    assert not await redis.exists(foreign)
    await wait_until(lambda: quota_idle(redis, keys))
    assert (await redis.xpending(keys.requests, GROUP_QUOTA))["pending"] == 0


async def test_valid_request_naming_a_foreign_reply_stream_is_not_answered_there(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    """reply_to is the one key a producer chooses; it must not reach the pipeline's own
    streams (a reply there would be a poison change, and its EXPIRE would put a TTL on
    the changes stream and its consumer groups)."""
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="u1")])
    changes_before = await redis.xlen(keys.changes)
    entry = await redis.xadd(keys.requests, {"d": orjson.dumps(allocate(keys.changes))})

    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        good = await client.allocate("u1")
    assert isinstance(good, Allocated), good  # the only allocation: the foreign one was refused

    assert await redis.ttl(keys.changes) == -1
    kinds = [orjson.loads(f[b"d"]).get("kind") for _, f in await redis.xrange(keys.changes)]
    assert None not in kinds  # every entry is a change, none a reply
    assert len(kinds) == changes_before + 1
    letter = (await dead_letters(redis, keys))[entry.decode()]
    assert letter.stage == GROUP_QUOTA and "reply_to" in letter.error


async def test_client_without_a_pipeline_gets_timed_out(
    settings: Settings, redis: Redis, keys: Keys,
) -> None:
    """The request is sent and nobody answers it: the call ends with a typed
    ``timed_out`` after the timeout it was given (short here, so the test is quick;
    no pipeline runs, so no reply can come whatever the machine's speed)."""
    async with Client(settings) as client:
        got = await client.allocate("u1", request_id="r-1", timeout_s=0.3)
    assert isinstance(got, Failed) and got.reason == "timed_out", got
    assert got.request_id == "r-1" and got.message == "No reply within 0.3 s"
    # close() sends what was queued: the request is on the stream, unanswered
    [(_, fields)] = await redis.xrange(keys.requests)
    sent = request_decoder.decode(fields[b"d"])
    assert isinstance(sent, AllocateRequest) and sent.request_id == "r-1"
    assert not await redis.exists(keys.admitted)
