"""``quota_fail_open``: what happens to a user with no quota record.

Through the real quota and select stages. With the setting on, such a user is
admitted (a device is allocated and counted in the user's usage, and released as
usual); a user whose quota record refuses (suspended) is still refused, since the
setting is about a missing record only. With it off (the default) the user gets
``quota_exceeded`` and nothing changes: the device stays free, no usage is held.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec, Released
from stages.app import serve
from stages.settings import Settings
from stages.tools.admin import stats, user_state
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, seed


@asynccontextmanager
async def request_path(settings: Settings, clock: ManualClock) -> AsyncIterator[Client]:
    """The quota and select stages running with ``settings``, and a client of them."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(["quota", "select"], settings, clock, stop=stop,
                                     install_signals=False))
    try:
        async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
            yield client
    finally:
        stop.set()
        await asyncio.wait_for(task, EVENT_TIMEOUT_S)


async def test_fail_open_admits_a_user_without_a_quota_record(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="sus", status="suspended")])
    async with request_path(replace(settings, quota_fail_open=True), clock) as client:
        got = await client.allocate("stranger")
        assert isinstance(got, Allocated), got
        assert (await user_state(redis, keys, "stranger")).usage["devices"] == 1
        refused = await client.allocate("sus")  # a record that refuses still refuses
        assert isinstance(refused, Failed) and refused.reason == "user_suspended", refused
        released = await client.release(allocation_id=got.allocation_id)
        assert isinstance(released, Released), released
    state = await user_state(redis, keys, "stranger")
    assert state.usage == {"devices": 0, "cpu": 0, "mem": 0, "sto": 0} and state.holds == {}
    assert (await stats(redis, keys)).allocated_total == 1


async def test_fail_closed_refuses_a_user_without_a_quota_record_as_quota_exceeded(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    assert settings.quota_fail_open is False  # the default
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[])
    async with request_path(settings, clock) as client:
        got = await client.allocate("stranger")
    assert isinstance(got, Failed) and got.reason == "quota_exceeded", got
    assert got.message == "No quota configured for user stranger"
    assert (await user_state(redis, keys, "stranger")).usage["devices"] == 0
    assert await redis.zrange(keys.free("default"), 0, -1) == [b"d1"]
    assert (await stats(redis, keys)).allocated_total == 0
