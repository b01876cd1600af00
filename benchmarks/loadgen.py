"""Open-loop load generator: latency at a fixed offered rate, without coordinated omission.

What it measures: for a system under test reached through an async callable
``cycle(i) -> str | None`` (None = success, otherwise an error reason), the
latency of each request from its *intended* send time to its completion, at an
offered rate that does not depend on how fast the system answers.

How, and what it promises:

- P producer processes (``multiprocessing`` spawn, each with its own uvloop
  event loop) each offer R/P requests per second on their own schedule:
  ``uniform`` (evenly spaced; the P schedules are phase-shifted so the sum is
  evenly spaced too) or ``poisson`` (exponential gaps, seeded per process).
- After its setup each child keeps its start-up heap out of the cyclic collector
  (``pipeline.service.freeze_startup_heap``), so the generator's own full collections
  (about 15 ms each over that heap) do not show up as the measured system's latency.
- Each request is started as its own task when its send time comes; the
  scheduler never awaits an earlier request. Latency is measured from the
  intended send time, so a stalled scheduler or a slow system shows up in the
  numbers instead of silently lowering the rate (no coordinated omission).
- Successful latencies go into an HdrHistogram (microseconds, 1 us .. 60 s,
  3 significant digits); each process ships its encoded histogram and its error
  counts by reason to the parent, which merges them.
- In-flight requests are capped (``max_in_flight`` per process); a request due
  while the cap is reached is not sent and counts as the error ``overloaded``.
  Each request has a timeout (error ``timeout``); requests still running
  ``drain_s`` after the schedule ends are cancelled (error ``unfinished``).
  So an overloaded system yields numbers, and every run ends by itself:
  setup, run, drain and teardown each have a deadline.
- ``delivered_per_s`` is successes divided by the time from the first intended
  send to the last completion (never less than the nominal duration), so a
  backlog drained after the schedule lowers it.

The callable is built inside each child by a picklable ``CycleFactory``: a
module-level function plus its arguments, returning ``CycleParts(setup, cycle,
teardown)``. A cycle may call ``mark(name)`` to record a sub-latency (e.g. the
allocate half of allocate+release) measured from the same intended send time.

``run_closed`` is the closed-loop twin (C concurrent loops per process, each
awaiting its previous request): it measures saturation throughput, not latency.

Nothing here knows about devices, Redis or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import random
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import msgspec
from hdrh.histogram import HdrHistogram

from pipeline.service import freeze_startup_heap

Arrival = Literal["uniform", "poisson"]

LOWEST_US = 1
"""Smallest latency the histograms track, in microseconds."""
HIGHEST_US = 60_000_000
"""Largest latency the histograms track (60 s); longer values are clamped to it."""
SIGNIFICANT_DIGITS = 3
"""HdrHistogram precision: values are exact to 3 significant digits."""
DEFAULT_MAX_IN_FLIGHT = 20_000
"""Per-process cap on requests in flight; beyond it requests are dropped as ``overloaded``."""
SETUP_TIMEOUT_S = 60.0
"""Deadline for every child to be spawned and finish its setup."""
TEARDOWN_GRACE_S = 30.0
"""Extra time granted after run + drain for teardown and shipping the results."""
MIN_SLEEP_S = 0.001
"""Shortest scheduler sleep when no precise timer is available (see ``_Waker``): the
event loop's timers have millisecond resolution, so requests due during the sleep are
sent together on waking, late by up to a millisecond or two, and that lateness is in
their latency (measured from the intended time)."""
START_DELAY_S = 0.05
"""The common start instant is set this far after the last child reports ready."""


class CycleParts(NamedTuple):
    """What a factory returns inside a producer process."""

    setup: Callable[[], Awaitable[None]]
    cycle: Callable[[int], Awaitable[str | None]]
    teardown: Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class CycleFactory:
    """Picklable recipe for ``CycleParts``: ``func(*args)`` runs in each child."""

    func: Callable[..., CycleParts]
    args: tuple[Any, ...] = ()


class Latency(msgspec.Struct, frozen=True):
    """Percentiles of one histogram, in milliseconds."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


