"""The consumer-group worker loop: read a batch, hand it to a stage, repeat.

What it promises:

* **At-least-once delivery, exactly-once effects.** A stage's ``handle`` gets a
  batch and must make its effects and ack the entries in one atomic step (one
  script or one MULTI/EXEC). If ``handle`` raises, nothing is acked: the
  entries stay pending and come back. A crash anywhere leaves every entry
  either fully done and acked, or not done and pending.
* **A poison entry cannot block a batch.** When a batch fails, its entries are
  retried one at a time; the ones that still fail stay pending with their
  error recorded (``<prefix>:errors:<group>``, with a TTL so a crash cannot
  leave it forever).
* **Dead consumers are reclaimed.** Every ``claim_every_ms`` the worker runs
  XAUTOCLAIM for entries idle longer than ``claim_idle_ms``, keeping the
  cursor between calls so entries beyond the first page are reached too, at
  most ``RECLAIM_PAGE`` entries per call so one call stays cheap. An entry
  delivered more than ``max_deliveries`` times is moved to the dead stream
  with stage, error and delivery count, atomically with its ack.
* **Nothing waits for a reclaim after an outage.** A read that Redis answered but
  whose reply was lost (the connection broke, the server restarted) leaves entries
  pending to this consumer that it never saw; after an outage the worker first
  walks its own pending list (XREADGROUP from id 0) and handles what is there, so
  those entries are done at once, not after ``claim_idle_ms``.
* **Reads never hang and are never cut.** XREADGROUP blocks at most
  ``block_ms`` on a connection of its own whose socket timeout is longer than
  that (kept by the RawChannel's watchdog); the loop stops by a flag checked
  between reads, never by cancelling a read in flight. On stop the current batch
  finishes, then the loop exits.
* **A lost group is made again, not a crash.** When Redis lost its streams (it came
  back empty, or was emptied), a read or a claim answers NOGROUP (Redis 7: a read
  blocked at that moment answers UNBLOCKED): the worker logs
  it, creates its groups again (at the start of each stream: whatever producers
  added since is read) and goes on; a batch in hand is kept and handled as usual.
* **Batches are as large as the stage wants.** A stage off the request path
  (the write-behind) declares a :class:`Batching` with a linger: after a batch
  that was not full the worker waits that long before reading again, so its
  per-batch costs (a transaction, a script call) are paid for many entries. The
  request path never lingers: it takes whatever is there at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pipeline import metrics
from pipeline.clock import Clock
from pipeline.connections import REDIS_DOWN, RawChannel, command, stream_items, text
from pipeline.settings import RuntimeSettings
from schemas.runtime import DeadLetter, dead_encoder

log = logging.getLogger("devsched.worker")

RECLAIM_PAGE = 100
"""Most entries one XAUTOCLAIM call takes over."""
ERROR_TTL_S = 7 * 86_400
"""How long the last error of a pending entry is remembered."""
CONSUMER_FORGET_MS = 600_000
"""A consumer with nothing pending, idle this long, is removed from its group."""
TRANSIENT_BACKOFF_MIN_S = 0.1
TRANSIENT_BACKOFF_MAX_S = 5.0
"""Bounds of the back-off while a dependency is down."""


@dataclass(frozen=True, slots=True)
class Entry:
    stream: str
    id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1

    @property
    def data(self) -> bytes:
        return self.fields.get(b"d", b"")


@dataclass(frozen=True, slots=True)
class Batching:
    """How a stage reads: at most ``size`` entries per read; after a read that was not
    full, wait ``linger_ms`` before the next so that entries gather into larger batches
    (for stages off the latency path, where per-batch costs dominate)."""

    size: int
    linger_ms: int = 0


DEAD_ERROR_MAX = 1_000
"""Characters of an error kept in a dead letter."""
REFUSED_PAYLOAD_MAX = 4_096
"""Bytes of a refused (invalid) entry's payload kept in its dead letter: enough to see
what was wrong; such an entry is never replayed as it is."""


def dead_letter_of(entry: Entry, *, stage: str, error: str, at_ms: int,
                   refused: bool = False) -> DeadLetter:
    """The dead letter for ``entry``: the one way the worker and every stage build one.
    An entry given up on keeps its whole payload (so it can be replayed once fixed); an
    entry ``refused`` as invalid input keeps its first ``REFUSED_PAYLOAD_MAX`` bytes."""
    data = entry.data[:REFUSED_PAYLOAD_MAX] if refused else entry.data
    return DeadLetter(
        stage=stage, stream=entry.stream, entry_id=entry.id, error=error[:DEAD_ERROR_MAX],
        deliveries=entry.deliveries, payload=data.decode("utf-8", "replace"), at_ms=at_ms,
    )


class Transient(Exception):
    """Raised by a stage when a dependency (PostgreSQL, an HTTP service) is down.

    The worker keeps the batch, backs off and retries it until it succeeds or the
    worker stops, refreshing its claim (XCLAIM JUSTID: no delivery is counted) so
    that an outage never pushes entries to the dead stream.
    """


RETRIED_WHOLE: tuple[type[BaseException], ...] = (Transient, *REDIS_DOWN)
"""What a stage's handle may raise for its batch to be kept and retried whole."""


