"""timers: the ticker and the work each tick triggers (expiry, wait time-outs, trimming).

The ticker adds one tick per period to the ticks stream with the explicit id
``<period start ms>-0``; a second ticker racing it gets "equal or smaller" and
adds nothing, so there is exactly one tick per period with no leader. Each tick
goes to one consumer of the ``timers`` group, which closes every allocation past
its expires-at and ends every wait of the queue that is over (``timed_out``, within
one tick period), in bounded script calls, each atomic and idempotent, and, every
few ticks, trims the streams. Ticks are acked after their work; a crashed run is
reclaimed and simply runs again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from redis.exceptions import ResponseError

from pipeline.connections import REDIS_DOWN, text
from pipeline.trim import trim
from pipeline.worker import Entry
from schemas.keys import GROUP_TIMERS
from schemas.messages import Tick, encoder
from schemas.rows import ExpireCall, ExpireKeys
from stages import metrics
from stages.context import StageContext
from stages.scripts import EXPIRE

log = logging.getLogger("devsched.timers")

TICKS_MAXLEN = 10_000
"""Ticks kept; a tick is tiny and older ones are never needed."""


async def add_tick(ctx: StageContext) -> bool:
    """Add this period's tick; False when another ticker already did."""
    period = ctx.settings.tick_ms
    start = ctx.clock.now_ms() // period * period
    try:
        await ctx.redis.xadd(
            ctx.keys.ticks, {"d": encoder.encode(Tick(at_ms=start))}, id=f"{start}-0",
            maxlen=TICKS_MAXLEN, approximate=True,
        )
    except ResponseError as exc:
        if "equal or smaller" in str(exc):
            return False
        raise
    return True


async def run_ticker(ctx: StageContext, stopping: asyncio.Event) -> None:
    period = ctx.settings.tick_ms / 1000
    while not stopping.is_set():
        try:
            await add_tick(ctx)
        except REDIS_DOWN as exc:
            log.warning("ticker cannot reach redis: %s", exc)
        try:
            await asyncio.wait_for(stopping.wait(), timeout=period)
        except TimeoutError:
            pass


async def expire_due(ctx: StageContext) -> int:
    """End every wait that is over (``timed_out``) and close every allocation whose
    expires-at has passed; returns how many allocations."""
    s = ctx.settings
    total = 0
    while True:
        count, seen, closed, late = await EXPIRE(ctx.redis, ExpireKeys(changes=ctx.keys.changes),
                                           ExpireCall(prefix=s.prefix, now_ms=ctx.clock.now_ms(),
                                                      limit=s.expire_batch,
                                                      released_ttl_s=s.released_ttl_s))
        total += int(count)
        if log.isEnabledFor(logging.INFO):
            for i in range(0, len(closed), 3):
                log.info("allocation expired", extra={
                    "allocation_id": text(closed[i]), "user_id": text(closed[i + 1]),
                    "device_id": text(closed[i + 2])})
        if int(seen) < s.expire_batch and int(late) < s.expire_batch:
            break
    if total:
        metrics.AUTO_RELEASE.labels("expired").inc(total)
    return total


async def trim_streams(ctx: StageContext) -> int:
    k = ctx.keys
    removed = 0
    for stream in (k.requests, k.admitted, k.changes, k.ticks, k.events, k.notifications, k.dead):
        removed += await trim(ctx.redis, stream)
    return removed


class TimersStage:
    group = GROUP_TIMERS

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.streams = [ctx.keys.ticks]
        self._ticks_seen = 0

    async def handle(self, entries: Sequence[Entry]) -> None:
        await expire_due(self.ctx)
        self._ticks_seen += len(entries)
        if self._ticks_seen >= self.ctx.settings.trim_every_ticks:
            self._ticks_seen = 0
            await trim_streams(self.ctx)
        await self.ctx.redis.xack(self.streams[0], self.group, *[e.id for e in entries])