class LoadResult(msgspec.Struct, frozen=True):
    """Merged outcome of one load run over all producer processes."""

    mode: str
    """``open`` (fixed offered rate) or ``closed`` (fixed concurrency)."""
    offered_per_s: float
    """Requests due per second (sent + dropped as overloaded) over the nominal duration."""
    delivered_per_s: float
    """Successes per second of elapsed time (first send to last completion)."""
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    count: int
    """Requests due (including those dropped as overloaded)."""
    ok: int
    errors: dict[str, int]
    duration_s: float
    elapsed_s: float
    processes: int
    marks: dict[str, Latency] = msgspec.field(default_factory=dict)
    start_lag: Latency | None = None
    """How late cycles began after their intended instants: the generator's own delay,
    already inside the latencies above (all processes merged)."""
    generator_cpu_share: float = 0.0
    """CPU time over wall time of the busiest producer process during the load: near
    1.0 the generator itself, not the system under test, would be the bottleneck."""
    generator_cpu_s: float = 0.0
    """CPU seconds the producer processes spent during the load, all of them together
    (what the generator cost, whatever share of the cores the machine gave it)."""
    redis_memory_bytes_per_1000_requests: float | None = None
    """Redis ``used_memory`` after the point (and the system's drain) minus before, per
    1,000 requests: what the requests left in Redis (set by the benchmark for systems
    on Redis; None otherwise)."""

    def summary(self) -> dict[str, float]:
        """The figures of a latency-table row."""
        return {
            "offered_per_s": round(self.offered_per_s, 1),
            "delivered_per_s": round(self.delivered_per_s, 1),
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms,
            "max_ms": self.max_ms,
        }


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def record_us(hist: HdrHistogram, seconds: float) -> None:
    """Record a duration given in seconds, clamped to the tracked range."""
    hist.record_value(min(max(int(seconds * 1_000_000), LOWEST_US), HIGHEST_US))


def latency_of(hist: HdrHistogram) -> Latency:
    def ms(us: float) -> float:
        return round(us / 1000.0, 3)

    return Latency(
        count=hist.get_total_count(),
        p50_ms=ms(hist.get_value_at_percentile(50.0)),
        p90_ms=ms(hist.get_value_at_percentile(90.0)),
        p99_ms=ms(hist.get_value_at_percentile(99.0)),
        p999_ms=ms(hist.get_value_at_percentile(99.9)),
        max_ms=ms(hist.get_max_value()),
    )


# --- marks: sub-latencies recorded by the cycle itself ---------------------------------

_intended: contextvars.ContextVar[float] = contextvars.ContextVar("loadgen_intended")
_marks: dict[str, HdrHistogram] = {}
_producer_seed = 0


def producer_seed() -> int:
    """This producer process's seed (distinct per process of a run; 0 outside a run).

    Factories mix it into their random generators so that P processes do not
    all replay the same sequence of users and sizes.
    """
    return _producer_seed


def mark(name: str) -> None:
    """Record, under ``name``, the time since the current request's intended send time.

    A no-op outside a load run, so a cycle can call it unconditionally.
    """
    start = _intended.get(None)
    if start is None:
        return
    hist = _marks.get(name)
    if hist is None:
        hist = _marks[name] = new_histogram()
    record_us(hist, time.perf_counter() - start)


def mark_since(name: str, start: float, end: float | None = None) -> None:
    """Record, under ``name``, the time from ``start`` to ``end`` (``time.perf_counter()``
    readings; ``end`` now when not given): a sub-latency that begins inside the cycle.

    A no-op outside a load run, as :func:`mark`.
    """
    if _intended.get(None) is None:
        return
    hist = _marks.get(name)
    if hist is None:
        hist = _marks[name] = new_histogram()
    record_us(hist, (time.perf_counter() if end is None else end) - start)


# --- precise wake-ups ---------------------------------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK_CLOEXEC = 0o4000 | 0o2000000
_TFD_TIMER_ABSTIME = 1


