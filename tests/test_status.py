"""`devsched status`: every stream and group with lag and pending, and the health verdict.

On a running pipeline the command (run as the operator runs it) names every stream
and every stage's group with lag, pending, consumers and their idle time, the pools,
the jobs and the servers, and exits 0. Without workers, a hand-made state shows each
reason for "unhealthy" the thresholds name: a backlog past the lag limit (its lag,
pending and oldest pending age as made), dead letters growing, timers stalled.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from pipeline.clock import ManualClock, SystemClock
from pipeline.inspect import id_ms
from pipeline.runner import child_env
from pipeline.worker import ensure_group
from schemas.keys import (
    GROUP_BILL,
    GROUP_EVENTS,
    GROUP_NOTIFY,
    GROUP_PERSIST,
    GROUP_QUOTA,
    GROUP_SELECT,
    GROUP_TIMERS,
    Keys,
)
from schemas.messages import Allocated, DeviceSpec, QuotaSpec
from schemas.runtime import DeadLetter, dead_encoder
from stages.context import StageContext
from stages.settings import Settings
from stages.timers import add_tick
from stages.tools.client import Client
from stages.tools.status import collect, status_streams
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, tick_through_timers
from tests.test_dead_letters import devsched


@pytest.fixture
def clock() -> ManualClock:
    """Stream ids carry Redis's time: the test's clock starts at the real time."""
    return ManualClock(SystemClock().now_ms())


async def test_status_json_names_every_stream_and_group_on_a_running_pipeline(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="u1")])
    await tick_through_timers(redis, settings, clock)
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        assert isinstance(await client.allocate("u1"), Allocated)
    # the test's clock stands still, so its ticks age in real time: no stall verdict here
    code, report = await devsched(settings, "status", "--json",
                                  DEVSCHED_STATUS_STALL_TICKS="100000")
    assert report["problems"] == [] and report["healthy"], report["problems"]
    assert code == 0
    streams = {s["name"]: s for s in report["streams"]}
    assert list(streams) == status_streams(keys)
    groups = {(s["name"], g["name"]): g for s in report["streams"] for g in s["groups"]}
    expected = {(keys.requests, GROUP_QUOTA), (keys.admitted, GROUP_SELECT),
                (keys.changes, GROUP_PERSIST), (keys.changes, GROUP_BILL),
                (keys.changes, GROUP_NOTIFY), (keys.ticks, GROUP_TIMERS),
                (keys.job_requests, GROUP_TIMERS), (keys.events, GROUP_EVENTS)}
    assert expected <= set(groups)
    for key in expected:
        g = groups[key]
        assert {"lag", "pending", "oldest_pending_age_s", "behind_s"} <= set(g)
        assert g["consumers"] and all("idle_s" in c for c in g["consumers"])
    assert streams[keys.requests]["length"] >= 1
    assert streams[keys.requests]["oldest_age_s"] is not None
    assert [p["pool"] for p in report["pools"]] == ["default"]
    assert report["pools"][0]["devices"] == 2
    assert {j["name"] for j in report["timers"]["jobs"]} >= {"expire", "trim"}
    assert report["timers"]["last_tick_ms"] is not None
    assert report["servers"]["redis"]["version"]
    assert report["servers"]["postgresql"]["version"]
    assert set(report["write_behind"]["groups"]) == {GROUP_PERSIST, GROUP_BILL, GROUP_NOTIFY}
    assert report["dead_letters"]["total"] == 0


async def test_group_figures_lag_pending_oldest_pending_and_consumers(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await ensure_group(redis, keys.requests, GROUP_QUOTA)
    for i in range(5):
        await redis.xadd(keys.requests, {"d": f"r{i}"})
    got = await redis.xreadgroup(GROUP_QUOTA, "c1", {keys.requests: ">"}, count=2)
    first_read = id_ms(got[0][1][0][0])
    await add_tick(StageContext(redis=redis, settings=settings, clock=clock))

    report = await collect(redis, settings, clock)
    quota = next(g for s in report["streams"] for g in s["groups"]
                 if s["name"] == keys.requests)
    assert (quota["lag"], quota["pending"], quota["backlog"]) == (3, 2, 5)
    assert [c["name"] for c in quota["consumers"]] == ["c1"]
    assert quota["oldest_pending_age_s"] == round(max(0, clock.now_ms() - first_read) / 1000, 3)


def _with(problems: list[str], text: str) -> bool:
    return any(text in p for p in problems)


async def test_each_unhealthy_reason_is_named(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    settings = replace(settings, status_max_lag=3)
    report = await collect(redis, settings, clock)
    assert _with(report["problems"], "no timer tick yet")

    await ensure_group(redis, keys.requests, GROUP_QUOTA)
    for i in range(5):
        await redis.xadd(keys.requests, {"d": f"r{i}"})
    await add_tick(StageContext(redis=redis, settings=settings, clock=clock))
    letter = DeadLetter(stage="persist", stream=keys.changes, entry_id="1-0", error="boom",
                        deliveries=6, payload="x", at_ms=clock.now_ms())
    await redis.xadd(keys.dead, {"d": dead_encoder.encode(letter)})
    report = await collect(redis, settings, clock)
    assert _with(report["problems"], f"group quota on {keys.requests}: 5 entries not done")
    assert _with(report["problems"], "dead letters growing: 1 in the last")
    assert report["dead_letters"]["by_stage"] == {"persist": {"boom": 1}}
    assert not _with(report["problems"], "timers stalled")

    clock.advance(settings.tick_ms * (settings.status_stall_ticks + 1))
    report = await collect(redis, settings, clock)
    assert _with(report["problems"], "timers stalled")
    assert not report["healthy"]


def test_status_exits_1_when_unhealthy(settings: Settings) -> None:
    done = subprocess.run([sys.executable, "-m", "stages.tools.cli", "status"],
                          env=child_env(settings),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert "UNHEALTHY" in done.stdout and "no timer tick yet" in done.stdout
