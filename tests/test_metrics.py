"""The Prometheus metrics after a known load through every stage, in process.

The registry is process-wide, so each figure is read before and after the load and
the difference is checked. Known load: a seed (3 devices and 1 quota: 4 changes), 3
allocations and 1 release (4 requests, each admitted: 4 more changes), 1 expiry
through a timers tick (1 change), then 1 poison entry on the changes stream that
persist, bill and notify cannot decode. Each stage counts every entry it reads
(``consumed``: the poison once per delivery), every entry it handled and acked
(``handled``: never the poison), each failed delivery (``failed``), and moves the
poison to the dead stream once after ``max_deliveries`` (``dead_lettered``); the
expiry counts in ``scheduler_auto_release_total{reason="expired"}``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import (
    GROUP_BILL,
    GROUP_NOTIFY,
    GROUP_PERSIST,
    GROUP_QUOTA,
    GROUP_SELECT,
    GROUP_TIMERS,
    Keys,
)
from schemas.messages import Allocated, DeviceSpec, QuotaSpec, Released
from schemas.runtime import dead_decoder
from stages.settings import Settings
from stages.tools.admin import write_behind_drained
from stages.tools.client import Client
from stages.tools.jobs import control
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, tick_through_timers, wait_until

STAGES = (GROUP_QUOTA, GROUP_SELECT, GROUP_PERSIST, GROUP_BILL, GROUP_NOTIFY, GROUP_TIMERS)
WRITE_BEHIND = (GROUP_PERSIST, GROUP_BILL, GROUP_NOTIFY)
STAGE_COUNTERS = ("consumed", "handled", "failed", "dead_lettered")
MAX_DELIVERIES = 2


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Few deliveries before the dead stream, so the poison gets there quickly."""
    return replace(settings, max_deliveries=MAX_DELIVERIES)


def figures() -> dict[tuple[str, str], float]:
    """Every counter of every stage, and the expiries, as the registry has them now."""
    out = {
        (counter, stage): REGISTRY.get_sample_value(
            f"devsched_stage_{counter}_total", {"stage": stage}) or 0.0
        for counter in STAGE_COUNTERS for stage in STAGES
    }
    out["auto_release", "expired"] = REGISTRY.get_sample_value(
        "scheduler_auto_release_total", {"reason": "expired"}) or 0.0
    return out


async def settled_figures() -> dict[tuple[str, str], float]:
    """The figures once they hold still for 0.2 s: a worker counts a batch after handling
    it, so the reply to a request (a control command, a tick waited for) can arrive just
    before its stage counts it; read at that moment, the count would land in the next
    reading."""
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    last = figures()
    while True:
        await asyncio.sleep(0.2)
        now = figures()
        if now == last or time.monotonic() > deadline:
            return now
        last = now


async def dead_letters(redis: Redis, keys: Keys, n: int) -> bool:
    return await redis.xlen(keys.dead) >= n


async def test_stage_counters_and_expiries_after_a_known_load(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await tick_through_timers(redis, settings, clock)  # the ticker's first tick, handled
    # the changes stream is counted below: the trim job must leave it whole
    await control(redis, None, settings, clock, "trim", "pause")
    before = await settled_figures()

    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i}") for i in range(3)],
               quotas=[QuotaSpec(user_id="u1")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        short = await client.allocate("u1", duration_minutes=1)
        others = [await client.allocate("u1", duration_minutes=60) for _ in range(2)]
        assert all(isinstance(a, Allocated) for a in [short, *others]), (short, others)
        assert isinstance(others[0], Allocated)
        released = await client.release(allocation_id=others[0].allocation_id)
        assert isinstance(released, Released) and not released.already_released
    clock.advance(61_000)  # the short one is due
    await tick_through_timers(redis, settings, clock)
    await wait_until(lambda: write_behind_drained(redis, keys))
    good_changes = await redis.xlen(keys.changes)
    assert good_changes == 4 + 4 + 1

    await redis.xadd(keys.changes, {"d": b"not a change"})
    await wait_until(lambda: dead_letters(redis, keys, len(WRITE_BEHIND)))
    await wait_until(lambda: write_behind_drained(redis, keys))
    after = await settled_figures()

    letters = [dead_decoder.decode(f[b"d"]) for _, f in await redis.xrange(keys.dead)]
    assert sorted(letter.stage for letter in letters) == sorted(WRITE_BEHIND)
    assert {letter.deliveries for letter in letters} == {MAX_DELIVERIES + 1}
    delta = {key: after[key] - before[key] for key in before}
    expected = {("auto_release", "expired"): 1.0}
    # three allocations through quota and select; the release straight to select
    for stage, entries in ((GROUP_QUOTA, 3), (GROUP_SELECT, 4), (GROUP_TIMERS, 1)):
        expected.update({("consumed", stage): entries, ("handled", stage): entries,
                         ("failed", stage): 0, ("dead_lettered", stage): 0})
    for stage in WRITE_BEHIND:
        expected.update({
            ("consumed", stage): good_changes + MAX_DELIVERIES,  # the poison at each delivery
            ("handled", stage): good_changes,
            ("failed", stage): MAX_DELIVERIES,
            ("dead_lettered", stage): 1,
        })
    assert delta == expected
