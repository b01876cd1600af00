"""Smoke tests of the benchmark harness: short runs against a null system and the real servers
(and the pipeline's batch point against the stages running in-process)."""

from __future__ import annotations

import asyncio
import os
import time

import asyncpg
import pytest
import redis.asyncio as aioredis

from benchmarks import baseline, ceiling, pipeline_sut, report, run, scriptcost, search, wakeup
from benchmarks.cpu import _ticks
from benchmarks.loadgen import (
    CycleFactory,
    CycleParts,
    LoadResult,
    make_sleep_cycle,
    run_closed,
    run_open,
)
from pipeline.clock import ManualClock
from pipeline.embedded import ServerUrls
from schemas.keys import Keys
from schemas.messages import DeviceSpec, QuotaSpec
from stages.settings import Settings
from stages.tools.admin import stats
from tests.conftest import RunningPipeline, seed

LONG_DRAIN_S = 30.0
"""Request timeout and drain of runs whose every cycle must finish: a run ends as soon as
they have, so this bound is only reached by a broken generator, never by a slow machine."""


async def test_open_loop_offers_the_rate_and_counts_errors_by_reason() -> None:
    result = await run_open(CycleFactory(make_sleep_cycle, (0.001, 10)), 400, 1.0,
                            request_timeout_s=LONG_DRAIN_S, drain_s=LONG_DRAIN_S)
    assert result.count == 400
    assert result.ok + result.errors["injected"] == 400
    assert result.errors["injected"] == 40
    assert result.ok == 360 and result.offered_per_s == 400


async def test_overloaded_system_yields_numbers_and_the_run_ends_by_itself() -> None:
    # 100 cycles due in 0.5 s, 50 slots each held for the 1 s timeout: the first 50 start
    # and the rest find no slot; every cycle started times out (the drain outlasts the
    # timeout), and the run ends when they have, not after the 30 s the cycles would take
    result = await run_open(CycleFactory(make_sleep_cycle, (30.0,)), 200, 0.5,
                            max_in_flight=50, request_timeout_s=1.0, drain_s=LONG_DRAIN_S)
    assert result.errors["overloaded"] > 0 and result.errors["timeout"] >= 50
    assert result.errors["overloaded"] + result.errors["timeout"] == result.count == 100
    assert result.ok == 0


def make_busy_cycle(cpu_s: float) -> CycleParts:
    """A cycle that spends ``cpu_s`` of CPU in the producer process itself."""

    async def nothing() -> None:
        return None

    async def cycle(i: int) -> str | None:
        until = time.process_time() + cpu_s
        while time.process_time() < until:
            pass
        return None

    return CycleParts(nothing, cycle, nothing)


async def test_the_report_says_how_busy_the_generator_was_and_how_late_it_began() -> None:
    # CPU time, not wall time: 200 cycles of 2 ms of CPU each are at least 0.4 s of CPU
    # in that producer however little of a core a busy machine gives it (a long drain
    # lets every cycle finish), and 200 sleeps of 2 ms cost it far less
    rate, duration_s = 200, 1.0
    busy = await run_open(CycleFactory(make_busy_cycle, (0.002,)), rate, duration_s,
                          drain_s=LONG_DRAIN_S)
    idle = await run_open(CycleFactory(make_sleep_cycle, (0.002,)), rate, duration_s,
                          drain_s=LONG_DRAIN_S)
    for result in (busy, idle):
        assert result.start_lag is not None
        assert result.start_lag.count == result.count == result.ok == 200
        assert 0.0 < result.generator_cpu_share <= 1.0
        # the share is that CPU over at least the schedule's span (plus its rounding)
        span_s = duration_s - 1 / rate
        assert result.generator_cpu_share <= result.generator_cpu_s / span_s + 0.001
    assert busy.generator_cpu_s >= 200 * 0.002
    assert idle.generator_cpu_s < busy.generator_cpu_s
    row = run._row(busy)
    assert row["generator_cpu_share"] == busy.generator_cpu_share
    assert row["start_lag_p99_ms"] == busy.start_lag.p99_ms


