"""timers: the ticker, and the tracked jobs each tick runs (stages.jobs).

The ticker adds one tick per period to the ticks stream with the explicit id
``<period start ms>-0``; a second ticker racing it gets "equal or smaller" and
adds nothing, so there is exactly one tick per period with no leader. Each tick
goes to one consumer of the ``timers`` group, which runs the jobs that are due
(expire every tick, which also ends every wait of the queue that is over; the
reservations' activate_reservations, cancel_no_shows and complete_reservations every tick;
trim, the
statistics snapshot, the purge, ...; jobs.lua claims each at most once per period,
whichever worker asks). Ticks are acked after their
work; a crashed run is reclaimed, and what it had claimed runs again once its claim
times out. The same group reads ``<prefix>:job_requests``: a manual run of one job
(``devsched jobs run``), answered on the requester's reply stream, once per request id.
The worker that handles a tick also publishes when it was (``devsched_timer_last_tick_seconds``)
and, every ``POOL_SAMPLE_EVERY_MS``, the pools' device counts (``devsched_pool_devices``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import msgspec
from redis.exceptions import ResponseError

from pipeline.connections import REDIS_DOWN
from pipeline.worker import Entry, dead_letter_of
from schemas.keys import GROUP_TIMERS
from schemas.messages import Tick, encoder, job_run_request_decoder
from schemas.runtime import dead_encoder
from stages import metrics
from stages.context import StageContext
from stages.jobs import expire_due, run_due, run_now, trim_streams
from stages.tools.admin import pools

__all__ = ["TimersStage", "add_tick", "expire_due", "run_ticker", "trim_streams"]

log = logging.getLogger("devsched.timers")

POOL_SAMPLE_EVERY_MS = 15_000
"""How often the pools' device counts are published (on the ticks, by the worker that
gets them)."""
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


class TimersStage:
    """Reads the ticks and the manual job runs; a batch with a tick runs the due jobs once."""

    group = GROUP_TIMERS

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.streams = [ctx.keys.ticks, ctx.keys.job_requests]
        self._pools_sampled_ms: int | None = None

    async def sample_pools(self) -> None:
        """Publish the pools' device counts (``devsched_pool_devices``) at most every
        ``POOL_SAMPLE_EVERY_MS``: a read of every device, off the request path."""
        now = self.ctx.clock.now_ms()
        if self._pools_sampled_ms is not None and now - self._pools_sampled_ms < POOL_SAMPLE_EVERY_MS:
            return
        self._pools_sampled_ms = now
        try:
            found = await pools(self.ctx.redis, self.ctx.keys)
        except Exception as exc:  # noqa: BLE001 - a sample is no reason to fail the tick
            log.warning("pool sample failed: %r", exc)
            return
        for p in found:
            metrics.POOL_DEVICES.labels(p.pool, "free").set(p.free)
            metrics.POOL_DEVICES.labels(p.pool, "allocated").set(p.allocated)
            metrics.POOL_DEVICES.labels(p.pool, "out_of_service").set(p.maintenance + p.down)

    async def handle(self, entries: Sequence[Entry]) -> None:
        ticks = [e.id for e in entries if e.stream == self.streams[0]]
        if ticks:
            await run_due(self.ctx)
            await self.ctx.redis.xack(self.streams[0], self.group, *ticks)
            metrics.TIMER_LAST_TICK.set(max(int(t.partition("-")[0]) for t in ticks) / 1000)
            await self.sample_pools()
        for entry in entries:
            if entry.stream == self.streams[1]:
                await self.answer(entry)

    async def answer(self, entry: Entry) -> None:
        """Run the requested job and answer, once per request id: the answer is stored,
        sent and the entry acked in one transaction; a redelivered request gets the
        stored answer. A request that does not decode goes to the dead stream."""
        ctx, k = self.ctx, self.ctx.keys
        try:
            request = job_run_request_decoder.decode(entry.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            letter = dead_letter_of(entry, stage=self.group, error=f"invalid job run: {exc}",
                                    at_ms=ctx.clock.now_ms(), refused=True)
            async with ctx.redis.pipeline(transaction=True) as tx:
                tx.xadd(k.dead, {"d": dead_encoder.encode(letter)})
                tx.xack(entry.stream, self.group, entry.id)
                await tx.execute()
            return
        stored = await ctx.redis.get(k.job_answer(request.request_id))
        payload = stored if stored is not None else encoder.encode(
            await run_now(ctx, request.job, request.request_id))
        async with ctx.redis.pipeline(transaction=True) as tx:
            tx.set(k.job_answer(request.request_id), payload, ex=ctx.settings.idempotency_ttl_s)
            tx.xadd(request.reply_to, {"d": payload})
            tx.expire(request.reply_to, ctx.settings.reply_ttl_s)
            tx.xack(entry.stream, self.group, entry.id)
            await tx.execute()