class Stage(Protocol):
    """What the runtime drives. ``group`` is the consumer group's name. A stage may
    also carry ``batching`` (a :class:`Batching`); without it the worker reads
    ``settings.batch_size`` entries and never lingers."""

    @property
    def group(self) -> str: ...

    @property
    def streams(self) -> Sequence[str]: ...

    async def handle(self, entries: Sequence[Entry]) -> None:
        """Make the batch's effects and ack all of ``entries`` atomically; raise to retry."""
        ...


def is_nogroup(exc: BaseException) -> bool:
    """True for Redis's answer about a stream or group that does not exist (NOGROUP), or
    (Redis 7) a blocked read ended because its stream was deleted meanwhile (UNBLOCKED
    the stream key no longer exists): the group is gone with it either way."""
    return isinstance(exc, ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED"))


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    """Create the group at the start of the stream (so nothing written earlier is skipped)."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def groups_caught_up(redis: Redis, stream: str, groups: Sequence[str]) -> bool:
    """True when every entry of ``stream`` was delivered to and acked by each of ``groups``."""
    last = await redis.xrevrange(stream, count=1)
    try:
        info = {text(g["name"]): g for g in await redis.xinfo_groups(stream)}
    except ResponseError:  # no stream yet
        return False
    return all(
        name in info and int(info[name]["pending"]) == 0
        and (not last or info[name]["last-delivered-id"] == last[0][0])
        for name in groups
    )


class StageWorker:
    def __init__(
        self,
        stage: Stage,
        redis: Redis,
        reader: Redis,
        settings: RuntimeSettings,
        clock: Clock,
        *,
        consumer: str | None = None,
        dead_stream: str,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``sleep`` is how the worker waits between turns (the linger after a short
        batch, the back-offs while Redis or a dependency is down); a test passes one
        it can observe and hold."""
        self.stage = stage
        self.redis = redis
        self._reader = reader
        self._read_channel = RawChannel(reader)
        self.settings = settings
        self.clock = clock
        self.consumer = consumer or consumer_name()
        self.dead_stream = dead_stream
        self._sleep = sleep
        self.errors_key = f"{settings.prefix}:errors:{stage.group}"
        self._stopping = False
        self._cursors: dict[str, str] = {s: "0-0" for s in stage.streams}
        self._last_claim = 0.0
        self._own_cursor: dict[str, str] | None = None
        """Set after an outage: where this consumer's own pending list is read from next."""
        self._label = stage.group
        batching = getattr(stage, "batching", None) or Batching(settings.batch_size)
        self._batch_size = batching.size
        self._linger_s = batching.linger_ms / 1000
        # labelled metric children, bound once (a labels() lookup per batch costs)
        self._consumed = metrics.CONSUMED.labels(stage.group)
        self._handled = metrics.HANDLED.labels(stage.group)
        self._batch_seconds = metrics.BATCH_SECONDS.labels(stage.group)
        self._queue_wait = metrics.QUEUE_WAIT.labels(stage.group)

    @property
    def reader(self) -> Redis:
        """The client the blocking reads go through (one connection of it is held)."""
        return self._reader

    @reader.setter
    def reader(self, reader: Redis) -> None:
        self._reader = reader
        self._read_channel = RawChannel(reader)

    def stop(self) -> None:
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def setup(self) -> None:
        for stream in self.stage.streams:
            await ensure_group(self.redis, stream, self.stage.group)
            # registered now (Redis 6.2 would wait for the first entry): shows the worker is up
            await command(self.redis, "XGROUP", "CREATECONSUMER", stream, self.stage.group,
                          self.consumer)

    async def run(self) -> None:
        await self.setup()
        log.info("worker started", extra={"stage": self.stage.group, "consumer": self.consumer})
        try:
            while not self._stopping:
                try:
                    await self.run_once()
                except REDIS_DOWN as exc:
                    log.warning("redis unavailable, retrying: %s", exc,
                                extra={"stage": self._label})
                    # a read whose reply was lost left entries pending to this consumer:
                    # take them first when Redis is back, not after claim_idle_ms
                    self._own_cursor = {s: "0-0" for s in self.stage.streams}
                    await self._sleep(0.5)
                except ResponseError as exc:
                    if not is_nogroup(exc):
                        raise
                    await self._group_lost(exc)
        finally:
            await self._read_channel.close()
        log.info("worker stopped", extra={"stage": self.stage.group, "consumer": self.consumer})

    async def _group_lost(self, exc: BaseException) -> None:
        log.warning("consumer group gone (Redis lost its streams?); creating it again: %s",
                    exc, extra={"stage": self._label})
        self._cursors = {s: "0-0" for s in self.stage.streams}
        await self.setup()

    async def run_once(self, block_ms: int | None = None) -> int:
        """One turn: reclaim if due, read one batch, handle it. Returns entries handled."""
        done = 0
        if time.monotonic() - self._last_claim >= self.settings.claim_every_ms / 1000:
            self._last_claim = time.monotonic()
            done += await self.reclaim()
            await self.sample()
            await self.forget_idle_consumers()
            periodic = getattr(self.stage, "periodic", None)
            if periodic is not None:  # a stage's own periodic work (optional)
                await periodic()
        if self._own_cursor is not None:
            own = await self.read_own_pending()
            if own:
                return done + await self.process(own)
        entries = await self.read(self.settings.block_ms if block_ms is None else block_ms)
        if entries:
            done += await self.process(entries)
            if self._linger_s and len(entries) < self._batch_size and not self._stopping:
                await self._sleep(self._linger_s)
        return done

    async def read(self, block_ms: int) -> list[Entry]:
        streams = self.stage.streams
        block = ["BLOCK", block_ms] if block_ms else []
        reply = await self._read_channel.call(
            "XREADGROUP", "GROUP", self.stage.group, self.consumer, "COUNT", self._batch_size,
            *block, "STREAMS", *streams, *[">"] * len(streams))
        entries: list[Entry] = []
        for stream, items in stream_items(reply):
            name = text(stream)
            for entry_id, fields in items:
                eid = text(entry_id)
                entries.append(Entry(name, eid, dict(zip(fields[::2], fields[1::2]))
                                     if fields else {}))
        return entries

    async def read_own_pending(self) -> list[Entry]:
        """The next page of entries pending to this very consumer (after an outage: a read
        Redis answered but whose reply never arrived). Walks each stream's pending list
        once, from its start; entries deleted from the stream meanwhile are acked."""
        assert self._own_cursor is not None
        streams = list(self._own_cursor)
        reply = await self._read_channel.call(
            "XREADGROUP", "GROUP", self.stage.group, self.consumer, "COUNT", self._batch_size,
            "STREAMS", *streams, *[self._own_cursor[s] for s in streams])
        entries: list[Entry] = []
        seen = False
        for stream, items in stream_items(reply):
            name = text(stream)
            gone: list[str] = []
            for entry_id, fields in items:
                seen = True
                eid = text(entry_id)
                self._own_cursor[name] = eid
                if fields:
                    entries.append(Entry(name, eid, dict(zip(fields[::2], fields[1::2]))))
                else:
                    gone.append(eid)
            if gone:
                await self.redis.xack(name, self.stage.group, *gone)
        if not seen:
            self._own_cursor = None
        return entries

    async def process(self, entries: list[Entry]) -> int:
        read_ms = time.time() * 1000
        started = time.perf_counter()
        try:
            await self._handle_through_outages(entries)
        except Transient:
            self._count_read(entries, read_ms)
            return 0  # stopping during an outage: the batch stays pending for later
        except Exception as exc:  # noqa: BLE001 - any failure leaves the batch pending
            self._count_read(entries, read_ms)
            return await self._one_by_one(entries, exc)
        self._batch_seconds.observe(time.perf_counter() - started)
        self._count_read(entries, read_ms)
        self._handled.inc(len(entries))
        return len(entries)

    def _count_read(self, entries: list[Entry], read_ms: float) -> None:
        """Count a batch read and record each entry's wait in its stream (its id starts
        with the ms Redis added it at), once the batch is handled: a metric write costs a
        locked write to a shared file (multiprocess mode), and done before the handling
        it would be on every request's path."""
        self._consumed.inc(len(entries))
        metrics.observe_many(self._queue_wait, [
            max(0.0, read_ms - int(e.id.partition("-")[0])) / 1000 for e in entries])

    async def _one_by_one(self, entries: list[Entry], exc: Exception) -> int:
        """After a batch failed: each entry alone; one that fails again is recorded (it
        stays pending, and is dead-lettered after ``max_deliveries``)."""
        if len(entries) == 1:
            await self._record_failure(entries[0], exc)
            return 0
        log.warning("batch failed, retrying one by one: %r", exc, extra={"stage": self._label})
        done = 0
        for entry in entries:
            try:
                await self._handle_through_outages([entry])
                done += 1
            except Transient:
                break
            except Exception as one_exc:  # noqa: BLE001
                await self._record_failure(entry, one_exc)
        self._handled.inc(done)
        return done

    async def _handle_through_outages(self, entries: list[Entry]) -> None:
        """Handle the batch; while a dependency is down (the stage raises Transient) or
        Redis drops the call (a restarted server breaks the connections in hand), back
        off and retry it whole: its effects are idempotent, as under redelivery."""
        backoff = TRANSIENT_BACKOFF_MIN_S
        while entries:
            try:
                await self.stage.handle(entries)
                return
            except RETRIED_WHOLE as exc:
                if self._stopping:
                    if isinstance(exc, Transient):
                        raise
                    raise Transient(f"redis: {exc!r}") from exc
                log.warning("dependency down, retrying in %.1fs: %s", backoff, exc,
                            extra={"stage": self._label})
            # Before the next try, claim the batch again; a call Redis dropped may have run
            # (its effects, outputs and acks landed, the answer did not reach us): the
            # entries it acked are no longer pending, and are not handled twice
            while True:
                await self._sleep(backoff)
                backoff = min(backoff * 2, TRANSIENT_BACKOFF_MAX_S)
                try:
                    entries = await self._keep_claim(entries)
                    break
                except REDIS_DOWN as exc:  # Redis itself still down: wait again
                    if self._stopping:
                        raise Transient(f"redis: {exc!r}") from exc

    async def _keep_claim(self, entries: list[Entry]) -> list[Entry]:
        """Claim ``entries`` for this consumer again (XCLAIM JUSTID: no delivery counted);
        the ones still pending for the group, in order: an entry acked meanwhile is done."""
        by_stream: dict[str, list[int | bytes | str | memoryview]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry.id)
        kept: set[tuple[str, str]] = set()
        for stream, ids in by_stream.items():
            # xclaim(justid=True), not execute_command: redis-py parses a raw XCLAIM reply
            # as entries and fails on a list of ids
            try:
                claimed = await self.redis.xclaim(
                    stream, self.stage.group, self.consumer, 0, ids, justid=True
                )
            except ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                # the stream went away with its entries: the batch in hand is their only
                # copy; keep it, and have the group back for what comes next
                await self._group_lost(exc)
                kept.update((stream, str(i)) for i in ids)
                continue
            kept.update((stream, text(i)) for i in claimed)
        return [e for e in entries if (e.stream, e.id) in kept]

    async def _record_failure(self, entry: Entry, exc: BaseException) -> None:
        metrics.FAILED.labels(self._label).inc()
        text = f"{type(exc).__name__}: {exc}"[:1000]
        log.error(
            "entry failed: %s",
            text,
            extra={"stage": self._label, "stream": entry.stream, "entry": entry.id},
        )
        field = f"{entry.stream}/{entry.id}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.errors_key, field, text)
            pipe.expire(self.errors_key, ERROR_TTL_S)
            await pipe.execute()

    async def reclaim(self) -> int:
        """Take over entries idle past claim_idle_ms; dead-letter those delivered too often."""
        done = 0
        for stream in self.stage.streams:
            cursor = self._cursors[stream]
            reply = await command(
                self.redis, "XAUTOCLAIM", stream, self.stage.group, self.consumer,
                self.settings.claim_idle_ms, cursor, "COUNT", RECLAIM_PAGE,
            )
            # Redis 6.2 answers [cursor, entries]; 7.x adds a third element (deleted ids).
            next_cursor, items = reply[0], reply[1]
            self._cursors[stream] = text(next_cursor)
            claimed: list[Entry] = []
            vanished: list[str] = []
            unnamed = False
            for item in items:
                if item is None or item[0] is None:
                    # Redis 6.2 answers a pending entry deleted from the stream with nil
                    # (no id) and leaves it pending; found by _deleted_pending below
                    unnamed = True
                    continue
                entry_id, fields = item[0], item[1]
                eid = text(entry_id)
                if fields is None:
                    vanished.append(eid)
                    continue
                pairs = dict(zip(fields[::2], fields[1::2])) if isinstance(fields, list) else fields
                claimed.append(Entry(stream, eid, pairs))
            if unnamed:
                vanished += await self._deleted_pending(
                    stream, cursor, self._cursors[stream], {e.id for e in claimed})
            if vanished:
                await self.redis.xack(stream, self.stage.group, *vanished)
            if not claimed:
                continue
            metrics.RECLAIMED.labels(self._label).inc(len(claimed))
            counts = await self._delivery_counts(stream, claimed)
            fresh: list[Entry] = []
            for entry in claimed:
                n = counts.get(entry.id, 1)
                if n > self.settings.max_deliveries:
                    await self.dead_letter(entry, n)
                else:
                    fresh.append(Entry(entry.stream, entry.id, entry.fields, n))
            if fresh:
                done += await self.process(fresh)
        return done

    async def _deleted_pending(
        self, stream: str, start: str, end: str, present: set[str]
    ) -> list[str]:
        """Ids pending to this consumer in the page [start, end) that are gone from the stream."""
        rows = await self.redis.xpending_range(
            stream, self.stage.group, min=start, max="+" if end == "0-0" else f"({end}",
            count=2 * RECLAIM_PAGE, consumername=self.consumer,
        )
        gone: list[str] = []
        for row in rows:
            mid = row["message_id"]
            eid = text(mid)
            if eid not in present and not await self.redis.xrange(stream, eid, eid, count=1):
                gone.append(eid)
        return gone

    async def _delivery_counts(self, stream: str, entries: list[Entry]) -> dict[str, int]:
        rows = await self.redis.xpending_range(
            stream, self.stage.group, min=entries[0].id, max=entries[-1].id,
            count=len(entries) + RECLAIM_PAGE, consumername=self.consumer,
        )
        counts: dict[str, int] = {}
        for row in rows:
            mid = row["message_id"]
            counts[text(mid)] = int(row["times_delivered"])
        return counts

    async def dead_letter(self, entry: Entry, deliveries: int) -> None:
        """Move one entry to the dead stream with why, and ack it, atomically."""
        field = f"{entry.stream}/{entry.id}"
        error = await self.redis.hget(self.errors_key, field)
        letter = dead_letter_of(
            Entry(entry.stream, entry.id, entry.fields, deliveries), stage=self.stage.group,
            error=text(error) if error else "delivered too many times", at_ms=self.clock.now_ms(),
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_stream, {"d": dead_encoder.encode(letter)})
            pipe.xack(entry.stream, self.stage.group, entry.id)
            pipe.hdel(self.errors_key, field)
            await pipe.execute()
        metrics.DEAD_LETTERED.labels(self._label).inc()
        log.error(
            "dead-lettered after %d deliveries: %s", deliveries, letter.error,
            extra={"stage": self._label, "stream": entry.stream, "entry": entry.id},
        )

    async def forget_idle_consumers(self) -> None:
        """Delete consumers of this group that hold nothing and were idle for long
        (workers that exited); one with pending entries stays until reclaimed."""
        idle_limit = max(CONSUMER_FORGET_MS, 10 * self.settings.claim_idle_ms)
        for stream in self.stage.streams:
            try:
                consumers = await self.redis.xinfo_consumers(stream, self.stage.group)
            except ResponseError:
                continue
            for c in consumers:
                name = text(c["name"])
                if name != self.consumer and int(c["pending"]) == 0 and int(c["idle"]) > idle_limit:
                    await self.redis.xgroup_delconsumer(stream, self.stage.group, name)

    async def sample(self) -> None:
        """Update the pending, lag and behind gauges of this stage's groups."""
        for stream in self.stage.streams:
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:
                continue
            for g in groups:
                name = text(g["name"])
                if name != self.stage.group:
                    continue
                pending = int(g.get("pending", 0))
                metrics.PENDING.labels(self._label, stream).set(pending)
                lag = g.get("lag")
                if lag is not None:
                    metrics.LAG.labels(self._label, stream).set(int(lag))
                metrics.BEHIND.labels(self._label, stream).set(
                    await self._behind_s(stream, pending, text(g["last-delivered-id"])))

    async def _behind_s(self, stream: str, pending: int, last_delivered: str) -> float:
        """Age (s) of the oldest entry of ``stream`` this group has not acked: its oldest
        pending entry, or the first one not yet delivered; 0 when it has done them all."""
        oldest: int | None = None
        if pending:
            summary = await self.redis.xpending(stream, self.stage.group)
            if summary.get("min"):
                oldest = int(text(summary["min"]).partition("-")[0])
        if oldest is None:
            first_new = await self.redis.xrange(stream, f"({last_delivered}", "+", count=1)
            if first_new:
                oldest = int(text(first_new[0][0]).partition("-")[0])
        return 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)
