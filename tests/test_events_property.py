"""Property: any interleaving and redelivery of versioned events ends in the state of the
highest versions, and no allocation outlives what an event took away.

Hypothesis draws, for three devices and two users that hold allocations, a true
history of versioned events per sequence (a device's events; a user's ``user.*``;
a user's ``billing.*``), each event setting its entity's state outright: device
failed / maintenance / stopped / error / deleted / running / created; user suspended
/ activated / deleted; billing overdue / payment_success / recharged. It then
delivers them in any order, some twice (the same event id again), in batches of any
size, with allocate requests of both users between batches (each asking or not for
``replace_on_failure``, so some allocations move to another device when theirs goes
down), through the real quota, select and events stages on the real Redis (one script
call per batch, as in production). After every batch, read from Redis:

* each user's usage equals the sum over the user's active allocations, and no quota
  hold is left;
* no active allocation is on a device that is down (failed, maintenance, stopped,
  error, deleted), moved or not, or belongs to a user that is blocked (suspended,
  deleted, overdue); one that moved kept its allocated-at and expires-at;
* a device is in its free pool exactly when it is up and holds no allocation.

At the end, each device's and user's status is the one its highest versions say.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import redis_client, text
from pipeline.embedded import ServerUrls
from schemas.messages import DeviceSpec, QuotaSpec
from stages.context import StageContext
from stages.settings import Settings
from stages.state import mark_state
from stages.tools.admin import add_devices, delete_keys, parse_user_state, set_quotas
from tests.test_script_contract import Driver

DEVICES = ("d0", "d1", "d2")
SPARE = ("s0", "s1")
"""Devices no event names: allocations keep succeeding on them."""
USERS = ("a", "b")
DEVICE_KINDS = ("failed", "maintenance", "stopped", "error", "deleted", "running", "created")
USER_KINDS = ("suspended", "activated", "deleted")
BILLING_KINDS = ("overdue", "payment_success", "recharged")
DOWN = {"failed": "failed", "maintenance": "maintenance", "stopped": "stopped",
        "error": "error", "deleted": "deleted"}
BLOCKED = {"suspended", "deleted", "overdue"}


def device_event(device: str, kind: str, version: int) -> dict[str, Any]:
    base: dict[str, Any] = {"device_id": device, "version": version}
    if kind == "created":
        return {"type": "device.created", "pool": "p", **base}
    if kind in ("failed", "maintenance", "deleted"):
        return {"type": f"device.{kind}", **base}
    return {"type": "device.status_changed", "status": kind, **base}


def user_event(user: str, kind: str, version: int) -> dict[str, Any]:
    if kind in USER_KINDS:
        return {"type": f"user.{kind}", "user_id": user, "version": version}
    extra = {"amount": 10.0, "days": 2} if kind == "overdue" else {"amount": 10.0}
    return {"type": f"billing.{kind}", "user_id": user, "version": version, **extra}


def expected_device_status(history: list[str]) -> str | None:
    """None: up (available or allocated)."""
    return DOWN.get(history[-1]) if history else None


def expected_user_status(user_history: list[str], billing_history: list[str]) -> str:
    user_status = {"suspended": "suspended", "deleted": "deleted"}.get(
        user_history[-1] if user_history else "activated", "active")
    if user_status != "active":
        return user_status
    return "overdue" if billing_history and billing_history[-1] == "overdue" else "active"


histories = st.fixed_dictionaries({
    **{("device", d): st.lists(st.sampled_from(DEVICE_KINDS), max_size=4) for d in DEVICES},
    **{("user", u): st.lists(st.sampled_from(USER_KINDS), max_size=3) for u in USERS},
    **{("billing", u): st.lists(st.sampled_from(BILLING_KINDS), max_size=3) for u in USERS},
})


async def check_invariants(redis: Redis, driver: Driver) -> dict[str, Any]:
    """The invariants that hold after every batch; returns what it read."""
    k = driver.keys
    devices = {d: {text(a): text(b) for a, b in (await redis.hgetall(k.device(d))).items()}
               for d in DEVICES + SPARE}
    users = {u: parse_user_state(await redis.hgetall(k.user(u))) for u in USERS}
    active = {text(a) for a in await redis.zrange(k.expiry, 0, -1)}
    allocs = {aid: {text(a): text(b) for a, b in (await redis.hgetall(k.allocation(aid))).items()}
              for aid in active}
    free = {text(m) for m in await redis.zrange(k.free("p"), 0, -1)}
    listed = {text(m) for m in await redis.smembers(k.devices)}
    for u, state in users.items():
        mine = [a for a in allocs.values() if a["user_id"] == u]
        assert state.holds == {}, (u, state.holds)
        assert set(state.allocations) == {aid for aid, a in allocs.items() if a["user_id"] == u}
        assert state.usage == {
            "devices": len(mine), "cpu": sum(int(a["cpu_cores"]) for a in mine),
            "mem": sum(int(a["memory_mb"]) for a in mine),
            "sto": sum(int(a["storage_mb"]) for a in mine)}, (u, state.usage, mine)
        if state.quota["status"] in BLOCKED:
            assert not mine, f"{u} is {state.quota['status']} but holds {mine}"
    for d, dev in devices.items():
        status = dev["status"]
        holders = [aid for aid, a in allocs.items() if a["device_id"] == d]
        if status in DOWN.values():
            assert not holders and dev["alloc"] == "" and d not in free, (d, dev, holders)
        else:
            assert status == ("allocated" if holders else "available"), (d, dev, holders)
            assert (d in free) == (not holders)
            assert holders == ([dev["alloc"]] if dev["alloc"] else [])
        assert (d in listed) == (status != "deleted")
    return {"devices": devices, "users": users}


async def allocation_times(redis: Redis, driver: Driver) -> dict[str, tuple[bytes, ...]]:
    """Each active allocation's allocated-at and expires-at (a move keeps both)."""
    k = driver.keys
    return {text(aid): tuple(await redis.hmget(k.allocation(text(aid)), "allocated_at_ms",
                                               "expires_at_ms"))
            for aid in await redis.zrange(k.expiry, 0, -1)}


