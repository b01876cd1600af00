"""The producer client never drops an undecodable reply in silence.

With no pipeline running, only what the test writes on the client's reply stream can
answer a call. A reply that does not decode (garbage bytes, or valid JSON of a bad
shape) is counted in ``devsched_client_invalid_replies_total`` and logged with its
request id; when a lenient read finds that request id, the waiting call returns
``Failed(reason="invalid_reply")`` at once, long before its timeout would say
``timed_out``. The reader goes on: a good reply after a bad one still answers.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from schemas.keys import Keys
from schemas.messages import Failed
from stages.settings import Settings
from stages.tools.client import Client
from tests.conftest import wait_until

CALL_TIMEOUT_S = 120.0
"""The calls' own timeout: far beyond the test's guard, so a timed_out cannot pass."""
GUARD_S = 30.0
"""Upper bound on waiting for an answer that must come at once."""


def invalid_replies() -> float:
    return REGISTRY.get_sample_value("devsched_client_invalid_replies_total") or 0.0


async def sent(redis: Redis, keys: Keys, count: int) -> bool:
    """``count`` requests sent: on the request stream, or (releases) the admitted one."""
    return int(await redis.xlen(keys.requests)) + int(await redis.xlen(keys.admitted)) >= count


async def test_an_undecodable_reply_is_counted_logged_and_answers_its_call_at_once(
    settings: Settings, redis: Redis, keys: Keys, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="devsched.client")
    before = invalid_replies()
    async with Client(settings, timeout_s=CALL_TIMEOUT_S) as client:
        call = asyncio.create_task(client.allocate("u1", request_id="r-bad-reply"))
        await wait_until(lambda: sent(redis, keys, 1))  # the call now waits for its reply
        await redis.xadd(client.reply_stream, {"d": b"\xff\x00 not json"})
        await redis.xadd(client.reply_stream, {"d": orjson.dumps(
            {"type": "allocated", "request_id": "r-bad-reply", "device": "d1"})})
        reply = await asyncio.wait_for(call, GUARD_S)

        # the reader survived both: a good reply to the next call answers it
        good = asyncio.create_task(client.release(allocation_id="a1", request_id="r-good"))
        await wait_until(lambda: sent(redis, keys, 2))
        await redis.xadd(client.reply_stream, {"d": orjson.dumps(
            {"type": "failed", "request_id": "r-good", "reason": "not_found",
             "message": "Allocation a1 not found", "remaining_devices": None})})
        after_good = await asyncio.wait_for(good, GUARD_S)

    assert isinstance(reply, Failed) and reply.reason == "invalid_reply", reply
    assert reply.request_id == "r-bad-reply"
    assert "$.device" in reply.message  # the decode error says what was wrong
    assert isinstance(after_good, Failed) and after_good.reason == "not_found", after_good
    assert invalid_replies() - before == 2
    logged = [r for r in caplog.records if r.name == "devsched.client"]
    assert [getattr(r, "request_id", "absent") for r in logged] == [None, "r-bad-reply"]
    assert all(r.levelno == logging.ERROR for r in logged)
