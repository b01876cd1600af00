"""What the request path's scripts cost Redis, per row: quota's admit, select's allocate
and release, in calls of one row and of several.

What it measures: on a key prefix of its own, the benchmark's population (2,000 devices,
500 users with generous quotas, as ``devsched bench`` loads them) and every stage script
loaded, as a stage process loads them (the Lua heap a call runs in is that size). Then,
per batch size, ``--rows`` allocate requests go through the real quota and select stages
(added to the request stream, read from each stage's stream as a worker reads it,
``batch`` entries per call), and their releases are added to select's input, as the
client sends them. Around each call, Redis's own count of script time (``INFO
commandstats``: FCALL and EVALSHA, which include the commands a script makes) gives
microseconds of Redis per row; beside it, the commands a call makes per row.

Why: the Redis share of an allocate and a release without the noise of a latency run,
in seconds and on the same server: a change to quota.lua or select.lua shows here as
microseconds per row before and after. Calls of one row are what a lightly loaded
pipeline makes; a call's fixed cost is the difference to the larger batch.

Run: ``python -m benchmarks.scriptcost --rows 1000 --batch 1,16`` (REDIS_URL, else the
embedded server). Promises: its keys are deleted at the end, whatever happens, and the
last line printed is JSON.
"""

from __future__ import annotations

import argparse
import random
import uuid
from dataclasses import replace
from typing import Any

import msgspec
from redis.asyncio import Redis

from benchmarks import report
from benchmarks.baseline import CPU_CHOICES, MEM_CHOICES_MB
from benchmarks.pipeline_sut import load_population
from pipeline.clock import SystemClock
from pipeline.connections import redis_client, text
from pipeline.worker import Entry
from schemas.keys import Keys
from schemas.messages import Allocated, AllocateRequest, ReleaseRequest, reply_decoder
from stages.context import StageContext
from stages.quota import QuotaStage
from stages.scripts import ALL
from stages.select import SelectStage
from stages.settings import Settings
from stages.tools.admin import delete_keys

SCRIPT_COMMANDS = ("cmdstat_fcall", "cmdstat_evalsha")
"""How a script call shows in INFO commandstats (Redis 7: FCALL; 6.2: EVALSHA)."""
NOT_THE_CALL = ("cmdstat_info", "cmdstat_xreadgroup") + SCRIPT_COMMANDS
"""Commands this tool makes itself between the calls, left out of a call's commands."""

_encoder = msgspec.json.Encoder()


async def _stats(redis: Redis) -> dict[str, tuple[int, int]]:
    """(calls, usec) per command."""
    raw = await redis.info("commandstats")
    return {name: (int(v["calls"]), int(v["usec"])) for name, v in raw.items()}


async def _phase(redis: Redis, stage: QuotaStage | SelectStage, batch: int) -> dict[str, Any]:
    """Calls of ``stage`` over what its stream holds, ``batch`` entries each: µs of script
    per row and the commands the calls made per row."""
    script_us = rows = calls = 0
    made: dict[str, int] = {}
    while True:
        read: Any = await redis.xreadgroup(stage.group, "scriptcost",
                                           {s: ">" for s in stage.streams}, count=batch)
        entries = [Entry(text(stream), text(entry_id), fields)
                   for stream, items in read for entry_id, fields in items]
        if not entries:
            break
        before = await _stats(redis)
        await stage.handle(entries)
        for name, (n, us) in (await _stats(redis)).items():
            was_n, was_us = before.get(name, (0, 0))
            if name in SCRIPT_COMMANDS:
                script_us += us - was_us
            elif name not in NOT_THE_CALL and n > was_n:
                command = name.removeprefix("cmdstat_")
                made[command] = made.get(command, 0) + n - was_n
        rows += len(entries)
        calls += 1
    return {"rows": rows, "calls": calls, "us_per_row": round(script_us / max(rows, 1), 1),
            "commands_per_row": {k: round(v / rows, 2)
                                 for k, v in sorted(made.items(), key=lambda kv: -kv[1])
                                 if rows and v / rows >= 0.005}}


async def _round(redis: Redis, settings: Settings, keys: Keys, rows: int, batch: int,
                 rng: random.Random) -> dict[str, Any]:
    ctx = StageContext(redis=redis, settings=settings, clock=SystemClock())
    quota, select = QuotaStage(ctx), SelectStage(ctx)
    reply_to = keys.reply(f"scriptcost-{batch}")
    users = [f"bu{rng.randint(1, 500)}" for _ in range(rows)]
    for user in users:
        await redis.xadd(keys.requests, {"d": _encoder.encode(AllocateRequest(
            request_id=uuid.uuid4().hex, user_id=user, reply_to=reply_to,
            min_cpu_cores=rng.choice(CPU_CHOICES[:3]),
            min_memory_mb=rng.choice(MEM_CHOICES_MB[:3])))})
    result: dict[str, Any] = {"quota_admit": await _phase(redis, quota, batch),
              "select_allocate": await _phase(redis, select, batch)}
    replies: Any = await redis.xrange(reply_to)
    allocated = [reply for reply in (reply_decoder.decode(fields[b"d"]) for _, fields in replies)
                 if isinstance(reply, Allocated)]
    await redis.delete(reply_to)
    for got in allocated:
        await redis.xadd(keys.admitted, {"d": _encoder.encode(ReleaseRequest(
            request_id=uuid.uuid4().hex, reply_to=reply_to, allocation_id=got.allocation_id,
            user_id=got.user_id))})
    result["select_release"] = await _phase(redis, select, batch)
    result["allocated"] = len(allocated)
    await redis.delete(reply_to)
    return result


async def measure(redis_url: str, rows: int, batches: tuple[int, ...]) -> dict[str, Any]:
    """Per batch size: quota's admit, select's allocate and release, µs of Redis per row."""
    settings = replace(Settings.from_env().with_urls(redis_url, ""),
                       prefix=f"scriptcost{uuid.uuid4().hex[:8]}")
    keys = Keys(settings.prefix)
    redis = redis_client(settings)
    try:
        for script in ALL:
            await script.load(redis)
        await load_population(redis, keys, devices=2000, users=500)
        for stream, group in ((keys.requests, QuotaStage.group),
                              (keys.admitted, SelectStage.group)):
            await redis.xgroup_create(stream, group, id="$", mkstream=True)
        info = await redis.info("server")
        rng = random.Random(7)
        by_batch = {str(batch): await _round(redis, settings, keys, rows, batch, rng)
                    for batch in batches}
        memory = await redis.info("memory")
        return {"redis_version": info.get("redis_version"),
                "lua_memory_bytes": (memory.get("used_memory_vm_functions")
                                     or memory.get("used_memory_lua")),
                "rows": rows, "batches": by_batch}
    finally:
        await delete_keys(redis, settings.prefix)
        await redis.aclose()


def _table(doc: dict[str, Any]) -> str:
    lines = [(f"Redis {doc['redis_version']}: µs of Redis per row (script time, INFO "
              f"commandstats), {doc['rows']} rows")]
    for batch, result in doc["batches"].items():
        cells = ", ".join(f"{kind} {result[kind]['us_per_row']:.1f}"
                          for kind in ("quota_admit", "select_allocate", "select_release"))
        lines.append(f"  {batch:>3} per call: {cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scriptcost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="allocate requests per batch size")
    parser.add_argument("--batch", default="1,16", help="rows per script call, comma separated")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batch.split(","))
    if args.rows < 1 or not batches or min(batches) < 1:
        parser.error("--rows and every --batch must be positive")
    report.run_redis_tool(lambda url: measure(url, args.rows, batches), _table)


if __name__ == "__main__":
    main()
