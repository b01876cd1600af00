"""How much of the request path's floor is the hop process waking up.

What it measures: the request path's floor (the pipeline's two stream hops with no
logic, both in one process with a task and a connection each, as ``devsched bench``
measures it in ``ceiling.request_path_floor``) at fixed rates, in two ways: as it runs
(the process sleeps in its event loop between messages) and kept awake (its event loop
polled without pause, so it is already running when a message arrives). Both ways run
in every round, one after the other, and ``--repeat`` rounds give medians. Per rate:
p50 and p99 of each way, and ``wakeup_p50_ms``, the difference of the medians' p50s:
what waking that one process costs a message on this machine. Redis and the producer
still sleep between messages in both ways, so this is a lower bound of what wake-ups
cost the whole path.

Why: at 250 and 500 requests/s an allocate's p50 sits at this floor (README, "How to
read it"), and no script or stage change moves the floor. This shows how much of it is
wake-ups, which only fewer hops, or processes that never sleep, would take away; a
process that never sleeps costs a whole core, so it is a way to measure, not a way to
run.

Run: ``python -m benchmarks.wakeup --rates 250,500,1000 --seconds 5 --repeat 2``
(REDIS_URL, else the embedded server). Promises: the chain's keys are deleted after
each way, whatever happens; the last line printed is JSON.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from benchmarks import ceiling, report
from benchmarks.ceiling import FLOOR_HOPS
from benchmarks.loadgen import LoadResult
from benchmarks.run import LOW_LOAD_RATES, TARGET_RATE

WAYS = ("sleeping", "awake")
"""The hop process as it runs, and kept from sleeping (``ceiling.start_chain``'s
``busy_poll``)."""
DRAIN_S = 2.0
"""How long a point waits for its last replies."""


async def _way(redis_url: str, busy_poll: bool, rates: tuple[float, ...],
               seconds: float) -> dict[float, tuple[float, float]]:
    """p50 and p99 (ms) at each rate through one chain run the given way."""
    def check(result: LoadResult) -> None:
        if result.errors or result.count == 0:
            raise RuntimeError(f"floor at {result.offered_per_s:g}/s: {result.count} "
                               f"replies, errors {result.errors}")

    results = await ceiling.floor_latency(redis_url, rates, seconds, busy_poll=busy_poll,
                                          drain_s=DRAIN_S, on_point=check)
    return {rate: (r.p50_ms, r.p99_ms) for rate, r in zip(rates, results, strict=True)}


async def measure(redis_url: str, rates: tuple[float, ...], seconds: float,
                  repeat: int) -> dict[str, Any]:
    runs: dict[str, list[dict[float, tuple[float, float]]]] = {way: [] for way in WAYS}
    for _ in range(repeat):
        for way in WAYS:
            runs[way].append(await _way(redis_url, way == "awake", rates, seconds))
    rows = []
    for rate in rates:
        row: dict[str, Any] = {"offered_per_s": rate}
        for way in WAYS:
            row[f"{way}_p50_ms"] = round(statistics.median(r[rate][0] for r in runs[way]), 3)
            row[f"{way}_p99_ms"] = round(statistics.median(r[rate][1] for r in runs[way]), 3)
        row["wakeup_p50_ms"] = round(row["sleeping_p50_ms"] - row["awake_p50_ms"], 3)
        rows.append(row)
    return {"hops": FLOOR_HOPS, "seconds": seconds, "repeat": repeat, "rates": rows}


def _table(doc: dict[str, Any]) -> str:
    lines = [(f"request path floor ({doc['hops']} hops, one process), medians of "
              f"{doc['repeat']} round(s) of {doc['seconds']:g} s: p50 / p99 ms")]
    for row in doc["rates"]:
        lines.append(
            f"  {row['offered_per_s']:>6,.0f}/s  sleeping {row['sleeping_p50_ms']:.2f} / "
            f"{row['sleeping_p99_ms']:.2f}  awake {row['awake_p50_ms']:.2f} / "
            f"{row['awake_p99_ms']:.2f}  wake-up {row['wakeup_p50_ms']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wakeup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_rates = ",".join(f"{r:g}" for r in (*LOW_LOAD_RATES, TARGET_RATE))
    parser.add_argument("--rates", default=default_rates, help="requests/s, comma separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each point")
    parser.add_argument("--repeat", type=int, default=2, help="rounds (medians are reported)")
    args = parser.parse_args()
    rates = tuple(float(r) for r in args.rates.split(","))
    if not rates or min(rates) <= 0 or args.seconds <= 0 or args.repeat < 1:
        parser.error("--rates, --seconds and --repeat must be positive")
    report.run_redis_tool(lambda url: measure(url, rates, args.seconds, args.repeat), _table)


if __name__ == "__main__":
    main()