def test_any_order_and_redelivery_of_versioned_events_ends_at_the_highest_versions(
    servers: ServerUrls,
) -> None:
    base = replace(Settings.from_env().with_urls(servers.redis_url, servers.database_url),
                   batch_size=64)
    with asyncio.Runner() as runner:

        @hsettings(max_examples=60, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(history=histories, data=st.data())
        def check(history: dict[tuple[str, str], list[str]], data: st.DataObject) -> None:
            events: list[dict[str, Any]] = []
            for (family, entity), kinds in history.items():
                for version, kind in enumerate(kinds, 1):
                    ev = (device_event(entity, kind, version) if family == "device"
                          else user_event(entity, kind, version))
                    events.append({"event_id": f"{family}-{entity}-{version}", **ev})
            redelivered = [ev for ev in events if data.draw(st.booleans(), label="twice")]
            delivery = data.draw(st.permutations(events + redelivered), label="order")
            cuts = sorted(set(data.draw(st.lists(st.integers(0, len(delivery)), max_size=5),
                                        label="cuts")))
            batches = [delivery[i:j] for i, j in zip([0, *cuts], [*cuts, len(delivery)],
                                                     strict=True) if j > i]
            requests = data.draw(st.lists(st.sampled_from([*USERS, None]),
                                          min_size=len(batches), max_size=len(batches)),
                                 label="allocate between batches")
            flags = data.draw(st.lists(st.booleans(), min_size=len(batches) + 4,
                                         max_size=len(batches) + 4),
                                label="replace_on_failure (4 first allocations, then each)")
            runner.run(run_example(base, batches, requests, flags, history))

        check()


async def run_example(base: Settings, batches: list[list[dict[str, Any]]],
                      requests: list[str | None], replace_on_failure: list[bool],
                      history: dict[tuple[str, str], list[str]]) -> None:
    settings = replace(base, prefix=f"evp{uuid.uuid4().hex[:10]}")
    redis = redis_client(settings)
    clock = ManualClock()
    try:
        ctx = StageContext(redis=redis, settings=settings, clock=clock)
        driver = Driver(redis, ctx, clock)
        await driver.start()
        await mark_state(redis, driver.keys, by="test", now_ms=clock.now_ms())
        await add_devices(redis, driver.keys, clock,
                          [DeviceSpec(id=d, pool="p") for d in DEVICES + SPARE])
        await set_quotas(redis, driver.keys, clock, [QuotaSpec(user_id=u) for u in USERS])
        # each user holds devices before any event
        flags = iter(replace_on_failure)
        await driver.both(*(driver.allocate(u, f"{u}-start-{i}", replace_on_failure=next(flags))
                            for u in USERS for i in range(2)))
        started = await allocation_times(redis, driver)
        await check_invariants(redis, driver)
        for n, (batch, user) in enumerate(zip(batches, requests, strict=True)):
            clock.advance(1_000)
            await driver.through_events(*batch)
            await check_invariants(redis, driver)
            flag = next(flags)
            if user is not None:
                await driver.both(driver.allocate(user, f"{user}-{n}", replace_on_failure=flag))
                await check_invariants(redis, driver)
            times = await allocation_times(redis, driver)
            assert all(started.get(aid, t) == t for aid, t in times.items()), (started, times)
            started |= times
        seen = await check_invariants(redis, driver)
        for d in DEVICES:
            want = expected_device_status(history["device", d])
            got = seen["devices"][d]["status"]
            assert got == want if want else got in ("available", "allocated"), (d, got, want)
        for u in USERS:
            want_user = expected_user_status(history["user", u], history["billing", u])
            assert seen["users"][u].quota["status"] == want_user, (u, history)
    finally:
        await delete_keys(redis, settings.prefix)
        await redis.aclose()
