"""Job control: list, show, history, run now, pause, resume, set the interval.

The live state of a job is its Redis hash (``Keys.job``; a job never run yet shows its
defaults); pause, resume and set-interval change it through jobs.lua, so every timers
worker sees the change at its next tick without a restart, and then write the job's
``job_info`` row. The history is read from ``job_executions``, newest first, a page at a
time. A manual run goes through the streams: a :class:`~schemas.messages.JobRunRequest`
on ``<prefix>:job_requests``, which a timers worker runs and answers on this caller's
own reply stream (deleted after).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
from redis.asyncio import Redis

from pipeline.clock import Clock
from pipeline.connections import text
from schemas.keys import Keys
from schemas.messages import (
    JobRunRequest,
    JobRunResult,
    encoder,
    job_run_result_decoder,
)
from schemas.rows import JobsCall
from stages.context import StageContext
from stages.jobs import JOBS, control_of, hash_of, iso, jobs_script, record_info
from stages.settings import Settings

HISTORY_PAGE = 20
"""Executions per page of ``devsched jobs history``."""
RUN_READ_BLOCK_MS = 200
"""How long one read of the answer to a manual run blocks."""


class UnknownJob(ValueError):
    """No job has that name."""


def _job(name: str) -> None:
    if name not in JOBS:
        raise UnknownJob(f"no job named {name!r} (jobs: {', '.join(JOBS)})")


def _ms_field(state: dict[str, str], name: str) -> int | None:
    value = state.get(name)
    return int(value) if value else None


async def job_state(redis: Redis, settings: Settings, name: str) -> dict[str, Any]:
    """One job as ``jobs show`` prints it: its info and live state."""
    _job(name)
    job = JOBS[name]
    state = {text(k): text(v) for k, v in (await redis.hgetall(
        Keys(settings.prefix).job(name))).items()}
    running = state.get("running") or None
    next_run = _ms_field(state, "next_run_ms")
    last_run = _ms_field(state, "last_run_ms")
    return {
        "name": name,
        "description": job.description,
        "interval_s": int(state.get("interval_ms") or job.default_interval_ms(settings)) / 1000,
        "enabled": state.get("paused") != "1",
        "status": state.get("status", "idle"),
        "last_status": state.get("last_status") or None,
        "last_run": iso(last_run) if last_run is not None else None,
        "next_run": iso(next_run) if next_run is not None else None,
        "next_run_ms": next_run,
        "running": running,
        "retries": int(state.get("retries") or 0),
        "max_retries": int(state.get("max_retries") or settings.job_max_retries),
        "timeout_s": int(state.get("timeout_ms") or settings.job_timeout_s * 1000) / 1000,
    }


async def list_jobs(redis: Redis, settings: Settings) -> list[dict[str, Any]]:
    return [await job_state(redis, settings, name) for name in JOBS]


async def history(pg: asyncpg.Pool, name: str, page: int = 1,
                  page_size: int = HISTORY_PAGE) -> list[dict[str, Any]]:
    """Page ``page`` (from 1) of the job's executions, newest first."""
    _job(name)
    async with pg.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, started_at, ended_at, duration_ms, processed_count, status, error,"
            " attempt, manual FROM job_executions WHERE job_name = $1"
            " ORDER BY started_at DESC, id LIMIT $2 OFFSET $3",
            name, page_size, (max(page, 1) - 1) * page_size)
    return [{
        "execution_id": str(r["id"]),
        "started_at": r["started_at"].isoformat(),
        "ended_at": r["ended_at"].isoformat() if r["ended_at"] else None,
        "duration_ms": r["duration_ms"], "processed_count": r["processed_count"],
        "status": r["status"], "error": r["error"], "attempt": r["attempt"],
        "manual": r["manual"],
    } for r in rows]


async def control(redis: Redis, pg: asyncpg.Pool | None, settings: Settings, clock: Clock,
                  name: str, action: str, interval_s: float | None = None) -> dict[str, Any]:
    """Pause, resume or set the interval of job ``name``; returns its state after."""
    _job(name)
    interval_ms = None if interval_s is None else int(interval_s * 1000)
    if action == "set_interval" and (interval_ms is None or interval_ms < 1):
        raise ValueError("the interval must be a positive number of seconds")
    ctx = StageContext(redis=redis, settings=settings, clock=clock, pg=pg)
    flat = await jobs_script(ctx, JobsCall(
        prefix=settings.prefix, now_ms=clock.now_ms(),
        control=control_of(JOBS[name], settings, clock.now_ms(), action, interval_ms)))
    await record_info(ctx, name, hash_of(flat))
    return await job_state(redis, settings, name)


async def run_job(redis: Redis, settings: Settings, name: str, *, timeout_s: float,
                  request_id: str | None = None) -> JobRunResult | None:
    """Ask the timers stage to run job ``name`` now and wait for its answer (None when
    none came within ``timeout_s``)."""
    keys = Keys(settings.prefix)
    reply_to = keys.reply(f"jobs-{uuid.uuid4().hex}")
    request = JobRunRequest(request_id=request_id or uuid.uuid4().hex, reply_to=reply_to,
                            job=name)
    await redis.xadd(keys.job_requests, {"d": encoder.encode(request)})
    deadline = time.monotonic() + timeout_s
    last = "0-0"
    try:
        while time.monotonic() < deadline:
            got: Any = await redis.xread({reply_to: last}, count=10, block=RUN_READ_BLOCK_MS)
            for _, entries in got or []:
                for entry_id, fields in entries:
                    last = text(entry_id)
                    result = job_run_result_decoder.decode(fields[b"d"])
                    if result.request_id == request.request_id:
                        return result
            await asyncio.sleep(0)
        return None
    finally:
        await redis.delete(reply_to)
