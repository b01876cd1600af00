"""The smart strategy: its choices through the real quota and select stages given a model,
and the refresh_model job that learns the model from PostgreSQL.

Each pool is built so that smart and resource_based (best fit, then the smaller id)
choose differently, so a smart that fell back to best fit fails.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import asyncpg
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import text
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, QuotaSpec, Reserved
from stages.context import StageContext
from stages.jobs import JOBS, run_now
from stages.settings import Settings
from stages.smart import HistoryRow, SmartModel, build_model, write_model
from stages.tools.admin import set_strategy
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed


def dev(device_id: str, cpu: int, model: str) -> DeviceSpec:
    return DeviceSpec(id=device_id, host=f"h-{device_id}", cpu_cores=cpu,
                      memory_mb=cpu * 1024, model=model)


async def device_of(client: Client, user: str, **fields: object) -> str:
    got = await client.allocate(user, **fields)  # type: ignore[arg-type]
    assert isinstance(got, Allocated), got
    return got.device.id


async def test_smart_leaves_named_models_avoids_failing_devices_and_keeps_best_fit(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=[
        dev("a-tab", 2, "tablet"), dev("b-flaky", 2, "pixel"), dev("c-pix", 2, "pixel"),
        dev("d-pix4", 4, "pixel")], quotas=[QuotaSpec(user_id="u"), QuotaSpec(user_id="v")])
    await set_strategy(redis, keys, "smart")
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        # no model yet: as resource_based
        first = await device_of(client, "u", min_cpu_cores=2)
        assert first == "a-tab"
        await client.release(device_id=first)
        # tablets are wanted by name; b-flaky fails 5 times a day held: with u's typical
        # hour, a 20% risk
        await write_model(redis, keys, SmartModel(
            user_hold_s={"u": 3600, "v": 60}, device_fail_per_day={"b-flaky": 5.0},
            model_demand={"tablet": 0.5}))
        assert await device_of(client, "u", min_cpu_cores=2) == "c-pix"
        # a short session (v's typical minute) may take the flaky device: 0.3% risk
        assert await device_of(client, "v", min_cpu_cores=2) == "b-flaky"
        # left: a-tab (2 cores, wanted by name) and d-pix4: the size still comes first
        assert await device_of(client, "u", min_cpu_cores=2) == "a-tab"
        assert await device_of(client, "u", min_cpu_cores=2) == "d-pix4"


def test_build_model() -> None:
    rows = [HistoryRow("u", "d1", "pixel", 100, None, "released"),
            HistoryRow("u", "d1", "pixel", 300, None, "device_failed"),
            HistoryRow("u", "d2", "tablet", 200, "tablet", "released"),
            HistoryRow("w", "d2", "tablet", 50, None, "expired")]
    model = build_model(rows, {"d1": "pixel", "d2": "tablet", "d3": "tablet"}, 1000)
    assert model.user_hold_s == {"u": 200, "w": 50}
    assert model.device_fail_per_day == {"d1": 86_400 / (400 + 86_400)}
    # 200 s asked by name over 2 tablets x 1000 s
    assert model.model_demand == {"tablet": 0.1}


async def test_refresh_model_job_learns_from_postgresql(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    assert "refresh_model" in JOBS
    now = clock.now_ms()

    def at(ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, UTC)

    async with pg.acquire() as conn:
        for device, model in (("d1", "pixel"), ("d2", "tablet")):
            await conn.execute(
                "INSERT INTO devices (id, name, model, host, adb_host, adb_port, cpu_cores,"
                " memory_mb, storage_mb) VALUES ($1, $1, $2, 'h', '127.0.0.1', 5555, 2, 2048, 0)",
                device, model)
        rows = [("u", "d1", 600, None, "released"), ("u", "d1", 1200, None, "device_failed"),
                ("u", "d2", 1800, "tablet", "released"),
                # older than DEVSCHED_SMART_HISTORY_DAYS: not learnt
                ("old", "d2", 60, "tablet", "released")]
        for i, (user, device, held, asked, reason) in enumerate(rows):
            begin = now - (30 * 86_400_000 if user == "old" else 3_600_000 * (i + 2))
            meta = json.dumps({"requested_model": asked} if asked else {})
            await conn.execute(
                "INSERT INTO device_allocations (id, device_id, user_id, status, allocated_at,"
                " released_at, duration_seconds, metadata, end_reason)"
                " VALUES ($1, $2, $3, 'released', $4, $5, $6, $7::jsonb, $8)",
                uuid.uuid4(), device, user, at(begin), at(begin + held * 1000), held, meta,
                reason)
    ctx = StageContext(redis=redis, settings=settings, clock=clock, pg=pg)
    result = await run_now(ctx, "refresh_model", "r1")
    assert result.status == "succeeded", result
    stored = {text(k): text(v) for k, v in (await redis.hgetall(keys.smart_model)).items()}
    window = settings.smart_history_days * 86_400
    assert stored == {
        "u:u": "1200",
        "d:d1": f"{86_400 / (1800 + 86_400):.4f}",
        "m:tablet": f"{1800 / window:.4f}",
    }
    assert result.processed_count == 3


async def test_smart_fills_the_gap_before_a_booking_with_short_sessions_only(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    """Three equal devices; b-booked is booked 3 h from now, c-soon 30 min from now.
    resource_based gives a-free (the smaller id). With smart, a user whose typical session
    is 10 min takes the device booked soonest with twice that to spare (c-soon, then
    b-booked); a user with a typical 2 h session takes a-free (both bookings would cut a
    session like its usual one short)."""
    await seed(redis, keys, clock, devices=[
        dev("a-free", 2, "pixel"), dev("b-booked", 2, "pixel"), dev("c-soon", 2, "pixel")],
        quotas=[QuotaSpec(user_id=u) for u in ("s", "l", "r")])
    now = clock.now_ms()
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        for device, start in (("b-booked", now + 3 * 3_600_000), ("c-soon", now + 1_800_000)):
            got = await client.reserve("r", start, start + 3_600_000, device_id=device)
            assert isinstance(got, Reserved), got
        await write_model(redis, keys, SmartModel(user_hold_s={"s": 600, "l": 7200}))
        # resource_based ignores the bookings it does not run into
        assert await device_of(client, "s", min_cpu_cores=2, duration_seconds=600) == "a-free"
        await client.release(device_id="a-free")
        await set_strategy(redis, keys, "smart")
        # the short session fills the tightest gap it fits with room to spare
        assert await device_of(client, "s", min_cpu_cores=2, duration_seconds=600) == "c-soon"
        # another short one: c-soon is taken; b-booked's gap is next
        assert await device_of(client, "s", min_cpu_cores=2, duration_seconds=600) == "b-booked"
        await client.release(device_id="c-soon")
        await client.release(device_id="b-booked")
        # a long typical session (2 h) asking 20 min: both booked devices would cut a
        # session like its usual one short, so the unbooked device
        assert await device_of(client, "l", min_cpu_cores=2, duration_seconds=1200) == "a-free"
        # once a-free is taken, it falls back to a booked device that fits what it asked
        assert await device_of(client, "l", min_cpu_cores=2, duration_seconds=1200) in (
            "b-booked", "c-soon")
