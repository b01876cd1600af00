"""Presenting benchmark figures: progress lines, the terminal table, JSON, the plot.

What it promises:

- ``progress`` prints one line per step as it happens (flushed, prefixed with
  the seconds since the run started), so a long run is never silent.
- ``render_table`` turns the report document into a plain-text table: the
  headline figures, then one latency row per measured rate per system.
- ``write_outputs`` writes the whole document as JSON (every figure, plus the
  machine facts of ``machine_facts``) and a PNG of p50/p99 latency against the
  offered rate, pipeline vs baseline, log-log axes (matplotlib, Agg backend, so
  no display is needed). A failed plot never loses the JSON.
- ``machine_facts`` reads the CPU count, platform, Python version, the Redis
  version (``INFO server``) and the PostgreSQL version (``SHOW
  server_version``); a server that cannot be reached is reported as such.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

from pipeline import embedded
from pipeline.progress import Progress
from stages.settings import Settings

_T0 = time.monotonic()
_quiet = False
_bar: Progress | None = None
_points = 0


def set_quiet(quiet: bool) -> None:
    """Quiet (``--json``): no progress lines, no progress bar; only the result."""
    global _quiet
    _quiet = quiet


def progress(message: str) -> None:
    """One flushed line: ``[  12.3s] message`` (nothing when quiet)."""
    if _quiet:
        return
    if _bar is not None:
        _bar.clear()  # the bar's line, redrawn at the next point
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", flush=True)


def measured(cycles: int) -> None:
    """One more point measured, of ``cycles`` cycles: the running count and rate on a
    terminal (pipeline.progress)."""
    global _bar, _points
    if _bar is None:
        _bar = Progress("bench", quiet=_quiet, unit="cycles measured")
    _points += 1
    _bar.add(cycles, f"{_points} points")


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _kib(value: float | None) -> float | None:
    return None if value is None else value / 1024


def render_table(doc: dict[str, Any]) -> str:
    """Headline figures then the latency rows of every system."""
    lines: list[str] = []
    ceiling = doc.get("ceiling") or {}
    ratios = doc.get("ratios") or {}
    lines.append("== devsched benchmark ==")
    lines.append(f"ceiling (bare 3-hop Redis stream chain): "
                 f"{_fmt(ceiling.get('max_msgs_per_s'), 0)} msgs/s")
    for name in ("pipeline", "baseline"):
        system = doc.get(name) or {}
        if system.get("skipped"):
            lines.append(f"{name}: skipped ({system['skipped']})")
            continue
        lines.append(f"{name}: max sustainable {_fmt(system.get('max_cycles_per_s'), 0)} "
                     f"cycles/s (p99 <= {system.get('criteria', {}).get('max_p99_ms', '-')} ms,"
                     f" delivered >= {system.get('criteria', {}).get('min_delivered_ratio', '-')}"
                     f" x offered)")
        workers = system.get("workers") or {}
        if workers:
            unit = system.get("workers_unit", "workers")
            scaled = ", ".join(
                f"{key}: {_fmt(value.get('saturated_cycles_per_s'), 0)}/s"
                for key, value in workers.items())
            lines.append(f"  saturation by {unit}: {scaled}")
            if any("max_cycles_per_s" in value for value in workers.values()):
                sustained = ", ".join(
                    f"{key}: {_fmt(value.get('max_cycles_per_s'), 0)}/s"
                    for key, value in workers.items())
                lines.append(f"  max sustainable by {unit} (short points): {sustained}")
    lines.append(f"ratios: pipeline/baseline = {_fmt(ratios.get('pipeline_vs_baseline'), 2)} "
                 f"(saturated {_fmt(ratios.get('pipeline_vs_baseline_saturated'), 2)}), "
                 f"pipeline/ceiling = {_fmt(ratios.get('pipeline_vs_ceiling'), 3)} "
                 f"(requests/s saturated; sustained "
                 f"{_fmt(ratios.get('pipeline_sustained_vs_ceiling'), 3)})")
    kept = (doc.get("pipeline") or {}).get("redis_memory_bytes_per_1000_requests")
    if kept is not None:
        lines.append(f"pipeline Redis memory: {kept / 1024:,.1f} KiB kept per 1,000 requests "
                     "(used_memory after a point and its drain, minus before; held for the "
                     "idempotency window, see DEVSCHED_IDEMPOTENCY_TTL_S)")
    lat = (doc.get("targets") or {}).get("latency_at_1000_per_s") or {}
    if lat.get("measured"):
        lines.append(f"pipeline at {lat['offered_per_s']:,.0f} cycles/s: allocate p50 "
                     f"{_fmt(lat.get('allocate_p50_ms'), 2)} ms, p99 "
                     f"{_fmt(lat.get('allocate_p99_ms'), 2)} ms (target {lat['target_p50_ms']}"
                     f" / {lat['target_p99_ms']} ms); whole cycle p50 "
                     f"{_fmt(lat.get('cycle_p50_ms'), 2)} ms, p99 {_fmt(lat.get('cycle_p99_ms'), 2)} ms")
        if "bare_chain_p50_ms" in lat:
            lines.append(f"  the bare 3-hop chain at the same rate (no logic): p50 "
                         f"{_fmt(lat['bare_chain_p50_ms'], 2)} ms, p99 "
                         f"{_fmt(lat['bare_chain_p99_ms'], 2)} ms")
    table = (doc.get("targets") or {}).get("allocate_by_rate") or []
    if table:
        lines.append("allocate, per request (ms), pipeline vs baseline at the same rate "
                     "(ratio < 1: the pipeline answers faster; floor: pipeline p99 over the "
                     "bare chain's p99; request path with no logic: the pipeline's two hops, "
                     "one process, no scripts):")
        for entry in table:
            floor = (f", floor {_fmt(entry['floor_ratio'], 2)}"
                     if entry.get("floor_ratio") is not None else "")
            if entry.get("request_path_floor_p50_ms") is not None:
                floor += (f"; request path with no logic p50 "
                          f"{_fmt(entry['request_path_floor_p50_ms'], 2)}, p99 "
                          f"{_fmt(entry.get('request_path_floor_p99_ms'), 2)}")
            lines.append(
                f"  {_fmt(entry['offered_per_s'], 0):>6}/s  p50 "
                f"{_fmt(entry.get('pipeline_allocate_p50_ms'), 2)} vs "
                f"{_fmt(entry.get('baseline_allocate_p50_ms'), 2)} "
                f"({_fmt(entry.get('allocate_p50_vs_baseline'), 2)}x), p99 "
                f"{_fmt(entry.get('pipeline_allocate_p99_ms'), 2)} vs "
                f"{_fmt(entry.get('baseline_allocate_p99_ms'), 2)} "
                f"({_fmt(entry.get('allocate_p99_vs_baseline'), 2)}x){floor}")
    goals = [(key, value) for key, value in (doc.get("targets") or {}).items()
             if isinstance(value, dict) and "met" in value and "target" in value]
    if goals:
        lines.append("targets: " + ", ".join(
            f"{key} {'met' if value['met'] else 'NOT met'}" for key, value in goals))
    batch = (doc.get("pipeline") or {}).get("batch_allocate")
    if batch:
        lines.append(f"pipeline batch of {batch['devices_per_request']} devices at "
                     f"{_fmt(batch['offered_per_s'], 0)} requests/s: allocate p50 "
                     f"{_fmt(batch.get('allocate_p50_ms'), 2)} ms, p99 "
                     f"{_fmt(batch.get('allocate_p99_ms'), 2)} ms; with the batch release "
                     f"p50 {_fmt(batch['p50_ms'], 2)} ms, p99 {_fmt(batch['p99_ms'], 2)} ms"
                     + (f" (errors: {batch['errors']})" if batch.get("errors") else ""))
    handoff = (doc.get("pipeline") or {}).get("queue_handoff")
    if handoff:
        lines.append(f"pipeline queue hand-off (a release to the waiting request's reply), "
                     f"{handoff['count']} cycles: p50 {_fmt(handoff.get('handoff_p50_ms'), 2)} "
                     f"ms, p99 {_fmt(handoff.get('handoff_p99_ms'), 2)} ms"
                     + (f" (errors: {handoff['errors']})" if handoff.get("errors") else ""))
    # gen cpu: the busiest load-generator process's share of a core (near 1: the
    # generator, not the system, would be the limit)
    header = (f"{'system':<9} {'offered/s':>10} {'delivered/s':>12} {'p50 ms':>9} "
              f"{'p99 ms':>9} {'p99.9 ms':>9} {'max ms':>9} {'gen cpu':>8} "
              f"{'KiB/1k req':>10}  errors")
    lines.append("")
    lines.append(header)
    lines.append("-" * len(header))
    for name in ("pipeline", "baseline", "ceiling"):
        system = doc.get(name) or {}
        rows = sorted([*system.get("latency", []), *system.get("search", [])],
                      key=lambda row: row["offered_per_s"])
        for row in rows:
            errors = ", ".join(f"{k}={v}" for k, v in (row.get("errors") or {}).items())
            lines.append(
                f"{name:<9} {_fmt(row['offered_per_s'], 0):>10} "
                f"{_fmt(row['delivered_per_s'], 0):>12} {_fmt(row['p50_ms'], 2):>9} "
                f"{_fmt(row['p99_ms'], 2):>9} {_fmt(row['p999_ms'], 2):>9} "
                f"{_fmt(row['max_ms'], 2):>9} {_fmt(row.get('generator_cpu_share'), 2):>8} "
                f"{_fmt(_kib(row.get('redis_memory_bytes_per_1000_requests')), 1):>10}"
                f"  {errors}")
    return "\n".join(lines)


async def machine_facts(redis_url: str | None, database_url: str | None) -> dict[str, Any]:
    """CPU count, platform, Python, Redis and PostgreSQL versions (or why unknown)."""
    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if redis_url:
        try:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(redis_url, socket_timeout=5.0)
            try:
                info = await client.info("server")
                facts["redis_version"] = info.get("redis_version")
            finally:
                await client.aclose()
        except Exception as exc:  # noqa: BLE001 - an unreachable server is a fact too
            facts["redis_version"] = f"unknown ({type(exc).__name__})"
    if database_url:
        try:
            import asyncpg

            conn = await asyncpg.connect(database_url, timeout=10)
            try:
                facts["postgresql_version"] = await conn.fetchval("SHOW server_version")
                facts["postgresql_synchronous_commit"] = await conn.fetchval(
                    "SHOW synchronous_commit")
            finally:
                await conn.close()
        except Exception as exc:  # noqa: BLE001 - an unreachable server is a fact too
            facts["postgresql_version"] = f"unknown ({type(exc).__name__})"
    return facts


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def plot_latency(doc: dict[str, Any], path: Path) -> Path:
    """p50 and p99 against offered rate, pipeline vs baseline (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {"pipeline": "tab:blue", "baseline": "tab:orange"}
    for name, colour in styles.items():
        system = doc.get(name) or {}
        rows = sorted([*system.get("latency", []), *system.get("search", [])],
                      key=lambda row: row["offered_per_s"])
        rows = [row for row in rows if row.get("p50_ms")]
        if not rows:
            continue
        rates = [row["offered_per_s"] for row in rows]
        ax.plot(rates, [row["p50_ms"] for row in rows], marker="o", color=colour,
                label=f"{name} p50")
        ax.plot(rates, [row["p99_ms"] for row in rows], marker="s", linestyle="--",
                color=colour, label=f"{name} p99")
    limit = ((doc.get("baseline") or {}).get("criteria") or {}).get("max_p99_ms")
    if limit:
        ax.axhline(limit, color="grey", linewidth=0.8, linestyle=":",
                   label=f"p99 limit {limit:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (allocate+release cycles/s)")
    ax.set_ylabel("latency from intended send (ms)")
    machine = doc.get("machine") or {}
    ax.set_title(f"devsched latency vs offered rate ({machine.get('cpu_count', '?')} CPUs)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(doc: dict[str, Any], out_dir: Path) -> tuple[Path, Path | None]:
    """Write ``bench-<stamp>.json`` and ``bench-<stamp>.png`` (plus ``latest.*`` copies)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    body = orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    json_path = out_dir / f"bench-{stamp}.json"
    json_path.write_bytes(body)
    (out_dir / "latest.json").write_bytes(body)
    png_path = out_dir / f"bench-{stamp}.png"
    try:
        plot_latency(doc, png_path)
        (out_dir / "latest.png").write_bytes(png_path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - the JSON is what matters; say why no plot
        progress(f"plot not written: {type(exc).__name__}: {exc}")
        return json_path, None
    return json_path, png_path


def run_redis_tool(measure: Callable[[str], Coroutine[Any, Any, dict[str, Any]]],
                   table: Callable[[dict[str, Any]], str]) -> None:
    """Run a tool that measures on Redis alone: ``measure(redis_url)`` on REDIS_URL, else
    on an embedded server started here and stopped after, whatever happens; then print
    its table and, as the last line, its JSON."""
    base = Settings.from_env()
    urls, started = embedded.ensure_servers(base)
    try:
        doc = asyncio.run(measure(urls.redis_url))
    finally:
        if started:
            embedded.stop_servers(base)
    print(table(doc), flush=True)
    print(orjson.dumps(doc).decode(), flush=True)
