"""Allocation strategies: each chooses as named on a crafted pool, through the real quota
and select stages, and a switch takes effect at the next batch without a restart.

Every pool here is built so that the strategy under test and resource_based (best fit)
choose differently, so a strategy that silently fell back to best fit fails its test.
The count of active allocations per host (what least_loaded and bin_pack weigh) is
checked against the devices allocations hold, and the audit finds it when it drifts.
"""

from __future__ import annotations

import asyncpg
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import text
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec
from stages.settings import Settings
from stages.tools.admin import set_strategy, stats, strategies, write_behind_drained
from stages.tools.audit import audit
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, wait_until


def dev(device_id: str, host: str, cpu: int, pool: str = "default") -> DeviceSpec:
    return DeviceSpec(id=device_id, host=host, pool=pool, cpu_cores=cpu, memory_mb=cpu * 1024)


async def allocated_device(client: Client, user: str, **fields: object) -> str:
    got = await client.allocate(user, **fields)  # type: ignore[arg-type]
    assert isinstance(got, Allocated), got
    return got.device.id


async def host_active(redis: Redis, keys: Keys) -> dict[str, int]:
    return {text(h): int(n) for h, n in (await redis.hgetall(keys.host_active)).items()
            if int(n)}


async def test_resource_based_takes_the_smallest_fitting_device(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[dev("big", "h1", 8), dev("fit", "h2", 4),
                                            dev("small", "h3", 2)],
               quotas=[QuotaSpec(user_id="u")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        assert await allocated_device(client, "u", min_cpu_cores=3) == "fit"
    assert (await stats(redis, keys)).strategy == "resource_based"


async def test_least_loaded_takes_a_device_on_the_host_with_fewest_allocations(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    # busy-1 is the best fit, but its host already runs an allocation; idle-2 is alone
    await seed(redis, keys, clock, devices=[
        dev("busy-0", "busy", 2), dev("busy-1", "busy", 2), dev("idle-1", "idle", 4),
        dev("tiny", "empty", 1),
    ], quotas=[QuotaSpec(user_id="u"), QuotaSpec(user_id="other")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        assert await allocated_device(client, "other", min_cpu_cores=2) == "busy-0"
        await set_strategy(redis, keys, "least_loaded")
        # "tiny" is on an empty host but too small: the fit rules still hold
        assert await allocated_device(client, "u", min_cpu_cores=2) == "idle-1"
        # now both hosts run one; the tie goes to the best fit
        assert await allocated_device(client, "u", min_cpu_cores=2) == "busy-1"
    assert await host_active(redis, keys) == {"busy": 2, "idle": 1}


async def test_bin_pack_fills_the_busiest_host_and_keeps_empty_hosts_free(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    # fresh-1 (an empty host) is the best fit; bin_pack goes where allocations already run
    await seed(redis, keys, clock, devices=[
        dev("packed-0", "packed", 8), dev("packed-1", "packed", 8), dev("fresh-1", "fresh", 2),
    ], quotas=[QuotaSpec(user_id="u")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        await set_strategy(redis, keys, "bin_pack")
        first = await allocated_device(client, "u")
        assert first == "fresh-1"  # nothing runs anywhere yet: the best fit
        released = await client.release(device_id=first, user_id="u")
        assert type(released).__name__ == "Released"
        assert await allocated_device(client, "u", min_cpu_cores=8) == "packed-0"
        assert await allocated_device(client, "u") == "packed-1"  # not the empty host's
        assert await allocated_device(client, "u") == "fresh-1"  # the host is full
    assert await host_active(redis, keys) == {"packed": 2, "fresh": 1}


async def test_round_robin_rotates_over_the_fitting_devices(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    # a is the best fit every time under resource_based; "small" never fits the requests
    await seed(redis, keys, clock, devices=[dev("a", "h", 4), dev("b", "h", 4), dev("c", "h", 8),
                                            dev("small", "h", 1)],
               quotas=[QuotaSpec(user_id="u")])
    await set_strategy(redis, keys, "round_robin")
    order = []
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        for _ in range(4):
            got = await client.allocate("u", min_cpu_cores=2)
            assert isinstance(got, Allocated), got
            order.append(got.device.id)
            await client.release(allocation_id=got.allocation_id, user_id="u")
    assert order == ["a", "b", "c", "a"]


async def test_affinity_prefers_the_users_last_device_then_its_host(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[
        dev("small-x", "x", 2), dev("mine", "home", 8), dev("neighbour", "home", 16),
    ], quotas=[QuotaSpec(user_id="u"), QuotaSpec(user_id="other"), QuotaSpec(user_id="new")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        # resource_based gives u "mine" (the only 8-core one), remembered as u's last
        assert await allocated_device(client, "u", min_cpu_cores=8) == "mine"
        await client.release(device_id="mine", user_id="u")
        await set_strategy(redis, keys, "affinity")
        # best fit would be small-x; affinity gives u its last device back
        assert await allocated_device(client, "u") == "mine"
        await client.release(device_id="mine", user_id="u")
        assert await allocated_device(client, "other", min_cpu_cores=8) == "mine"
        # its device is taken: a device on the same host
        assert await allocated_device(client, "u") == "neighbour"
        # a user with no history (and "other", whose last device is taken, on a host
        # with nothing free): the best fit
        assert await allocated_device(client, "new") == "small-x"


async def test_a_pool_strategy_overrides_the_global_one_and_switches_apply_at_once(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[
        dev("rr-a", "h", 2, pool="rr"), dev("rr-b", "h", 2, pool="rr"),
        dev("bf-a", "h", 2, pool="bf"), dev("bf-b", "h", 2, pool="bf"),
    ], quotas=[QuotaSpec(user_id="u")])

    async def twice(pool: str) -> list[str]:
        out = []
        for _ in range(2):
            got = await client.allocate("u", pool=pool)
            assert isinstance(got, Allocated), got
            out.append(got.device.id)
            await client.release(allocation_id=got.allocation_id, user_id="u")
        return out

    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        assert await twice("rr") == ["rr-a", "rr-a"]  # resource_based by default
        await set_strategy(redis, keys, "round_robin", pool="rr")
        assert await twice("rr") == ["rr-a", "rr-b"]  # the running workers switched
        assert await twice("bf") == ["bf-a", "bf-a"]  # other pools keep the global one
        await set_strategy(redis, keys, "resource_based", pool="rr")
        assert await twice("rr") == ["rr-a", "rr-a"]
    in_force = await strategies(redis, keys)
    assert in_force.strategy == "resource_based"
    assert in_force.pools == {"rr": "resource_based", "bf": "resource_based"}
    assert (await stats(redis, keys)).pool_strategies == {"rr": "resource_based"}


async def test_every_strategy_keeps_the_quota_caps(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    # only the 2-core device is within the user's per-device cap
    await seed(redis, keys, clock, devices=[dev("large", "empty", 8), dev("ok", "busy", 2),
                                            dev("busy-0", "busy", 1)],
               quotas=[QuotaSpec(user_id="u", max_cpu_per_device=2),
                       QuotaSpec(user_id="other")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        assert await allocated_device(client, "other", min_cpu_cores=1) == "busy-0"
        for name in ("least_loaded", "round_robin", "affinity", "bin_pack", "resource_based"):
            await set_strategy(redis, keys, name)
            got = await client.allocate("u", min_cpu_cores=2)
            assert isinstance(got, Allocated) and got.device.id == "ok", (name, got)
            await client.release(allocation_id=got.allocation_id, user_id="u")
            refused = await client.allocate("u", min_cpu_cores=2, model="none")
            assert isinstance(refused, Failed) and refused.reason == "no_available_devices"


async def test_host_counts_follow_allocations_and_the_audit_checks_them(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[dev(f"d{i}", f"h{i % 2}", 2) for i in range(4)],
               quotas=[QuotaSpec(user_id="u")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = [await client.allocate("u") for _ in range(3)]
        assert all(isinstance(g, Allocated) for g in got)
        assert sum((await host_active(redis, keys)).values()) == 3
        await client.release(allocation_id=got[0].allocation_id)  # type: ignore[union-attr]
    clock.advance(3_700_000)  # the others expire
    from tests.conftest import tick_through_timers
    await tick_through_timers(redis, settings, clock)
    assert await host_active(redis, keys) == {}
    await wait_until(lambda: write_behind_drained(redis, keys))
    assert (await audit(redis, keys, pg))["consistent"]
    await redis.hincrby(keys.host_active, "h1", 1)
    report = await audit(redis, keys, pg)
    assert not report["consistent"] and report["differences_by_kind"]["host"] == 1
    assert report["differences"][0]["id"] == "h1"
