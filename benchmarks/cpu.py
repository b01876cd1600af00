"""Where the CPU goes: CPU time per allocate+release cycle, by process, at a fixed rate.

What it measures: the pipeline under an open-loop load of ``--rate`` cycles/s
(every stage running, as ``devsched bench`` runs it), then, over the middle of
each run (the first and last second are left out), the CPU seconds each process
used, from ``/proc/<pid>/stat`` (user + system), divided by the cycles offered in
that window: microseconds of CPU per cycle for Redis, the request path (quota,
select), the write-behind (persist, bill, notify, timers), PostgreSQL and the load
generator. Beside it, Redis' own command statistics for the same window (calls and
microseconds per cycle, ``INFO commandstats``; a script's time includes the
commands it calls).

Why: on a small machine every process shares the same cores, so the sum of these
figures, times the rate, is how close the machine is to saturation; and it shows
which part to make cheaper. Linux only (``/proc``). Run:
``python -m benchmarks.cpu --rate 1000 --seconds 6 --repeat 2``.

Promises: the servers are the embedded ones (or REDIS_URL/DATABASE_URL), the
pipeline is started and stopped here, and the last line printed is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass
from typing import Any

import orjson
import redis as sync_redis

from benchmarks import loadgen, pipeline_sut
from pipeline import embedded
from stages.settings import Settings

EDGE_S = 1.0
"""Seconds left out at each end of a run (start-up and drain are not steady state)."""
GROUPS = (
    ("redis", ("redis-server",)),
    ("request_path", ("worker quota", "worker select")),
    ("write_behind", ("persist",)),
    ("generator", ("spawn_main",)),
    ("postgres", ("postgres",)),
)
"""Process groups, by a piece of their command line (first match wins)."""


def _ticks() -> dict[int, tuple[int, str]]:
    """CPU ticks (user + system) and command line of every process."""
    found: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat, open(f"/proc/{name}/cmdline") as cmd:
                fields = stat.read().rsplit(")", 1)[1].split()
                command = cmd.read().replace("\0", " ")
        except OSError:
            continue  # exited meanwhile
        found[int(name)] = (int(fields[11]) + int(fields[12]), command)
    return found


def _group(command: str) -> str | None:
    for group, needles in GROUPS:
        if any(n in command for n in needles):
            return group
    return None


@dataclass
class Window:
    cpu_us_per_cycle: dict[str, float]
    redis_commands: dict[str, dict[str, float]]


async def _measure_window(redis_url: str, seconds: float, cycles: float) -> Window:
    client = sync_redis.Redis.from_url(redis_url)
    try:
        await asyncio.sleep(EDGE_S)
        client.config_resetstat()
        before = _ticks()
        await asyncio.sleep(seconds - 2 * EDGE_S)
        after = _ticks()
        stats = client.info("commandstats")
    finally:
        client.close()
    hz = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for pid, (ticks, command) in after.items():
        group = _group(command)
        if group and pid in before:
            used[group] = used.get(group, 0.0) + (ticks - before[pid][0]) / hz
    per_cycle = {g: round(used.get(g, 0.0) / cycles * 1e6, 1) for g, _ in GROUPS}
    per_cycle["total"] = round(sum(per_cycle.values()), 1)
    commands = {
        name.removeprefix("cmdstat_"): {"calls": round(v["calls"] / cycles, 2),
                                        "us": round(v["usec"] / cycles, 1)}
        for name, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])
    }
    return Window(per_cycle, commands)


async def measure(rate: float, seconds: float, repeat: int, workers: int) -> dict[str, Any]:
    urls, started = await asyncio.to_thread(embedded.ensure_servers, Settings.from_env())
    handle = await pipeline_sut.start_pipeline(urls.redis_url, urls.database_url, workers,
                                               devices=2000, users=500)
    runs: list[dict[str, Any]] = []
    try:
        for _ in range(repeat):
            await pipeline_sut.reset_pipeline(handle)
            cycles = rate * (seconds - 2 * EDGE_S)
            window = asyncio.create_task(_measure_window(urls.redis_url, seconds, cycles))
            result = await loadgen.run_open(handle.factory, rate, seconds)
            got = await window
            allocate = result.marks.get("allocate")
            runs.append({
                "offered_per_s": rate, "delivered_per_s": round(result.delivered_per_s, 1),
                "cycle_p50_ms": result.p50_ms, "cycle_p99_ms": result.p99_ms,
                "allocate_p50_ms": allocate.p50_ms if allocate else None,
                "allocate_p99_ms": allocate.p99_ms if allocate else None,
                "cpu_us_per_cycle": got.cpu_us_per_cycle,
                "redis_commands_per_cycle": dict(list(got.redis_commands.items())[:12]),
            })
    finally:
        await pipeline_sut.stop_pipeline(handle)
        if started:
            await asyncio.to_thread(embedded.stop_servers, Settings.from_env())
    return {"workers_per_stage": workers, "cpus": os.cpu_count(), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__)
    parser.add_argument("--rate", type=float, default=1000.0, help="cycles/s offered")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each run")
    parser.add_argument("--repeat", type=int, default=2, help="runs")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per stage")
    args = parser.parse_args()
    if args.seconds <= 2 * EDGE_S + 1 or args.rate <= 0 or args.repeat < 1:
        parser.error(f"--seconds must exceed {2 * EDGE_S + 1:g}; --rate and --repeat positive")
    import uvloop

    doc = uvloop.run(measure(args.rate, args.seconds, args.repeat, args.workers))
    for run in doc["runs"]:
        cpu = run["cpu_us_per_cycle"]
        print(f"{run['offered_per_s']:,.0f}/s: allocate p50 {run['allocate_p50_ms']} ms, p99 "
              f"{run['allocate_p99_ms']} ms | CPU us per cycle: "
              + ", ".join(f"{k} {v:,.0f}" for k, v in cpu.items()), flush=True)
    print(orjson.dumps(doc).decode(), flush=True)


if __name__ == "__main__":
    main()
