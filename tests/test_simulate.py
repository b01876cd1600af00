"""Traces and the simulator: a hand-made trace's figures equal a hand computation, the
generator is reproducible, the CLI prints the table, the JSON line and a PNG, and a
trace recorded from a run of the pipeline replays.

The hand-made trace (3 devices, 2 hosts, 1000 s) under resource_based, step by step:
  t=0    r1 a cpu2 -> d-s1 (best fit; d-s1 before d-s2), kept 600 s: 0..600
  t=100  r2 b cpu2 -> d-s2, kept 200 s: 100..300
  t=200  r3 c cpu4 -> d-big, kept 700 s: 200..900
  t=250  r4 a cpu2 -> nothing free: refused no_available_devices, nothing free in total
  t=320  d-s2 fails (it is free); t=640 it recovers
  t=650  r5 b cpu4 -> d-big busy; d-s1 and d-s2 free, 2 + 2 cores >= 4: refused, and
         counted in fragmentation
  t=700  r6 a cpu8, wait 600 s -> queued; at 900 r3 lets d-big go and r6 gets it (wait
         200 s), kept 50 s: 900..950
  t=800  c books a cpu2 device for [900, 990): d-s1 (best fit, free then); at 900 it
         becomes an allocation, c claims it, it runs to its end: 90 s, completed
Served device-seconds 600 + 200 + 700 + 50 + 90 = 1640 of 3 x 1000: utilisation 0.5467;
refused 2; fragmentation 1; queued 1 with p50 = p99 = 200 000 ms. Asked per user (the
releases' lengths): a 600 + 100 + 50 = 750, served 650; b 200 + 100 = 300, served 200;
c 700, served 700.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import Keys
from schemas.messages import (
    Allocated,
    Claimed,
    DeviceSpec,
    QuotaSpec,
    ReservationCancelled,
    Reserved,
)
from schemas.trace import (
    TraceDevice,
    TraceDeviceEvent,
    TraceHeader,
    TraceRelease,
    TraceRequest,
    TraceReservation,
)
from stages.settings import Settings
from stages.tools import cli
from stages.tools.admin import write_behind_drained
from stages.tools.client import Client
from stages.tools.simulate import jain, percentile, simulate
from stages.tools.trace import (
    GenerateOptions,
    Trace,
    TraceError,
    generate,
    parse_trace,
    read_trace,
    record,
    write_trace,
)
from tests.conftest import (
    EVENT_TIMEOUT_S,
    RunningPipeline,
    seed,
    tick_through_timers,
    wait_until,
)

S = 1_700_000_000_000


async def _queued(redis: Redis, keys: Keys) -> bool:
    return bool(await redis.zcard(keys.queue))


def hand_trace() -> Trace:
    def req(t: int, rid: str, user: str, cpu: int, **kw: object) -> TraceRequest:
        return TraceRequest(at_ms=S + t * 1000, request_id=rid, user_id=user,
                            min_cpu_cores=cpu, duration_seconds=3600, **kw)  # type: ignore[arg-type]

    def rel(t: int, rid: str) -> TraceRelease:
        return TraceRelease(at_ms=S + t * 1000, request_id=rid)

    return Trace(
        TraceHeader(source="hand", start_ms=S, end_ms=S + 1_000_000),
        [TraceDevice(id="d-big", host="h1", cpu_cores=8, memory_mb=8192),
         TraceDevice(id="d-s1", host="h1", cpu_cores=2, memory_mb=2048),
         TraceDevice(id="d-s2", host="h2", cpu_cores=2, memory_mb=2048)],
        [req(0, "r1", "a", 2), req(100, "r2", "b", 2), req(200, "r3", "c", 4),
         req(250, "r4", "a", 2), rel(300, "r2"),
         TraceDeviceEvent(at_ms=S + 320_000, device_id="d-s2", event="failed"),
         rel(350, "r4"), rel(600, "r1"),
         TraceDeviceEvent(at_ms=S + 640_000, device_id="d-s2", event="recovered"),
         req(650, "r5", "b", 4), req(700, "r6", "a", 8, wait_seconds=600), rel(750, "r5"),
         rel(750, "r6"),
         TraceReservation(at_ms=S + 800_000, reservation_id="b1", user_id="c",
                          start_ms=S + 900_000, end_ms=S + 990_000, min_cpu_cores=2),
         rel(900, "r3")])


async def test_a_hand_made_trace_replays_to_the_hand_computed_figures(
    redis: Redis, settings: Settings, tmp_path: Path,
) -> None:
    path = tmp_path / "hand.jsonl"
    write_trace(path, hand_trace())
    trace = read_trace(path)  # through the file format
    # smart without a model chooses as resource_based: the same figures
    for result in await simulate(redis, settings, trace, ["resource_based", "smart"]):
        assert result.utilisation == round(1640 / 3000, 4) == 0.5467
        assert result.refused == 2
        assert result.refused_by_reason == {"no_available_devices": 2}
        assert result.fragmentation == 1
        assert result.requests == 6 and result.served == 4
        assert result.queued == 1
        assert result.wait_p50_ms == result.wait_p99_ms == 200_000
        assert result.fairness == round(jain([650 / 750, 200 / 300, 1.0]), 4)
        assert result.unsupported == 0
        assert result.reservations == {
            "trace": 1, "booked": 1, "refused": 0, "refused_by_reason": {}, "activated": 1,
            "claimed": 1, "no_show": 0, "completed": 1, "cancelled": 0,
            "cancelled_at_start": 0, "refused_for_bookings": 0, "device_s": 90.0}
        assert result.interrupted == 0
        assert 0 < result.spread <= 1 and 0 <= result.hosts_whole <= 1
    # the replay left nothing behind in Redis
    assert not [k async for k in redis.scan_iter(match=f"{settings.prefix}-sim-*")]


async def test_a_device_failure_under_use_ends_the_session_as_interrupted(
    redis: Redis, settings: Settings,
) -> None:
    trace = Trace(
        TraceHeader(source="hand", start_ms=S, end_ms=S + 100_000),
        [TraceDevice(id="d1", host="h1", cpu_cores=2, memory_mb=2048)],
        [TraceRequest(at_ms=S, request_id="r1", user_id="a", duration_seconds=60),
         TraceDeviceEvent(at_ms=S + 10_000, device_id="d1", event="failed"),
         TraceRequest(at_ms=S + 20_000, request_id="r2", user_id="a", duration_seconds=60),
         TraceRelease(at_ms=S + 50_000, request_id="r1")])
    [result] = await simulate(redis, settings, trace, ["resource_based"])
    # r1 held 10 s, then the failure; r2 finds the only device down
    assert result.interrupted == 1
    assert result.utilisation == 0.1
    assert result.refused_by_reason == {"no_available_devices": 1}
    assert result.fragmentation == 0


async def test_reservations_replay_to_the_hand_computed_figures(
    redis: Redis, settings: Settings,
) -> None:
    """Two cpu2 devices d1 (h1), d2 (h2), 2000 s, DEVSCHED_RESERVATION_GRACE_S 100:
      t=0    A (u1) books [500, 800): d1 (best fit, then the smaller id); shows up,
             releases at 700
      t=10   B (u2) books [500, 900): d2 (d1 is booked then); never shows up
      t=20   C (u3) asks [600, 700): both devices booked then -> refused ``overlaps``
      t=30   D (u3) books [1500, 1600): d1; cancelled at 1000
      t=100  r1 (u4) cpu2 for 600 s: both free devices are booked from 500 -> refused
             no_available_devices, counted in refused_for_bookings (not fragmentation)
      t=200  r2 (u4) cpu2 for 200 s: d1 (free of bookings until 500), released at 350
      t=500  A and B become allocations; A is claimed at once
      t=600  B's grace is over: no_show, d2 freed
      t=700  A released: completed at the next tick (800); 200 s held
      t=1000 D cancelled
      t=1100 r3 (u4) cpu2 for 600 s: d1 (D's booking is gone), released at 1200
    Served 150 + 100 + 200 (A; B's unclaimed 100 s do not count) = 450 of 2 x 2000."""
    def at(t: int) -> int:
        return S + t * 1000

    def rsv(t: int, name: str, user: str, begin: int, end: int,
            **kw: object) -> TraceReservation:
        return TraceReservation(at_ms=at(t), reservation_id=name, user_id=user,
                                start_ms=at(begin), end_ms=at(end), min_cpu_cores=2,
                                **kw)  # type: ignore[arg-type]

    def req(t: int, rid: str, seconds: int) -> TraceRequest:
        return TraceRequest(at_ms=at(t), request_id=rid, user_id="u4", min_cpu_cores=2,
                            duration_seconds=seconds)

    trace = parse_trace(_lines(Trace(
        TraceHeader(source="hand", start_ms=S, end_ms=at(2000)),
        [TraceDevice(id="d1", host="h1", cpu_cores=2, memory_mb=2048),
         TraceDevice(id="d2", host="h2", cpu_cores=2, memory_mb=2048)],
        [rsv(0, "A", "u1", 500, 800, released_at_ms=at(700)),
         rsv(10, "B", "u2", 500, 900, showed_up=False),
         rsv(20, "C", "u3", 600, 700),
         rsv(30, "D", "u3", 1500, 1600, cancelled_at_ms=at(1000)),
         req(100, "r1", 600), req(200, "r2", 200),
         TraceRelease(at_ms=at(350), request_id="r2"),
         req(1100, "r3", 600), TraceRelease(at_ms=at(1200), request_id="r3")])))
    grace = replace(settings, reservation_grace_s=100)
    for result in await simulate(redis, grace, trace, ["resource_based", "smart"]):
        assert result.reservations == {
            "trace": 4, "booked": 3, "refused": 1, "refused_by_reason": {"overlaps": 1},
            "activated": 2, "claimed": 1, "no_show": 1, "completed": 1, "cancelled": 1,
            "cancelled_at_start": 0, "refused_for_bookings": 1, "device_s": 200.0}
        assert result.requests == 3 and result.served == 2
        assert result.refused_by_reason == {"no_available_devices": 1}
        assert result.fragmentation == 0
        assert result.unsupported == 0
        assert result.utilisation == round(450 / 4000, 4)
    assert not [k async for k in redis.scan_iter(match=f"{settings.prefix}-sim-*")]


def _lines(trace: Trace) -> list[bytes]:
    from stages.tools.trace import iter_lines

    return list(iter_lines(trace))


def test_statistics_helpers() -> None:
    assert percentile([], 99) == 0.0
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert jain([1.0, 1.0]) == 1.0
    assert jain([1.0, 0.0]) == 0.5


def test_generate_is_reproducible_and_realistic(tmp_path: Path) -> None:
    options = GenerateOptions(days=2, seed=7)
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    write_trace(a, generate(options))
    write_trace(b, generate(options))
    write_trace(c, generate(GenerateOptions(days=2, seed=8)))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    trace = read_trace(a)
    requests = [r for r in trace.records if isinstance(r, TraceRequest)]
    kinds = {type(r).__name__ for r in trace.records}
    assert kinds == {"TraceRequest", "TraceRelease", "TraceDeviceEvent", "TraceReservation"}
    # diurnal: more arrivals in the afternoon than at night
    hours = [((r.at_ms - trace.header.start_ms) // 3_600_000) % 24 for r in requests]
    assert sum(1 for h in hours if 12 <= h < 16) > 3 * sum(1 for h in hours if h < 4)
    # heavy users: the busiest tenth of the users sends far more than a tenth
    per_user: dict[str, int] = {}
    for r in requests:
        per_user[r.user_id] = per_user.get(r.user_id, 0) + 1
    top = sorted(per_user.values(), reverse=True)[:4]
    assert sum(top) > 0.25 * len(requests)
    # heavy tailed sessions: the longest is many times the median
    asked = {r.request_id: r.at_ms for r in requests}
    holds = sorted(r.at_ms - asked[r.request_id] for r in trace.records
                   if isinstance(r, TraceRelease))
    assert holds[-1] > 8 * holds[len(holds) // 2]
    assert len({(d.cpu_cores, d.model) for d in trace.devices}) >= 5


def test_a_bad_trace_is_refused_with_its_line() -> None:
    header = b'{"kind":"header","source":"hand","start_ms":0,"end_ms":10}'
    device = b'{"kind":"device","id":"d","host":"h","cpu_cores":1,"memory_mb":1}'
    with pytest.raises(TraceError, match="line 1"):
        parse_trace([device])
    with pytest.raises(TraceError, match="line 3"):
        parse_trace([header, device, b'{"kind":"request","at_ms":1}'])
    with pytest.raises(TraceError, match="line 4: at_ms 1 before"):
        parse_trace([header, device,
                     b'{"kind":"release","at_ms":5,"request_id":"r"}',
                     b'{"kind":"release","at_ms":1,"request_id":"r"}'])


def test_the_cli_generates_and_simulates_with_json_and_png(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("DEVSCHED_PREFIX", settings.prefix)
    out, png = tmp_path / "t.jsonl", tmp_path / "t.png"
    assert cli.main(["trace", "generate", "--out", str(out), "--days", "0.5", "--seed", "2",
                     "--hosts", "3"]) == 0
    capsys.readouterr()
    assert cli.main(["simulate", str(out), "--strategy", "resource_based", "--strategy",
                     "smart", "--json", "--png", str(png)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("strategy")
    report = json.loads(lines[-1])
    assert set(report["strategies"]) == {"resource_based", "smart"}
    for figures in report["strategies"].values():
        assert 0 < figures["utilisation"] <= 1 and 0 < figures["fairness"] <= 1
        for key in ("refused", "wait_p99_ms", "fragmentation", "spread", "hosts_whole"):
            assert key in figures
    assert report["trace"]["devices"] == 12 and report["trace"]["source"] == "generated"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["simulate", str(tmp_path / "missing.jsonl")]) == 2


async def test_a_trace_recorded_from_a_run_replays(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[
        DeviceSpec(id="big", host="h1", cpu_cores=8, memory_mb=8192),
        DeviceSpec(id="small", host="h2", cpu_cores=2, memory_mb=2048, model="tablet")],
        quotas=[QuotaSpec(user_id="a"), QuotaSpec(user_id="b")])
    start = clock.now_ms()
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        first = await client.allocate("a", min_cpu_cores=2, duration_seconds=600)
        assert isinstance(first, Allocated) and first.device.id == "small"
        clock.advance(30_000)
        waiting = asyncio.create_task(client.allocate(
            "b", min_cpu_cores=1, model="tablet", duration_seconds=600, wait_seconds=300))
        await wait_until(lambda: _queued(redis, keys))
        clock.advance(60_000)
        await client.release(allocation_id=first.allocation_id, user_id="a")
        second = await waiting
        assert isinstance(second, Allocated) and second.device.id == "small"
        clock.advance(120_000)
        got = await client.allocate("a", min_cpu_cores=4, duration_seconds=60)
        assert isinstance(got, Allocated) and got.device.id == "big"
        clock.advance(60_000)
        await client.release(allocation_id=got.allocation_id, user_id="a")
    await wait_until(lambda: write_behind_drained(redis, keys))
    trace = await record(pg, since_ms=start, until_ms=clock.now_ms() + 1)
    requests = {r.user_id + str(r.min_cpu_cores): r for r in trace.records
                if isinstance(r, TraceRequest)}
    assert {d.id for d in trace.devices} == {"big", "small"}
    # what was asked, not what was given; the waiter at its arrival, with its wait
    assert set(requests) == {"a2", "b1", "a4"}
    assert requests["b1"].model == "tablet" and requests["b1"].wait_seconds == 300
    assert requests["b1"].at_ms == start + 30_000 and requests["a4"].at_ms == start + 210_000
    releases = [r for r in trace.records if isinstance(r, TraceRelease)]
    assert len(releases) == 2  # b's allocation is still open
    [result] = await simulate(redis, settings, trace, ["resource_based"])
    assert result.served == 3 and result.refused == 0 and result.queued == 1
    assert result.wait_p99_ms == 60_000


async def test_reservations_recorded_from_a_run_replay_as_they_went(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    pg: asyncpg.Pool,
) -> None:
    """u1 books a device for [5, 65) min, shows up and releases at 15 min; u2 books the other
    device for the same hours and never shows up (no_show at 5 + the 10 min grace); u3
    books [120, 180) min and cancels at 15 min. The recorded trace holds the three
    reservations as they went and no request for their allocations; replayed, the same
    three fates, and the 10 min u1 held in the figures."""
    minute = 60_000
    await seed(redis, keys, clock, devices=[
        DeviceSpec(id="d1", host="h1", cpu_cores=2, memory_mb=2048),
        DeviceSpec(id="d2", host="h2", cpu_cores=2, memory_mb=2048)],
        quotas=[QuotaSpec(user_id=u) for u in ("u1", "u2", "u3")])
    t0 = clock.now_ms()
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        r1 = await client.reserve("u1", t0 + 5 * minute, t0 + 65 * minute, min_cpu_cores=2)
        r2 = await client.reserve("u2", t0 + 5 * minute, t0 + 65 * minute, min_cpu_cores=2)
        r3 = await client.reserve("u3", t0 + 120 * minute, t0 + 180 * minute,
                                  min_cpu_cores=2)
        assert isinstance(r1, Reserved) and isinstance(r2, Reserved)
        assert isinstance(r3, Reserved)
        clock.advance(5 * minute)
        await tick_through_timers(redis, settings, clock)
        claimed = await client.claim_reservation(r1.reservation_id, "u1")
        assert isinstance(claimed, Claimed), claimed
        clock.advance(10 * minute)
        await client.release(allocation_id=claimed.allocation_id, user_id="u1")
        assert isinstance(await client.cancel_reservation(r3.reservation_id, "u3"),
                          ReservationCancelled)
        await tick_through_timers(redis, settings, clock)
    for rid, status in ((r1, b"completed"), (r2, b"no_show"), (r3, b"cancelled")):
        assert await redis.hget(keys.reservation(rid.reservation_id), "status") == status
    await wait_until(lambda: write_behind_drained(redis, keys))
    trace = await record(pg, since_ms=t0, until_ms=clock.now_ms() + minute)
    assert not [r for r in trace.records if isinstance(r, TraceRequest)]
    got = {r.reservation_id: r for r in trace.records if isinstance(r, TraceReservation)}
    assert got == {
        r1.reservation_id: TraceReservation(
            at_ms=t0, reservation_id=r1.reservation_id, user_id="u1",
            start_ms=t0 + 5 * minute, end_ms=t0 + 65 * minute, min_cpu_cores=2,
            min_memory_mb=2048, pool="default", released_at_ms=t0 + 15 * minute),
        r2.reservation_id: TraceReservation(
            at_ms=t0, reservation_id=r2.reservation_id, user_id="u2",
            start_ms=t0 + 5 * minute, end_ms=t0 + 65 * minute, min_cpu_cores=2,
            min_memory_mb=2048, pool="default", showed_up=False),
        r3.reservation_id: TraceReservation(
            at_ms=t0, reservation_id=r3.reservation_id, user_id="u3",
            start_ms=t0 + 120 * minute, end_ms=t0 + 180 * minute, min_cpu_cores=2,
            min_memory_mb=2048, pool="default", cancelled_at_ms=t0 + 15 * minute)}
    [result] = await simulate(redis, settings, trace, ["resource_based"])
    assert result.reservations == {
        "trace": 3, "booked": 3, "refused": 0, "refused_by_reason": {}, "activated": 2,
        "claimed": 1, "no_show": 1, "completed": 1, "cancelled": 1, "cancelled_at_start": 0,
        "refused_for_bookings": 0, "device_s": 600.0}