async def test_two_producer_processes_merge_their_histograms() -> None:
    result = await run_closed(CycleFactory(make_sleep_cycle, (0.002,)), 8, 0.5, processes=2,
                              request_timeout_s=LONG_DRAIN_S, drain_s=LONG_DRAIN_S)
    assert result.processes == 2
    assert result.ok == result.count > 0


def _point(rate: float, ok: bool) -> LoadResult:
    return LoadResult(
        mode="open", offered_per_s=rate, delivered_per_s=rate if ok else rate / 2,
        p50_ms=1.0, p90_ms=1.0, p99_ms=1.0, p999_ms=1.0, max_ms=1.0, count=int(rate),
        ok=int(rate), errors={}, duration_s=1.0, elapsed_s=1.0, processes=1)


async def test_search_doubles_then_bisects_to_the_highest_sustained_rate() -> None:
    capacity = 3000.0
    probed: list[float] = []

    async def measure(rate: float) -> LoadResult:
        probed.append(rate)
        return _point(rate, rate <= capacity)

    outcome = await search.find_max_sustainable(
        measure, [_point(500, True), _point(1000, True)], start_rate=500, upper_bound=None,
        max_points=10, bisections=3, deadline=time.monotonic() + 60, point_cost_s=0)
    assert probed[:2] == [2000, 4000]
    assert 2500 <= outcome.max_rate <= capacity
    assert all(r.offered_per_s in probed for r in outcome.probes)


async def test_search_stops_at_the_point_budget() -> None:
    async def measure(rate: float) -> LoadResult:
        return _point(rate, True)

    outcome = await search.find_max_sustainable(
        measure, [], start_rate=100, upper_bound=None, max_points=3, bisections=3,
        deadline=time.monotonic() + 60, point_cost_s=0)
    assert outcome.max_rate == 400
    assert outcome.bounded_by == "points"


async def test_search_makes_its_first_points_past_the_deadline() -> None:
    # the fixed points used the whole budget: the search still brackets the answer
    capacity = 700.0

    async def measure(rate: float) -> LoadResult:
        return _point(rate, rate <= capacity)

    outcome = await search.find_max_sustainable(
        measure, [_point(500, True), _point(1000, False)], start_rate=500, upper_bound=None,
        max_points=4, bisections=3, deadline=time.monotonic() - 1, point_cost_s=5,
        min_points=3)
    assert [r.offered_per_s for r in outcome.probes] == [750, 620, 680]
    assert outcome.max_rate == 680
    assert outcome.bounded_by == ""
    late = await search.find_max_sustainable(
        measure, [_point(500, True), _point(1000, False)], start_rate=500, upper_bound=None,
        max_points=4, bisections=3, deadline=time.monotonic() - 1, point_cost_s=5)
    assert late.max_rate == 500 and late.probes == [] and late.bounded_by == "deadline"


async def test_baseline_cycles_leave_every_device_free(servers: ServerUrls) -> None:
    await baseline.create(servers.database_url, devices=20, users=5)
    try:
        parts = baseline.make_cycle(servers.database_url, pool_size=2, users=5)
        await parts.setup()
        try:
            reasons = [await parts.cycle(i) for i in range(50)]
        finally:
            await parts.teardown()
        assert reasons == [None] * 50
        conn = await asyncpg.connect(servers.database_url)
        try:
            busy = await conn.fetchval(
                f"SELECT count(*) FROM {baseline.SCHEMA}.devices WHERE status <> 'available'")
            usage = await conn.fetchval(f"SELECT sum(devices) FROM {baseline.SCHEMA}.user_usage")
            released = await conn.fetchval(
                f"SELECT count(*) FROM {baseline.SCHEMA}.allocations WHERE status = 'released'")
        finally:
            await conn.close()
        assert (busy, usage, released) == (0, 0, 50)
    finally:
        await baseline.drop(servers.database_url)


