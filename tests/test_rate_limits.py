"""Rate limits at admission: token buckets per user and per tenant, driven by the clock.

Through the real pipeline with the ManualClock: a user past its burst is refused
``rate_limited`` with the exact ``retry_after_ms`` the bucket's refill gives, and is
admitted again once the clock moved that far (not a millisecond before); a tenant's
bucket is shared by its users and leaves other tenants alone; a refused request id may
come back and be admitted (the refusal is not stored as its answer), while an answered
one repeated takes no token; releases are never limited; and with the limits off (the
default) the quota call carries no rate and no bucket key is ever written.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import msgspec
import pytest
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import text
from pipeline.worker import Entry
from schemas.keys import Keys
from schemas.messages import (
    Allocated,
    AllocateRequest,
    DeviceSpec,
    Failed,
    QuotaSpec,
    Released,
    reply_decoder,
)
from stages.app import serve
from stages.context import StageContext
from stages.quota import QuotaStage
from stages.settings import Settings
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed

DEVICES = [DeviceSpec(id=f"d{i}") for i in range(12)]
QUOTAS = [QuotaSpec(user_id=u) for u in ("alice", "bob", "carol", "dave")]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """User: 2 a second, bursts of 3; tenant: 1 a second, bursts of 4."""
    return replace(settings, rate_user_per_s=2.0, rate_user_burst=3, rate_tenant_per_s=1.0,
                   rate_tenant_burst=4)


def limited(reply: object) -> int:
    assert isinstance(reply, Failed) and reply.reason == "rate_limited", reply
    assert reply.retry_after_ms is not None
    return reply.retry_after_ms


async def test_a_user_past_its_burst_is_refused_until_its_bucket_refills(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        burst = [await client.allocate("alice") for _ in range(3)]
        assert all(isinstance(r, Allocated) for r in burst), burst
        refused = await client.allocate("alice", request_id="again")
        assert limited(refused) == 500  # one token at 2 a second
        assert "user alice" in refused.message  # type: ignore[union-attr]
        assert isinstance(await client.allocate("bob"), Allocated)  # bob has his own
        clock.advance(499)
        assert limited(await client.allocate("alice", request_id="again")) == 1
        clock.advance(1)
        # the same request id, refused before, is admitted now
        again = await client.allocate("alice", request_id="again")
        assert isinstance(again, Allocated), again
        # answered before: the stored answer, no token taken (the bucket is empty)
        repeat = await client.allocate("alice", request_id="again")
        assert isinstance(repeat, Allocated) and repeat.allocation_id == again.allocation_id
        # releases are not limited
        for reply in burst:
            assert isinstance(reply, Allocated)
            assert isinstance(await client.release(allocation_id=reply.allocation_id), Released)
        assert limited(await client.allocate("alice")) == 500
        clock.advance(10_000)  # the bucket fills up to its burst, no more
        assert [type(await client.allocate("alice")).__name__ for _ in range(4)] == [
            "Allocated", "Allocated", "Allocated", "Failed"]


async def test_a_tenants_bucket_is_shared_by_its_users(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = [await client.allocate(u, tenant_id="acme") for u in ("alice", "bob", "carol",
                                                                     "alice")]
        assert all(isinstance(r, Allocated) for r in got), got
        refused = await client.allocate("dave", tenant_id="acme")
        assert limited(refused) == 1000 and "tenant acme" in refused.message  # type: ignore[union-attr]
        # dave's own bucket was not touched by the refusal; another tenant is not limited
        assert isinstance(await client.allocate("dave", tenant_id="other"), Allocated)
        assert isinstance(await client.allocate("dave"), Allocated)
        clock.advance(1000)
        assert isinstance(await client.allocate("dave", tenant_id="acme"), Allocated)
        assert limited(await client.allocate("bob", tenant_id="acme")) == 1000


async def test_rate_limits_are_off_by_default_and_cost_no_bucket(
    redis: Redis, settings: Settings, clock: ManualClock, keys: Keys,
) -> None:
    default = Settings.from_env()
    assert (default.rate_user_per_s, default.rate_tenant_per_s) == (0, 0)
    off = replace(settings, rate_user_per_s=0.0, rate_tenant_per_s=0.0)
    assert QuotaStage(StageContext(redis=redis, settings=off, clock=clock)).rate is None
    on = QuotaStage(StageContext(redis=redis, settings=settings, clock=clock)).rate
    assert on is not None and (on.user_burst, on.tenant_burst) == (3, 4)
    only_user = replace(off, rate_user_per_s=2.5)
    rate = QuotaStage(StageContext(redis=redis, settings=only_user, clock=clock)).rate
    assert rate is not None and rate.tenant_per_s is None and rate.user_burst == 3


async def test_without_limits_many_requests_pass_and_write_no_bucket(
    redis: Redis, settings: Settings, clock: ManualClock, keys: Keys,
) -> None:
    off = replace(settings, rate_user_per_s=0.0, rate_tenant_per_s=0.0)
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(["quota", "select"], off, clock, stop=stop,
                                     install_signals=False))
    try:
        async with Client(off, timeout_s=EVENT_TIMEOUT_S) as client:
            replies = [await client.allocate("alice", tenant_id="acme") for _ in range(10)]
        assert all(isinstance(r, Allocated) for r in replies), replies
        assert not await redis.exists(keys.user_rate("alice"), keys.tenant_rate("acme"))
    finally:
        stop.set()
        await asyncio.wait_for(task, EVENT_TIMEOUT_S)


async def test_a_call_without_limits_right_after_one_with_them_takes_no_token(
    redis: Redis, settings: Settings, clock: ManualClock, keys: Keys,
) -> None:
    """On Redis 7 quota's functions are made once per library and read the call's limits
    from a variable set again at every call: two quota stages with different settings
    (two processes, one library) take turns, and a call with the limits off takes no
    token from a bucket the call before it used, while the next limited call still
    refuses (the bucket being empty)."""
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    limits_on = QuotaStage(StageContext(redis=redis, settings=settings, clock=clock))
    no_limits = replace(settings, rate_user_per_s=0.0, rate_tenant_per_s=0.0)
    limits_off = QuotaStage(StageContext(redis=redis, settings=no_limits, clock=clock))
    await redis.xgroup_create(keys.requests, limits_on.group, id="$", mkstream=True)
    reply_to = keys.reply("turns")

    async def one_call(stage: QuotaStage, request_id: str) -> None:
        request = AllocateRequest(request_id=request_id, user_id="alice", reply_to=reply_to)
        await redis.xadd(keys.requests, {"d": msgspec.json.encode(request)})
        read = await redis.xreadgroup(limits_on.group, "turns", {keys.requests: ">"}, count=1)
        [(stream, [(entry_id, fields)])] = read
        await stage.handle([Entry(text(stream), text(entry_id), fields)])

    for n in range(3):  # alice's burst
        await one_call(limits_on, f"on-{n}")
    tokens = await redis.hget(keys.user_rate("alice"), "tokens")
    await one_call(limits_off, "off")
    assert await redis.hget(keys.user_rate("alice"), "tokens") == tokens == b"0"
    await one_call(limits_on, "on-again")
    assert await redis.xlen(keys.admitted) == 4
    replies = [reply_decoder.decode(f[b"d"]) for _, f in await redis.xrange(reply_to)]
    assert [r.reason for r in replies if isinstance(r, Failed)] == ["rate_limited"]