class _Waker:
    """Sleeps until an instant of ``time.perf_counter()`` with microsecond precision.

    The event loop's own timers round to milliseconds, which at 1,000 requests/s would
    make every request up to a couple of milliseconds late (and charge that to the
    system under test). On Linux a timerfd on CLOCK_MONOTONIC (the clock of
    perf_counter) armed at the absolute instant wakes the loop through its selector
    without busy-waiting; elsewhere this falls back to the loop's timers.
    """

    def __init__(self) -> None:
        self._fd = -1
        self._waiter: asyncio.Future[None] | None = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd >= 0 and time.get_clock_info("perf_counter").implementation.startswith(
                "clock_gettime(CLOCK_MONOTONIC)"):
            self._libc, self._fd = libc, fd
            asyncio.get_running_loop().add_reader(fd, self._ready)
        elif fd >= 0:
            os.close(fd)

    def _ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def until(self, instant: float) -> None:
        delay = instant - time.perf_counter()
        if delay <= 0:
            return
        if self._fd < 0:
            await asyncio.sleep(max(MIN_SLEEP_S, delay))
            return
        sec = int(instant)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((instant - sec) * 1e9)))
        self._waiter = asyncio.get_running_loop().create_future()
        self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None)
        await self._waiter

    def close(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


# --- the child: one producer process ---------------------------------------------------


@dataclass
class _Tally:
    hist: HdrHistogram = field(default_factory=new_histogram)
    start_lag: HdrHistogram = field(default_factory=new_histogram)
    """How late each cycle began, after its intended instant (the generator's own delay)."""
    errors: Counter[str] = field(default_factory=Counter)
    due: int = 0
    ok: int = 0
    last_done: float = 0.0


@dataclass(frozen=True)
class _ChildPlan:
    factory: CycleFactory
    mode: Literal["open", "closed"]
    rate: float
    """This process's share of the offered rate (open mode)."""
    phase_s: float
    """Offset of this process's first send (uniform arrivals)."""
    concurrency: int
    """Concurrent loops in this process (closed mode)."""
    duration_s: float
    arrival: Arrival
    seed: int
    max_in_flight: int
    request_timeout_s: float
    drain_s: float


async def _timed(tally: _Tally, cycle: Callable[[int], Awaitable[str | None]], i: int,
                 intended: float, timeout_s: float) -> None:
    _intended.set(intended)
    record_us(tally.start_lag, time.perf_counter() - intended)
    try:
        async with asyncio.timeout(timeout_s):
            reason = await cycle(i)
    except TimeoutError:
        reason = "timeout"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - counted by reason, the run goes on
        reason = f"exception:{type(exc).__name__}"
    done = time.perf_counter()
    tally.last_done = max(tally.last_done, done)
    if reason is None:
        tally.ok += 1
        record_us(tally.hist, done - intended)
    else:
        tally.errors[reason] += 1


async def _open_loop(plan: _ChildPlan, cycle: Callable[[int], Awaitable[str | None]],
                     start: float, tally: _Tally) -> None:
    rng = random.Random(plan.seed)
    end = start + plan.duration_s
    in_flight: set[asyncio.Task[None]] = set()
    if plan.rate <= 0:
        return
    end -= 1e-9  # a uniform schedule's last multiple of the gap must not land on the end
    uniform = plan.arrival == "uniform"
    i = 0
    offset = plan.phase_s if uniform else rng.expovariate(plan.rate)
    due = start + offset
    waker = _Waker()
    try:
        while due < end:
            now = time.perf_counter()
            while due <= now and due < end:
                tally.due += 1
                if len(in_flight) >= plan.max_in_flight:
                    tally.errors["overloaded"] += 1
                else:
                    task = asyncio.create_task(
                        _timed(tally, cycle, i, due, plan.request_timeout_s))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                i += 1
                # uniform: computed, not accumulated, so rounding never adds a request
                offset = plan.phase_s + i / plan.rate if uniform else offset + rng.expovariate(
                    plan.rate)
                due = start + offset
            if due < end:
                await waker.until(due)
    finally:
        waker.close()
    if in_flight:
        _, pending = await asyncio.wait(set(in_flight), timeout=plan.drain_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
            tally.errors["unfinished"] += len(pending)


async def _closed_loop(plan: _ChildPlan, cycle: Callable[[int], Awaitable[str | None]],
                       start: float, tally: _Tally) -> None:
    end = start + plan.duration_s
    counter = iter(range(1 << 62))

    async def one_loop() -> None:
        while time.perf_counter() < end:
            tally.due += 1
            await _timed(tally, cycle, next(counter), time.perf_counter(),
                         plan.request_timeout_s)

    loops = [asyncio.create_task(one_loop()) for _ in range(plan.concurrency)]
    _, pending = await asyncio.wait(
        loops, timeout=plan.duration_s + plan.request_timeout_s + plan.drain_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5.0)
        tally.errors["unfinished"] += len(pending)


async def _child_async(plan: _ChildPlan, conn: multiprocessing.connection.Connection) -> None:
    global _producer_seed
    _producer_seed = plan.seed
    parts = plan.factory.func(*plan.factory.args)
    await asyncio.wait_for(parts.setup(), SETUP_TIMEOUT_S)
    freeze_startup_heap()  # see the module docstring: no collection pauses measured
    conn.send(("ready", None))
    has_start = await asyncio.to_thread(conn.poll, SETUP_TIMEOUT_S)
    if not has_start:
        raise TimeoutError("parent never sent the start time")
    start_wall: float = conn.recv()
    start = time.perf_counter() + (start_wall - time.time())
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    tally = _Tally()
    cpu_start, cpu_s, busy = time.process_time(), 0.0, 0.0
    try:
        if plan.mode == "open":
            await _open_loop(plan, parts.cycle, start, tally)
        else:
            await _closed_loop(plan, parts.cycle, start, tally)
        # the CPU this producer used while it ran the load, and its share of one core
        cpu_s = time.process_time() - cpu_start
        busy = cpu_s / max(time.perf_counter() - start, 1e-9)
    finally:
        try:
            await asyncio.wait_for(parts.teardown(), TEARDOWN_GRACE_S / 2)
        except Exception:  # noqa: BLE001 - a failed teardown must not lose the figures
            traceback.print_exc()
    conn.send(("done", {
        "hist": tally.hist.encode(),
        "start_lag": tally.start_lag.encode(),
        "cpu_share": busy,
        "cpu_s": cpu_s,
        "marks": {name: h.encode() for name, h in _marks.items()},
        "errors": dict(tally.errors),
        "due": tally.due,
        "ok": tally.ok,
        "elapsed_s": max(0.0, tally.last_done - start),
    }))


def _child_main(plan: _ChildPlan, conn: multiprocessing.connection.Connection) -> None:
    try:
        import uvloop

        uvloop.run(_child_async(plan, conn))
    except BaseException:  # noqa: BLE001 - the parent gets the traceback instead of a hang
        with contextlib.suppress(OSError):  # the parent may be gone already
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# --- the parent ------------------------------------------------------------------------


async def _receive(conn: multiprocessing.connection.Connection, timeout_s: float,
                   expected: str) -> Any:
    if not await asyncio.to_thread(conn.poll, timeout_s):
        raise TimeoutError(f"producer process sent no {expected!r} within {timeout_s:.0f} s")
    try:
        kind, payload = conn.recv()
    except EOFError as exc:
        raise RuntimeError("producer process died without a report") from exc
    if kind == "error":
        raise RuntimeError(f"producer process failed:\n{payload}")
    if kind != expected:
        raise RuntimeError(f"producer process sent {kind!r}, expected {expected!r}")
    return payload


async def _run(plans: list[_ChildPlan], mode: str, duration_s: float, drain_s: float,
               request_timeout_s: float) -> LoadResult:
    ctx = multiprocessing.get_context("spawn")
    conns: list[multiprocessing.connection.Connection] = []
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        for index, plan in enumerate(plans):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_child_main, args=(plan, child_end),
                               name=f"loadgen-{index}", daemon=True)
            proc.start()
            child_end.close()
            conns.append(parent_end)
            procs.append(proc)
        await asyncio.gather(*(_receive(c, SETUP_TIMEOUT_S, "ready") for c in conns))
        start_at = time.time() + START_DELAY_S
        for conn in conns:
            conn.send(start_at)
        limit = START_DELAY_S + duration_s + drain_s + request_timeout_s + TEARDOWN_GRACE_S
        reports = await asyncio.gather(*(_receive(c, limit, "done") for c in conns))
    finally:
        for child in procs:
            await asyncio.to_thread(child.join, 5.0)
            if child.is_alive():
                child.terminate()
                await asyncio.to_thread(child.join, 5.0)
        for conn in conns:
            conn.close()
    return _merge(reports, mode, duration_s)


def _merge(reports: list[dict[str, Any]], mode: str, duration_s: float) -> LoadResult:
    hist = new_histogram()
    marks: dict[str, HdrHistogram] = {}
    start_lag = new_histogram()
    errors: Counter[str] = Counter()
    due = ok = 0
    elapsed = duration_s
    for report in reports:
        hist.decode_and_add(report["hist"])
        start_lag.decode_and_add(report["start_lag"])
        for name, encoded in report["marks"].items():
            marks.setdefault(name, new_histogram()).decode_and_add(encoded)
        errors.update(report["errors"])
        due += report["due"]
        ok += report["ok"]
        elapsed = max(elapsed, report["elapsed_s"])
    lat = latency_of(hist)
    offered = due / duration_s if mode == "open" else ok / elapsed
    return LoadResult(
        mode=mode,
        offered_per_s=offered,
        delivered_per_s=ok / elapsed,
        p50_ms=lat.p50_ms, p90_ms=lat.p90_ms, p99_ms=lat.p99_ms,
        p999_ms=lat.p999_ms, max_ms=lat.max_ms,
        count=due, ok=ok, errors=dict(sorted(errors.items())),
        duration_s=duration_s, elapsed_s=round(elapsed, 3), processes=len(reports),
        marks={name: latency_of(h) for name, h in sorted(marks.items())},
        start_lag=latency_of(start_lag),
        generator_cpu_share=round(max((r["cpu_share"] for r in reports), default=0.0), 3),
        generator_cpu_s=round(sum(r["cpu_s"] for r in reports), 3),
    )


async def run_open(factory: CycleFactory, rate: float, duration_s: float, *,
                   arrival: Arrival = "uniform", processes: int = 1, seed: int = 1,
                   max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                   request_timeout_s: float = 10.0, drain_s: float = 5.0) -> LoadResult:
    """Offer ``rate`` requests/s for ``duration_s`` from ``processes`` producer processes."""
    if rate <= 0 or duration_s <= 0 or processes < 1:
        raise ValueError("rate, duration_s and processes must be positive")
    plans = [
        _ChildPlan(
            factory=factory, mode="open", rate=rate / processes,
            phase_s=index / rate, concurrency=0, duration_s=duration_s, arrival=arrival,
            seed=seed * 1_000_003 + index, max_in_flight=max_in_flight,
            request_timeout_s=request_timeout_s, drain_s=drain_s,
        )
        for index in range(processes)
    ]
    result = await _run(plans, "open", duration_s, drain_s, request_timeout_s)
    if arrival == "uniform":  # report the exact offered rate, not the rounded count
        result = msgspec.structs.replace(result, offered_per_s=float(rate))
    return result


async def run_closed(factory: CycleFactory, concurrency: int, duration_s: float, *,
                     processes: int = 1, seed: int = 1, request_timeout_s: float = 10.0,
                     drain_s: float = 5.0) -> LoadResult:
    """Keep ``concurrency`` requests outstanding per process for ``duration_s`` (throughput)."""
    if concurrency < 1 or duration_s <= 0 or processes < 1:
        raise ValueError("concurrency, duration_s and processes must be positive")
    plans = [
        _ChildPlan(
            factory=factory, mode="closed", rate=0.0, phase_s=0.0, concurrency=concurrency,
            duration_s=duration_s, arrival="uniform", seed=seed * 1_000_003 + index,
            max_in_flight=concurrency, request_timeout_s=request_timeout_s, drain_s=drain_s,
        )
        for index in range(processes)
    ]
    return await _run(plans, "closed", duration_s, drain_s, request_timeout_s)


# --- a null system under test, to calibrate the generator itself ------------------------


def make_sleep_cycle(delay_s: float = 0.0, fail_every: int = 0) -> CycleParts:
    """A cycle that sleeps ``delay_s`` (and fails every ``fail_every``-th request, if > 0).

    Run at a rate, it shows what the generator itself adds to the latencies.
    """

    async def setup() -> None:
        return None

    async def cycle(i: int) -> str | None:
        await asyncio.sleep(delay_s)
        if fail_every and i % fail_every == fail_every - 1:
            return "injected"
        return None

    return CycleParts(setup, cycle, setup)