async def test_baseline_refuses_beyond_the_quota(servers: ServerUrls) -> None:
    await baseline.create(servers.database_url, devices=5, users=1)
    try:
        conn = await asyncpg.connect(servers.database_url)
        try:
            await conn.execute(f"UPDATE {baseline.SCHEMA}.user_quotas SET max_devices = 2")
            first = await baseline.allocate(conn, 1, 1, 1024)
            second = await baseline.allocate(conn, 1, 1, 1024)
            third = await baseline.allocate(conn, 1, 1, 1024)
        finally:
            await conn.close()
        assert first[1] is None and second[1] is None
        assert third == (None, "quota:max_devices")
    finally:
        await baseline.drop(servers.database_url)


async def test_ceiling_chain_carries_messages_through_three_hops(servers: ServerUrls) -> None:
    chain = await ceiling.start_chain(servers.redis_url)
    try:
        result = await run_open(CycleFactory(ceiling.make_cycle, (servers.redis_url, chain.prefix)),
                                200, 1.0, request_timeout_s=LONG_DRAIN_S, drain_s=LONG_DRAIN_S)
        assert result.ok == result.count == 200
    finally:
        await ceiling.stop_chain(chain)
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        assert [key async for key in client.scan_iter(match=f"{chain.prefix}:*")] == []
    finally:
        await client.aclose()


async def test_request_path_floor_runs_both_hops_in_one_process(servers: ServerUrls) -> None:
    """The floor chain (the pipeline's two hops, one process) answers every message once
    through both hops, and its keys are gone after it stops."""
    url = servers.redis_url
    chain = await ceiling.start_chain(url, hops=run.FLOOR_HOPS, one_process=True)
    try:
        assert len(chain.workers) == 1
        result = await run_open(CycleFactory(ceiling.make_cycle, (url, chain.prefix)),
                                200, 1.0, request_timeout_s=LONG_DRAIN_S, drain_s=LONG_DRAIN_S)
        assert result.ok == result.count == 200
        client = aioredis.Redis.from_url(url)
        try:
            # two hop streams, each entry added once and acked by its group
            for stream in (f"{chain.prefix}:s0", f"{chain.prefix}:s1"):
                assert await client.xlen(stream) == 200
                groups = await client.xinfo_groups(stream)
                assert [g["pending"] for g in groups] == [0]
            assert await client.exists(f"{chain.prefix}:s2") == 0
        finally:
            await client.aclose()
    finally:
        await ceiling.stop_chain(chain)


async def test_a_busy_polled_floor_never_sleeps_and_answers_like_the_sleeping_one(
        servers: ServerUrls) -> None:
    """The floor chain kept awake spends its idle second running (the sleeping one next
    to nothing), answers every message through both hops, and benchmarks.wakeup reports
    both ways at each rate with their difference and leaves no key behind."""
    url = servers.redis_url
    with pytest.raises(ValueError):
        await ceiling.start_chain(url, busy_poll=True)  # several processes: not a setting
    ticks = {}
    for busy in (False, True):
        chain = await ceiling.start_chain(url, hops=run.FLOOR_HOPS, one_process=True,
                                          busy_poll=busy)
        try:
            await asyncio.sleep(0.5)
            pid = chain.workers[0].pid
            assert pid is not None
            before = _ticks()[pid][0]
            await asyncio.sleep(1.0)  # no message at all
            ticks[busy] = _ticks()[pid][0] - before
            result = await run_open(CycleFactory(ceiling.make_cycle, (url, chain.prefix)),
                                    100, 0.5, request_timeout_s=LONG_DRAIN_S,
                                    drain_s=LONG_DRAIN_S)
            assert result.ok == result.count == 50
        finally:
            await ceiling.stop_chain(chain)
    # clock ticks are 1/100 s: awake uses most of a core, asleep next to none
    assert ticks[True] >= 30 and ticks[False] <= 10, ticks

    client = aioredis.Redis.from_url(url)
    try:
        chains_before = {key async for key in client.scan_iter(match="bench:ceiling:*")}
    finally:
        await client.aclose()
    doc = await wakeup.measure(url, rates=(100.0,), seconds=0.5, repeat=1)
    [row] = doc["rates"]
    assert row["offered_per_s"] == 100.0 and doc["hops"] == run.FLOOR_HOPS
    for way in wakeup.WAYS:
        assert 0 < row[f"{way}_p50_ms"] <= row[f"{way}_p99_ms"]
    assert row["wakeup_p50_ms"] == round(row["sleeping_p50_ms"] - row["awake_p50_ms"], 3)
    assert "wake-up" in wakeup._table(doc)
    client = aioredis.Redis.from_url(url)
    try:
        left = {key async for key in client.scan_iter(match="bench:ceiling:*")}
        assert left <= chains_before  # both ways' chains deleted their keys
    finally:
        await client.aclose()


