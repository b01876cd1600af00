"""The model filter of allocation: ``model=`` takes only devices of that model.

Through the real quota and select stages: a request naming a model gets a device of
that model from whichever pool has one, even when a device of another model would
fit better; when no device of that model is free (or the model is unknown) it gets
``no_available_devices`` while other models stay free, and its hold is given back.
"""

from __future__ import annotations

from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import text
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec
from stages.settings import Settings
from stages.tools.admin import user_state
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed


async def device_field(redis: Redis, keys: Keys, device_id: str, field: str) -> str:
    value = await redis.hget(keys.device(device_id), field)
    assert value is not None, (device_id, field)
    return text(value)


async def test_allocation_with_a_model_takes_only_devices_of_that_model(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    # the p40 is the best fit for any request (the smallest); the k30s are in two pools
    await seed(redis, keys, clock, devices=[
        DeviceSpec(id="p40-small", model="p40", pool="a", cpu_cores=2, memory_mb=4096),
        DeviceSpec(id="k30-a", model="k30", pool="a", cpu_cores=8, memory_mb=16384),
        DeviceSpec(id="k30-b", model="k30", pool="b", cpu_cores=8, memory_mb=16384),
    ], quotas=[QuotaSpec(user_id="u1")])

    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        k30 = [await client.allocate("u1", model="k30") for _ in range(2)]
        assert all(isinstance(a, Allocated) for a in k30), k30
        taken = {a.device.id for a in k30 if isinstance(a, Allocated)}
        assert taken == {"k30-a", "k30-b"}  # both pools searched, the p40 never taken

        none_left = await client.allocate("u1", model="k30")
        assert isinstance(none_left, Failed) and none_left.reason == "no_available_devices"
        unknown = await client.allocate("u1", model="x1")
        assert isinstance(unknown, Failed) and unknown.reason == "no_available_devices"
        assert await device_field(redis, keys, "p40-small", "status") == "available"

        any_model = await client.allocate("u1")
        assert isinstance(any_model, Allocated) and any_model.device.id == "p40-small"

    for device_id in taken:
        assert await device_field(redis, keys, device_id, "model") == "k30"
    state = await user_state(redis, keys, "u1")
    assert state.usage["devices"] == 3 and state.holds == {}  # refusals hold nothing


async def test_a_model_request_takes_the_best_fit_among_that_model(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    # the p40 fits a 4-core request best of all; among the k30s, k30-fit does
    await seed(redis, keys, clock, devices=[
        DeviceSpec(id="p40", model="p40", cpu_cores=4, memory_mb=4096),
        DeviceSpec(id="k30-big", model="k30", cpu_cores=16, memory_mb=32768),
        DeviceSpec(id="k30-fit", model="k30", cpu_cores=4, memory_mb=8192),
    ], quotas=[QuotaSpec(user_id="u1")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("u1", model="k30", min_cpu_cores=4)
    assert isinstance(got, Allocated) and got.device.id == "k30-fit", got
