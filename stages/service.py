"""Serve named stages in this process: connections, scripts, workers, ticker.

This is what `devsched worker NAME` and `devsched run --in-process` call. The
timers stage brings the ticker with it (every timers process runs one; racing
tickers add one tick per period between them).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

from pipeline import metrics
from pipeline.clock import Clock, SystemClock
from pipeline.connections import pg_pool, redis_client
from pipeline.runner import Background, run_workers
from pipeline.settings import Settings
from stages.context import StageContext
from stages.registry import NEEDS_POSTGRES, STAGES
from stages.scripts import ALL
from stages.timers import run_ticker


async def serve(
    names: Sequence[str], settings: Settings, clock: Clock | None = None, *,
    stop: asyncio.Event | None = None, install_signals: bool = True,
) -> None:
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {sorted(STAGES)}")
    clock = clock or SystemClock()
    redis = redis_client(settings)
    pg = None
    if NEEDS_POSTGRES.intersection(names):
        pg = await pg_pool(settings, max_size=max(2, len(names)))
    try:
        for script in ALL:
            await script.load(redis)
        ctx = StageContext(redis=redis, settings=settings, clock=clock, pg=pg)
        stages = [STAGES[n](ctx) for n in names]
        background: list[Background] = []
        if "timers" in names:
            background.append(functools.partial(run_ticker, ctx))
        metrics.serve(settings.metrics_port)
        await run_workers(stages, redis, settings, clock, dead_stream=ctx.keys.dead,
                          background=background, stop=stop, install_signals=install_signals)
    finally:
        if pg is not None:
            await pg.close()
        await redis.aclose()