async def test_a_system_that_is_not_implemented_is_reported_as_skipped() -> None:
    async def not_ready() -> dict[str, object]:
        raise NotImplementedError("later")

    failures: list[str] = []
    entry = await run._guarded("pipeline", not_ready, failures)
    assert entry["skipped"] == "not implemented: later"
    assert entry["max_cycles_per_s"] is None and entry["latency"] == []
    assert failures == []


def test_quick_plan_is_short_and_rates_parse() -> None:
    plan = run.parse_args(["--quick", "--rates", "2000,500"])
    assert plan.rates == (500.0, 2000.0)
    assert plan.duration_s == 3.0
    assert plan.ceiling_rates == (run.TARGET_RATE,)  # the chain's floor at the target rate
    full = run.parse_args([])
    assert full.rates == run.FULL_RATES and full.ceiling_rates == run.FULL_RATES


def test_targets_put_the_bare_chain_floor_beside_the_latency_target() -> None:
    def row(rate: float, p50: float, p99: float) -> dict[str, float]:
        return {"offered_per_s": rate, "p50_ms": p50, "p99_ms": p99}

    doc = {
        "pipeline": {"latency": [row(500, 2.0, 6.0),
                                 {**row(1000, 5.0, 20.0), "allocate_p50_ms": 1.2,
                                  "allocate_p99_ms": 4.0}]},
        "ceiling": {"latency": [row(1000, 0.9, 3.5)]},
        "ratios": {"pipeline_vs_baseline": 4.5, "pipeline_vs_ceiling": 0.25},
    }
    got = run.targets(doc)
    lat = got["latency_at_1000_per_s"]
    assert (lat["allocate_p50_ms"], lat["allocate_p99_ms"], lat["met"]) == (1.2, 4.0, True)
    assert (lat["bare_chain_p50_ms"], lat["bare_chain_p99_ms"]) == (0.9, 3.5)
    assert got["pipeline_vs_baseline"]["met"] and not got["pipeline_vs_ceiling"]["met"]
    doc["ceiling"] = {"latency": []}  # no chain point at that rate: no floor claimed
    assert "bare_chain_p50_ms" not in run.targets(doc)["latency_at_1000_per_s"]


def test_targets_compare_allocate_per_request_with_the_baseline_at_the_same_rate() -> None:
    def row(rate: float, p50: float, p99: float) -> dict[str, float]:
        return {"offered_per_s": rate, "p50_ms": 9.0, "p99_ms": 30.0,
                "allocate_p50_ms": p50, "allocate_p99_ms": p99}

    doc = {
        "pipeline": {"latency": [row(250, 0.5, 1.0), row(500, 0.6, 3.0), row(1000, 0.8, 4.0)]},
        "baseline": {"latency": [row(250, 0.7, 2.0), row(500, 0.7, 1.5)]},
        "ceiling": {"latency": [{"offered_per_s": 1000, "p50_ms": 0.5, "p99_ms": 2.0}]},
        "ratios": {"pipeline_vs_baseline": 4.5, "pipeline_vs_ceiling": 0.6},
    }
    got = run.targets(doc)
    low = got["allocate_vs_baseline_at_250_per_s"]
    assert (low["p50_ratio"], low["p99_ratio"], low["met"]) == (0.7143, 0.5, True)
    mid = got["allocate_vs_baseline_at_500_per_s"]
    assert (mid["p99_ratio"], mid["met"]) == (2.0, False)  # p99 3.0 against 1.5
    assert got["floor_ratio_at_1000_per_s"] == {"target": 1.5, "measured": 2.0, "met": False}
    assert got["latency_at_1000_per_s"]["floor_ratio"] == 2.0
    table = {e["offered_per_s"]: e for e in got["allocate_by_rate"]}
    assert table[1000]["baseline_allocate_p50_ms"] is None  # not measured there: no ratio
    assert table[1000]["allocate_p50_vs_baseline"] is None
    assert "floor_ratio" not in table[250]
    text = report.render_table({"ratios": doc["ratios"], "targets": got})
    assert "floor_ratio_at_1000_per_s NOT met" in text and "(0.71x)" in text
    assert "request_path_floor_p50_ms" not in table[250]  # no floor measured: none claimed
    doc["ceiling"]["request_path_floor"] = {"latency": [
        {"offered_per_s": 250, "p50_ms": 0.45, "p99_ms": 0.9}]}
    got = run.targets(doc)
    table = {e["offered_per_s"]: e for e in got["allocate_by_rate"]}
    assert (table[250]["request_path_floor_p50_ms"], table[250]["request_path_floor_p99_ms"]) \
        == (0.45, 0.9)
    assert got["allocate_vs_baseline_at_250_per_s"]["request_path_floor_p50_ms"] == 0.45
    assert "request_path_floor_p50_ms" not in table[500]
    text = report.render_table({"ratios": doc["ratios"], "targets": got})
    assert "request path with no logic p50 0.45, p99 0.90" in text


