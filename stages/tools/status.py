"""`devsched status`: is the scheduler healthy, what is stuck and why.

One read of everything an operator looks at first (read-only; a few commands per
stream and group, one read of the dead stream, one of the device index): the streams
and their consumer groups (``pipeline.inspect``: length, oldest entry, lag, pending,
oldest pending, consumers and their idle time), the dead letters by stage and error,
how far the write-behind (the groups on the changes stream) is behind in entries and
seconds, the pools, the timers (last tick, the tracked jobs), and the servers'
versions and persistence settings.

**Healthy** means none of these (thresholds are settings, see the README):

* a consumer group with more than ``DEVSCHED_STATUS_MAX_LAG`` entries not done (lag +
  pending), or whose oldest entry not acked is older than ``DEVSCHED_STATUS_MAX_BEHIND_S``;
* more than ``DEVSCHED_STATUS_DEAD_MAX`` dead letters in the last
  ``DEVSCHED_STATUS_DEAD_WINDOW_S`` seconds (dead letters growing);
* no timer tick for ``DEVSCHED_STATUS_STALL_TICKS`` periods (or none at all);
* PostgreSQL unreachable, or a pool with no device free while it has devices.

The command exits 1 when unhealthy (each reason in ``problems``), 0 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict
from typing import Any

import asyncpg
from redis.asyncio import Redis

from pipeline.clock import Clock
from pipeline.deadletters import by_stage_and_error, read_letters
from pipeline.inspect import StreamState, id_ms, redis_server, streams_state
from schemas.keys import GROUP_BILL, GROUP_NOTIFY, GROUP_PERSIST, Keys
from stages.settings import Settings
from stages.tools.admin import pools
from stages.tools.jobs import list_jobs

WRITE_BEHIND_GROUPS = (GROUP_PERSIST, GROUP_BILL, GROUP_NOTIFY)
"""The groups on the changes stream: what PostgreSQL, the ledger and the notifications
are behind by."""
PG_TIMEOUT_S = 3.0
"""How long status waits for PostgreSQL before reporting it unreachable."""
PG_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "wal_level")
"""PostgreSQL's settings that decide what a crash loses."""


def status_streams(keys: Keys) -> list[str]:
    """The streams status shows, in the order a request flows (reply streams, one per
    client, are left out)."""
    return [keys.requests, keys.admitted, keys.changes, keys.ticks, keys.job_requests,
            keys.events, keys.notifications, keys.dead,
            keys.sink_replay("export"), keys.sink_replay("webhook")]


