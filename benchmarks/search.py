"""Search for the maximum sustainable rate of a system under open-loop load.

A rate is *sustained* when the system delivers at least ``MIN_DELIVERED_RATIO``
of what was offered and the 99th percentile latency (from intended send time)
stays at or under ``MAX_P99_MS``. The answer is the highest rate observed to be
sustained.

The search, given the points already measured (the fixed rates):

1. step up: from the highest sustained rate, double the rate until one fails
   (or an upper bound is reached: open-loop load cannot be sustained above the
   closed-loop saturation throughput, so the runner passes that bound);
2. bisect between the highest pass and the lowest fail above it a few times
   (when nothing passed, this walks down from the lowest failure).

Bounds: at most ``max_points`` new measurements, none started once the
deadline would be passed (except the first ``min_points``, made whatever the time:
a search the measurements before it left no time for would otherwise answer the
highest fixed rate that passed, a factor of two off), and bisection stops when the
bracket is within ``MIN_BRACKET_RATIO``. Rates are rounded to ``RATE_QUANTUM``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from benchmarks.loadgen import LoadResult

MIN_DELIVERED_RATIO = 0.95
"""Delivered/offered at or above this counts as keeping up."""
MAX_P99_MS = 25.0
"""p99 at or under this counts as an acceptable latency."""
MIN_BRACKET_RATIO = 1.08
"""Bisection stops once the failing rate is within 8% of the passing one."""
RATE_QUANTUM = 10
"""Probed rates are multiples of this many requests per second."""
MIN_RATE = 10.0
"""Never probe below this rate."""


def sustained(result: LoadResult) -> bool:
    """Whether this point counts as sustained (see the module docstring)."""
    return (result.ok > 0
            and result.delivered_per_s >= MIN_DELIVERED_RATIO * result.offered_per_s
            and result.p99_ms <= MAX_P99_MS)


def _quantise(rate: float) -> float:
    return float(max(MIN_RATE, round(rate / RATE_QUANTUM) * RATE_QUANTUM))


@dataclass
class SearchOutcome:
    max_rate: float
    """Highest sustained offered rate seen (0 when none was)."""
    probes: list[LoadResult] = field(default_factory=list)
    """The measurements the search added, in order."""
    bounded_by: str = ""
    """Why the search stopped early, if it did: points, deadline, upper_bound."""


async def find_max_sustainable(
    measure: Callable[[float], Awaitable[LoadResult]],
    known: list[LoadResult],
    *,
    start_rate: float,
    upper_bound: float | None,
    max_points: int,
    bisections: int,
    deadline: float,
    point_cost_s: float,
    min_points: int = 0,
) -> SearchOutcome:
    """Step up then bisect; ``deadline`` is a ``time.monotonic()`` instant, which stops
    no probe before ``min_points`` were made."""
    results = list(known)
    outcome = SearchOutcome(max_rate=0.0)

    def bracket() -> tuple[float, float | None]:
        passed = [r.offered_per_s for r in results if sustained(r)]
        lo = max(passed, default=0.0)
        failed = [r.offered_per_s for r in results if not sustained(r) and r.offered_per_s > lo]
        return lo, min(failed, default=None)

    def may_probe() -> bool:
        if len(outcome.probes) >= max_points:
            outcome.bounded_by = "points"
            return False
        if len(outcome.probes) >= min_points and time.monotonic() + point_cost_s > deadline:
            outcome.bounded_by = "deadline"
            return False
        return True

    async def probe(rate: float) -> None:
        result = await measure(rate)
        results.append(result)
        outcome.probes.append(result)

    lo, hi = bracket()
    while hi is None:
        rate = _quantise(2 * lo if lo > 0 else start_rate)
        if upper_bound is not None and rate > upper_bound:
            rate = _quantise(upper_bound)
            if rate <= lo:
                outcome.bounded_by = "upper_bound"
                break
        if not may_probe():
            break
        await probe(rate)
        lo, hi = bracket()
        if hi is None and upper_bound is not None and rate >= _quantise(upper_bound):
            outcome.bounded_by = "upper_bound"
            break
    steps = 0
    while hi is not None and steps < bisections:
        if lo > 0 and hi / lo <= MIN_BRACKET_RATIO:
            break
        rate = _quantise((lo + hi) / 2)
        if rate in (lo, hi) or not may_probe():
            break
        await probe(rate)
        steps += 1
        lo, hi = bracket()
    outcome.max_rate = lo
    return outcome