async def test_the_generator_never_sends_before_the_intended_instant() -> None:
    """The schedule's waker (a timerfd on Linux) returns at or after each instant asked
    for, never before: a request is never sent early (lateness is measured, earliness
    would hide latency)."""
    from benchmarks.loadgen import _Waker

    waker = _Waker()
    try:
        start = time.perf_counter()
        for k in range(1, 40):
            instant = start + k * 0.00137
            await waker.until(instant)
            assert time.perf_counter() >= instant
        await waker.until(time.perf_counter() - 1.0)  # a past instant returns at once
    finally:
        waker.close()


def test_cpu_accounting_reads_processes_and_groups_them() -> None:
    """benchmarks.cpu reads every process' CPU ticks from /proc and names its group by
    the command line; this process is among them and its ticks only grow."""
    from benchmarks.cpu import _group, _ticks

    first = _ticks()[os.getpid()]
    sum(i * i for i in range(200_000))  # spend a little CPU
    second = _ticks()[os.getpid()]
    assert second[0] >= first[0] >= 0
    assert _group("/usr/bin/redis-server 127.0.0.1:6379") == "redis"
    assert _group("python -m stages.tools.cli worker quota select") == "request_path"
    assert _group("python -m stages.tools.cli worker --nice 5 persist bill notify timers") == (
        "write_behind")
    assert _group("postgres: postgres devsched 127.0.0.1(5000) idle") == "postgres"
    assert _group("bash") is None


async def test_a_point_reports_what_it_left_in_redis_per_1000_requests() -> None:
    """A system with a memory hook: used_memory after the point (and a second reset, the
    drain) minus before, over the requests (two per completed cycle), times 1,000; the
    table shows it in KiB."""
    readings = iter([1_000_000, 1_000_000 + 720 * 1024])
    resets: list[int] = []

    async def memory() -> int:
        return next(readings)

    async def nothing() -> None:
        resets.append(1)

    async def factory(_setting: int) -> CycleFactory:
        return CycleFactory(make_sleep_cycle, (0.001,))

    system = run.System("pipeline", "workers_per_stage", (1,), factory, nothing, nothing,
                        memory=memory)
    plan = run.parse_args(["--quick"])
    result = await run._point(plan, system, CycleFactory(make_sleep_cycle, (0.001,)), 360, 1.0)
    assert len(resets) == 2  # before the point, and the drain after it
    assert result.ok == 360
    assert result.redis_memory_bytes_per_1000_requests == round(720 * 1024 / 720 * 1000, 1)
    row = run._row(result)
    doc = {"pipeline": {"latency": [row], "redis_memory_bytes_per_1000_requests": 1024_000.0},
           "baseline": {"skipped": "not selected"}, "ceiling": {}}
    table = run.report.render_table(doc)
    assert "1,000.0 KiB kept per 1,000 requests" in table and "1,000.0" in table.splitlines()[-1]