async def postgres_server(settings: Settings) -> dict[str, Any]:
    """PostgreSQL's version and persistence settings, or ``error`` when unreachable."""
    try:
        conn = await asyncio.wait_for(asyncpg.connect(settings.database_url), PG_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    try:
        out: dict[str, Any] = {"version": await conn.fetchval("SHOW server_version")}
        for name in PG_SETTINGS:
            out[name] = await conn.fetchval(f"SHOW {name}")
        return out
    finally:
        await conn.close()


def _write_behind(changes: StreamState) -> dict[str, Any]:
    groups = {g.name: g for g in changes.groups}
    per = {name: {"entries": groups[name].backlog, "behind_s": groups[name].behind_s}
           if name in groups else None for name in WRITE_BEHIND_GROUPS}
    known = [v for v in per.values() if v is not None]
    return {
        "entries": max((v["entries"] for v in known), default=0),
        "behind_s": max((v["behind_s"] for v in known), default=0.0),
        "groups": per,
    }


async def collect(redis: Redis, settings: Settings, clock: Clock) -> dict[str, Any]:
    """Everything `devsched status --json` prints, with ``healthy`` and ``problems``."""
    keys = Keys(settings.prefix)
    now_ms = clock.now_ms()
    streams = await streams_state(redis, status_streams(keys), now_ms)
    letters = await read_letters(redis, keys.dead)
    recent_from = now_ms - settings.status_dead_window_s * 1000
    recent = sum(1 for s in letters if id_ms(s.id) >= recent_from)
    last_tick = await redis.xrevrange(keys.ticks, count=1)
    last_tick_ms = id_ms(last_tick[0][0]) if last_tick else None
    pool_rows = [asdict(p) for p in await pools(redis, keys)]
    for p in pool_rows:
        p["out_of_service"] = p["maintenance"] + p["down"]
    jobs = [{k: j[k] for k in ("name", "enabled", "status", "last_status", "last_run",
                               "next_run")} for j in await list_jobs(redis, settings)]
    changes = next(s for s in streams if s.name == keys.changes)
    report: dict[str, Any] = {
        "at_ms": now_ms,
        "streams": [asdict(s) for s in streams],
        "dead_letters": {
            "total": len(letters), "recent": recent,
            "window_s": settings.status_dead_window_s,
            "not_replayed": sum(1 for s in letters if s.replayed_as is None),
            "by_stage": by_stage_and_error(letters),
        },
        "write_behind": _write_behind(changes),
        "pools": pool_rows,
        "timers": {
            "tick_ms": settings.tick_ms, "last_tick_ms": last_tick_ms,
            "last_tick_age_s": round((now_ms - last_tick_ms) / 1000, 3)
            if last_tick_ms is not None else None,
            "jobs": jobs,
        },
        "servers": {"redis": await redis_server(redis),
                    "postgresql": await postgres_server(settings)},
        "metrics_port": settings.metrics_port or None,
    }
    report["problems"] = problems(report, settings)
    report["healthy"] = not report["problems"]
    return report


def problems(report: dict[str, Any], settings: Settings) -> list[str]:
    """Why the report is unhealthy (empty: healthy)."""
    found: list[str] = []
    for stream in report["streams"]:
        for g in stream["groups"]:
            where = f"group {g['name']} on {stream['name']}"
            if g["backlog"] > settings.status_max_lag:
                found.append(f"{where}: {g['backlog']} entries not done "
                             f"(> DEVSCHED_STATUS_MAX_LAG {settings.status_max_lag})")
            if g["behind_s"] > settings.status_max_behind_s:
                found.append(f"{where}: oldest entry not acked is {g['behind_s']:g} s old "
                             f"(> DEVSCHED_STATUS_MAX_BEHIND_S {settings.status_max_behind_s:g})")
    dead = report["dead_letters"]
    if dead["recent"] > settings.status_dead_max:
        found.append(f"dead letters growing: {dead['recent']} in the last {dead['window_s']} s "
                     f"(> DEVSCHED_STATUS_DEAD_MAX {settings.status_dead_max})")
    timers = report["timers"]
    stall_s = settings.status_stall_ticks * settings.tick_ms / 1000
    if timers["last_tick_age_s"] is None:
        found.append("no timer tick yet (is the timers stage running?)")
    elif timers["last_tick_age_s"] > stall_s:
        found.append(f"timers stalled: last tick {timers['last_tick_age_s']:g} s ago "
                     f"(> {settings.status_stall_ticks} periods)")
    if "error" in report["servers"]["postgresql"]:
        found.append(f"postgresql unreachable: {report['servers']['postgresql']['error']}")
    for p in report["pools"]:
        if p["devices"] and not p["free"]:
            found.append(f"pool {p['pool']} exhausted: no device free of {p['devices']}")
    return found


def render(report: dict[str, Any]) -> str:
    """The report as text: a section per part, tables aligned."""
    import contextlib
    import io

    from stages.tools.cli import print_table

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print(f"status: {'healthy' if report['healthy'] else 'UNHEALTHY'}")
        for problem in report["problems"]:
            print(f"  - {problem}")
        print("\nstreams")
        print_table([{"stream": s["name"], "length": s["length"],
                      "oldest_age_s": s["oldest_age_s"]} for s in report["streams"]],
                    ["stream", "length", "oldest_age_s"])
        groups = [{"stream": s["name"], "group": g["name"], "lag": g["lag"],
                   "pending": g["pending"], "oldest_pending_age_s": g["oldest_pending_age_s"],
                   "behind_s": g["behind_s"],
                   "consumers": ", ".join(f"{c['name']} (idle {c['idle_s']:g} s)"
                                          for c in g["consumers"]) or "none"}
                  for s in report["streams"] for g in s["groups"]]
        print("\ngroups")
        print_table(groups, ["stream", "group", "lag", "pending", "oldest_pending_age_s",
                             "behind_s", "consumers"])
        dead = report["dead_letters"]
        print(f"\ndead letters: {dead['total']} ({dead['recent']} in the last "
              f"{dead['window_s']} s, {dead['not_replayed']} not replayed)")
        for stage, errors in dead["by_stage"].items():
            for error, n in errors.items():
                print(f"  {stage}: {n} x {error}")
        wb = report["write_behind"]
        print(f"\nwrite-behind: {wb['entries']} entries, {wb['behind_s']:g} s behind")
        print("\npools")
        print_table(report["pools"], ["pool", "devices", "free", "allocated",
                                      "out_of_service", "share_used"])
        t = report["timers"]
        print(f"\ntimers: last tick {t['last_tick_age_s']} s ago (period {t['tick_ms']} ms)")
        if t["jobs"]:
            print_table(t["jobs"], ["name", "enabled", "status", "last_status", "last_run",
                                    "next_run"])
        print("\nservers")
        for name, server in report["servers"].items():
            print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in server.items()))
        if report["metrics_port"]:
            print(f"  metrics: port {report['metrics_port']} (every process of `run`, summed)")
    return out.getvalue()


async def run(redis: Redis, settings: Settings, clock: Clock, *, as_json: bool, watch: bool,
              interval_s: float) -> int:
    """Print the status once, or every ``interval_s`` with ``watch`` until interrupted;
    exit 1 when (the last one) is unhealthy."""
    code = 0
    while True:
        report = await collect(redis, settings, clock)
        code = 0 if report["healthy"] else 1
        if as_json:
            print(json.dumps(report, default=str), flush=True)
        else:
            if watch and sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(time.strftime("%Y-%m-%d %H:%M:%S  ") + render(report), flush=True)
        if not watch:
            return code
        try:
            await asyncio.sleep(interval_s)
        except asyncio.CancelledError:
            return code