async def test_the_batch_point_allocates_and_releases_whole_batches(
    pipeline: RunningPipeline, settings: Settings, redis: aioredis.Redis, keys: Keys,
    clock: ManualClock,
) -> None:
    """The pipeline's batch point: all_or_nothing batches of BATCH_COUNT devices through the
    real stages, each released whole; its row and the table's line carry p50/p99."""
    count = pipeline_sut.BATCH_COUNT
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"b{i}", cpu_cores=8,
                                                       memory_mb=16384) for i in range(3 * count)],
               quotas=[QuotaSpec(user_id="bu1", max_devices=50, total_cpu_cores=1000)])
    factory = CycleFactory(pipeline_sut.make_batch_cycle,
                           (settings.redis_url, settings.prefix, 1, 2, count))
    result = await run_open(factory, 20, 0.5, request_timeout_s=LONG_DRAIN_S,
                            drain_s=LONG_DRAIN_S)
    assert result.count == 10 and result.ok == 10, result.errors
    row = {"devices_per_request": count, **run._row(result)}
    assert row["allocate_p50_ms"] > 0 and row["allocate_p99_ms"] >= row["allocate_p50_ms"]
    assert (await stats(redis, keys)).free == 3 * count  # every batch given back
    table = report.render_table({"pipeline": {"batch_allocate": row, "latency": []}})
    assert f"pipeline batch of {count} devices at 20 requests/s: allocate p50" in table


async def test_the_handoff_point_times_a_release_to_the_waiters_reply(
    pipeline: RunningPipeline, settings: Settings, redis: aioredis.Redis, keys: Keys,
) -> None:
    """The pipeline's queue hand-off point: through the real stages, one cycle at a time, a
    waiter gets the pool's one device from a release; every cycle is timed (``handoff``)
    and gives the device back; the JSON row and the table's line carry p50/p99."""
    handle = pipeline_sut.PipelineHandle(factory=CycleFactory(int), workers_per_stage=1,
                                         state=pipeline_sut._State(settings, None, 1))  # type: ignore[arg-type]
    await pipeline_sut.prepare_handoff(handle)
    result = await run_closed(pipeline_sut.handoff_factory(handle), 1, 0.5,
                              request_timeout_s=LONG_DRAIN_S, drain_s=LONG_DRAIN_S)
    assert result.count >= 1 and result.ok == result.count, result.errors
    row = run._row(result)
    assert row["handoff_p50_ms"] > 0 and row["handoff_p99_ms"] >= row["handoff_p50_ms"]
    assert result.marks["handoff"].count == result.count
    assert (await stats(redis, keys)).free == 1  # the device given back each time
    assert await redis.zcard(keys.queue) == 0
    table = report.render_table({"pipeline": {"queue_handoff": row, "latency": []}})
    assert f"pipeline queue hand-off (a release to the waiting request's reply), " \
           f"{result.count} cycles: p50" in table


async def test_script_cost_goes_through_quota_and_select_and_leaves_no_keys(
        servers: ServerUrls) -> None:
    """Every allocate of each batch size is admitted, allocated and released through the
    real stages, each kind is timed per row from Redis's own counts, and the tool's keys
    are gone afterwards."""
    doc = await scriptcost.measure(servers.redis_url, rows=12, batches=(1, 4))
    for batch, calls in (("1", 12), ("4", 3)):
        result = doc["batches"][batch]
        assert result["allocated"] == 12
        for kind in ("quota_admit", "select_allocate", "select_release"):
            assert result[kind]["rows"] == 12 and result[kind]["calls"] == calls
            assert result[kind]["us_per_row"] > 0
        # an allocate takes one device off a free pool and adds its reply and change
        assert result["select_allocate"]["commands_per_row"]["zrem"] == 1.0
        assert result["select_release"]["commands_per_row"]["zadd"] == 1.0
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        assert [key async for key in client.scan_iter(match="scriptcost*")] == []
    finally:
        await client.aclose()
