"""Resilient HTTP delivery of stream entries: one sender, one retry queue, one sink stage.

An application's HTTP sinks all go through this module, so they share one behaviour:

* **Sender** (:class:`HttpSender`): one httpx client per sink, a timeout per request,
  up to ``attempts`` tries per send with exponential back-off and jitter between them
  (:func:`backoff_ms`: attempt n waits between half and all of
  ``min(backoff_max_ms, backoff_ms * 2**n)``), behind a :class:`CircuitBreaker`.
  A 2xx answer is accepted; another 4xx (but 408 and 429) is a rejection that no retry
  can change; a 5xx, 408, 429, a timeout or a refused connection is a failure.
* **Circuit breaker**: closed until ``breaker_failures`` failures in a row, then open:
  nothing is sent (a send fails at once, "circuit open") for ``breaker_open_ms`` of the
  injected clock; then half-open: one request (the probe) goes through, the others
  still fail at once; the probe's success closes it, its failure opens it again. So a
  service answering 500 gets at most ``breaker_failures`` requests and then one probe
  per open period from a process, never a storm. The state is a gauge
  (``devsched_breaker_state{breaker}``: 0 closed, 1 half-open, 2 open) and a field of a Redis
  hash that the application's `stats` shows.
* **Retry queue** (:class:`RetryQueue`): a sorted set per sink of
  :class:`~schemas.runtime.RetryItem` scored by when each is due. What a send could not
  deliver is parked there in the same MULTI/EXEC that acks its stream entries, so it is
  never lost and never blocks the stream; a background loop takes due items (a lease
  moves their score ahead, under WATCH, so two processes do not take the same item),
  sends them in batches, and reschedules a failure with a longer back-off. An item
  whose first failure is older than ``retry_budget_ms`` goes to the dead stream with
  its last error (and so does a rejected one, at once), atomically with its removal.
* **Backlog** (:meth:`SinkStage.send_backlog`): items the application finds in a
  durable store of its own that were never delivered (e.g. made while the sink was
  off) go through the same sender, batches and Idempotency-Key rule; a rejected one
  is dead-lettered like any other, and a failed one is left where it is (the store
  keeps it; the application offers it again later), so the retry queue is not used.
* **Sink stage** (:class:`SinkStage`): reads its source stream and its replay stream
  (a dead letter of the sink names the replay stream, so a replayed payload is sent
  again), turns entries into items (the application's :class:`SinkKind`), sends them
  in batches of ``batch``, lets the kind record what was accepted, then parks the rest,
  dead-letters the rejected and acks every entry in one transaction. With no base URL
  the sink is off: entries are acked and nothing is sent.

Delivery is at least once: a crash after the service accepted a batch and before the
ack sends it again, and a retried batch may be cut differently. Each batch carries an
``Idempotency-Key`` derived from its items' keys (the same items, the same key), and
every item has a key the receiver can dedupe by.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from pipeline.clock import Clock
from pipeline.connections import text
from pipeline.metrics import DEAD_LETTERED, set_breaker_state
from pipeline.worker import Batching, Entry, Transient, dead_letter_of
from schemas.runtime import RetryItem, dead_encoder, retry_decoder, retry_encoder

log = logging.getLogger("devsched.http_sink")

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"

HTTP_REQUESTS = Counter(
    "devsched_http_requests", "Requests of an HTTP sink by outcome", ["sink", "outcome"])
"""Exported as ``devsched_http_requests_total``; ``outcome``: accepted, rejected, failed
(a request made that failed), short_circuited (not made: the breaker was open)."""
RETRY_QUEUED = Gauge("devsched_http_retry_queued", "Items in an HTTP sink's retry queue", ["sink"])
DELIVERED = Counter("devsched_http_delivered", "Items an HTTP sink delivered", ["sink"])
"""Exported as ``devsched_http_delivered_total``."""

RETRY_POLL_S = 0.2
"""How often the retry loop looks for due items when it found none."""
LEASE_SLACK_MS = 5_000
"""A taken retry item comes due again this long after its sends could have ended (so an
item of a process that died while sending is sent again)."""


@dataclass(frozen=True)
class SenderConfig:
    """How an HTTP sink sends; the application fills it from its settings."""

    timeout_s: float = 5.0
    attempts: int = 3
    """Tries per send (the first included) before the items go to the retry queue."""
    backoff_ms: int = 200
    backoff_max_ms: int = 60_000
    retry_budget_ms: int = 86_400_000
    """An item failing for longer than this (since its first failure) is dead-lettered."""
    breaker_failures: int = 5
    breaker_open_ms: int = 30_000
    batch: int = 100
    """Items per request."""


def backoff_ms(attempt: int, base_ms: int, cap_ms: int, rng: random.Random) -> float:
    """The wait after failed attempt ``attempt`` (0 first): exponential, capped, with
    "equal jitter" (between half and all of the step), so that senders that failed
    together do not come back together."""
    step = float(min(cap_ms, base_ms * 2 ** min(attempt, 32)))
    return step / 2 + rng.uniform(0, step / 2)


class CircuitBreaker:
    """closed -> open after ``failures`` failures in a row; open -> half-open after
    ``open_ms`` (the injected clock); half-open lets one probe through: its success
    closes, its failure opens again."""

    def __init__(self, name: str, failures: int, open_ms: int, clock: Clock) -> None:
        self.name = name
        self.failures = failures
        self.open_ms = open_ms
        self.clock = clock
        self.state = CLOSED
        self._failed = 0
        self._opened_ms = 0
        self._probe_ms: int | None = None
        set_breaker_state(name, CLOSED)

    def _set(self, state: str) -> None:
        if state != self.state:
            log.warning("circuit breaker %s: %s -> %s", self.name, self.state, state,
                        extra={"sink": self.name})
            self.state = state
            set_breaker_state(self.name, state)

    def ready(self) -> bool:
        """Would a request go through now? (no change of state)"""
        now = self.clock.now_ms()
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now >= self._opened_ms + self.open_ms
        return self._probe_ms is None or now >= self._probe_ms + self.open_ms

    def allow(self) -> bool:
        """May a request go now? Takes the probe when half-open."""
        if not self.ready():
            return False
        if self.state != CLOSED:
            self._set(HALF_OPEN)
            self._probe_ms = self.clock.now_ms()
        return True

    def success(self) -> None:
        self._failed = 0
        self._probe_ms = None
        self._set(CLOSED)

    def failure(self) -> None:
        self._failed += 1
        self._probe_ms = None
        if self.state == HALF_OPEN or self._failed >= self.failures:
            self._opened_ms = self.clock.now_ms()
            self._set(OPEN)


@dataclass
class SendResult:
    """``ok``: accepted (2xx). ``rejected``: a 4xx no retry changes. Else failed."""

    ok: bool
    rejected: bool = False
    status: int | None = None
    error: str = ""
    response: httpx.Response | None = None


def _failed_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


class HttpSender:
    """Requests to one service, with timeouts, retries and a circuit breaker; the
    breaker's state is published in ``states_key`` (a Redis hash, field ``name``)."""

    def __init__(
        self, name: str, base_url: str, config: SenderConfig, clock: Clock, *,
        redis: Redis | None = None, states_key: str | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.config = config
        self.breaker = CircuitBreaker(name, config.breaker_failures, config.breaker_open_ms,
                                      clock)
        self.client = httpx.AsyncClient(timeout=config.timeout_s)
        self._redis = redis
        self._states_key = states_key
        self._published: str | None = None
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def publish_state(self) -> None:
        """Write the breaker's state to Redis when it changed (best effort)."""
        state = self.breaker.state
        if self._redis is None or self._states_key is None or state == self._published:
            return
        try:
            await self._redis.hset(self._states_key, self.name, state)
            self._published = state
        except Exception as exc:  # noqa: BLE001 - the state is informational
            log.warning("could not publish breaker state: %r", exc, extra={"sink": self.name})

    async def request(
        self, method: str, path: str, *, body: bytes | None = None,
        headers: dict[str, str] | None = None, attempts: int | None = None,
    ) -> SendResult:
        tries = self.config.attempts if attempts is None else attempts
        result = SendResult(ok=False, error="not sent")
        for attempt in range(max(1, tries)):
            if attempt:
                cfg = self.config
                await self._sleep(backoff_ms(attempt - 1, cfg.backoff_ms, cfg.backoff_max_ms,
                                             self._rng) / 1000)
            result = await self._once(method, path, body, headers)
            if result.ok or result.rejected or result.error == "circuit open":
                break
        await self.publish_state()
        return result

    async def _once(self, method: str, path: str, body: bytes | None,
                    headers: dict[str, str] | None) -> SendResult:
        if not self.breaker.allow():
            HTTP_REQUESTS.labels(self.name, "short_circuited").inc()
            return SendResult(ok=False, error="circuit open")
        try:
            response = await self.client.request(method, self.base_url + path, content=body,
                                                 headers=headers)
        except httpx.HTTPError as exc:
            self.breaker.failure()
            HTTP_REQUESTS.labels(self.name, "failed").inc()
            return SendResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
        status = response.status_code
        if 200 <= status < 300:
            self.breaker.success()
            HTTP_REQUESTS.labels(self.name, "accepted").inc()
            return SendResult(ok=True, status=status, response=response)
        error = f"HTTP {status}: {response.text[:300]}"
        if _failed_status(status):
            self.breaker.failure()
            HTTP_REQUESTS.labels(self.name, "failed").inc()
            return SendResult(ok=False, status=status, error=error)
        self.breaker.success()  # the service is up; it refused what it got
        HTTP_REQUESTS.labels(self.name, "rejected").inc()
        return SendResult(ok=False, rejected=True, status=status, error=error)


def idempotency_key(keys: Sequence[str]) -> str:
    """The batch's Idempotency-Key: a digest of its items' keys, in order; a batch of the
    same items sent again has the same key."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


@dataclass(frozen=True)
class SinkItem:
    """One thing to deliver: its dedupe key, its JSON payload, the entry it came from."""

    key: str
    payload: str
    stream: str
    entry_id: str


@dataclass(frozen=True)
class TakenItem:
    """A retry item taken from the queue, with the member it is stored as."""

    member: bytes
    item: RetryItem


class RetryQueue:
    """The sink's sorted set of items to send again, scored by when each is due."""

    def __init__(self, redis: Redis, key: str, clock: Clock) -> None:
        self.redis = redis
        self.key = key
        self.clock = clock

    @staticmethod
    def park(pipe: Pipeline, key: str, items: Sequence[RetryItem], due_ms: float) -> None:
        """Add ``items`` (in a transaction the caller executes)."""
        if items:
            pipe.zadd(key, {retry_encoder.encode(i): int(due_ms) for i in items})

    async def take(self, limit: int, lease_ms: int) -> list[TakenItem]:
        """Up to ``limit`` due items, their score moved ``lease_ms`` ahead (a lease)."""
        now = self.clock.now_ms()
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self.key)
                    found = await pipe.zrangebyscore(self.key, "-inf", now, start=0, num=limit)
                    members: list[bytes] = [m for m in found if isinstance(m, bytes)]
                    if not members:
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return []
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.zadd(self.key, {m: now + lease_ms for m in members}, xx=True)
                    await pipe.execute()
                except WatchError:
                    continue
            return [TakenItem(m, retry_decoder.decode(m)) for m in members]

    async def size(self) -> int:
        return int(await self.redis.zcard(self.key))


class SinkKind(Protocol):
    """What an application says about one sink."""

    name: str
    """The consumer group and the sink's name (metrics, breaker, keys)."""
    path: str
    """Appended to the base URL for each batch."""

    async def items(self, entries: Sequence[Entry]) -> list[SinkItem]:
        """The items of a batch of source entries (none for an entry with nothing to send);
        may make durable what ``accepted`` will need (raise Transient to retry)."""
        ...

    def key_of(self, payload: str) -> str:
        """An item's key from its payload (for a payload replayed from a dead letter)."""
        ...

    def body(self, payloads: Sequence[str]) -> bytes:
        """The request body of a batch of payloads."""
        ...

    def headers(self, body: bytes, idempotency: str) -> dict[str, str]:
        """The request headers (authentication, signature, Idempotency-Key)."""
        ...

    async def accepted(self, keys: Sequence[str]) -> None:
        """Record that these items were accepted (raise Transient to retry)."""
        ...

    def note(self, pipe: Pipeline, entries: Sequence[Entry]) -> None:
        """Add the kind's own commands to the transaction that acks ``entries``."""
        ...


@dataclass
class SinkOutcome:
    delivered: list[SinkItem | RetryItem] = field(default_factory=list)
    rejected: list[tuple[SinkItem | RetryItem, str]] = field(default_factory=list)
    failed: list[tuple[SinkItem | RetryItem, str]] = field(default_factory=list)


class SinkStage:
    """A consumer-group stage that delivers its items over HTTP (see the module doc)."""

    def __init__(
        self, kind: SinkKind, *, redis: Redis, clock: Clock, source: str, replay: str,
        retry_key: str, dead_stream: str, base_url: str, config: SenderConfig,
        states_key: str, batching: Batching | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``batching``: how the worker reads (large batches with a linger, as the
        write-behind stages: fewer, larger requests)."""
        self.kind = kind
        self.batching = batching
        self.group = kind.name
        self.redis = redis
        self.clock = clock
        self.source = source
        self.replay = replay
        self.streams = [source, replay]
        self.dead_stream = dead_stream
        self.config = config
        self.queue = RetryQueue(redis, retry_key, clock)
        self.sender = (HttpSender(kind.name, base_url, config, clock, redis=redis,
                                  states_key=states_key, sleep=sleep)
                       if base_url else None)
        self._sleep = sleep
        self._rng = random.Random()

    @property
    def enabled(self) -> bool:
        return self.sender is not None

    def _backoff(self, attempt: int) -> float:
        return backoff_ms(attempt, self.config.backoff_ms, self.config.backoff_max_ms, self._rng)

    async def _deliver(self, items: Sequence[SinkItem | RetryItem], attempts: int | None,
                       outcome: SinkOutcome) -> None:
        """Send ``items`` in batches; sort each into delivered, rejected or failed."""
        assert self.sender is not None
        size = self.config.batch
        for first in range(0, len(items), size):
            chunk = items[first:first + size]
            if not self.sender.breaker.ready():
                outcome.failed += [(i, "circuit open") for i in chunk]
                continue
            keys = [i.key for i in chunk]
            body = self.kind.body([i.payload for i in chunk])
            result = await self.sender.request(
                "POST", self.kind.path, body=body,
                headers=self.kind.headers(body, idempotency_key(keys)), attempts=attempts)
            if result.ok:
                await self.kind.accepted(keys)
                outcome.delivered += chunk
                DELIVERED.labels(self.group).inc(len(chunk))
            elif result.rejected:
                outcome.rejected += [(i, result.error) for i in chunk]
            else:
                outcome.failed += [(i, result.error) for i in chunk]

    def _letter(self, item: SinkItem | RetryItem, error: str, attempts: int) -> bytes:
        entry = Entry(self.replay, item.entry_id, {b"d": item.payload.encode()}, attempts)
        return dead_encoder.encode(dead_letter_of(entry, stage=self.group, error=error,
                                                  at_ms=self.clock.now_ms()))

    async def handle(self, entries: Sequence[Entry]) -> None:
        outcome = SinkOutcome()
        if self.sender is not None:
            fresh = [e for e in entries if e.stream == self.source]
            items = await self.kind.items(fresh)
            items += [SinkItem(self.kind.key_of(text(e.data)), text(e.data), e.stream, e.id)
                      for e in entries if e.stream == self.replay and e.data]
            await self._deliver(items, None, outcome)
        now = self.clock.now_ms()
        parked = [RetryItem(key=i.key, payload=i.payload, stream=i.stream,
                            entry_id=i.entry_id, first_ms=now, attempts=1, error=err)
                  for i, err in outcome.failed]
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            self.queue.park(pipe, self.queue.key, parked, now + self._backoff(0))
            for item, err in outcome.rejected:
                pipe.xadd(self.dead_stream, {"d": self._letter(item, err, 1)})
            self.kind.note(pipe, entries)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
            await pipe.execute()
        if outcome.rejected:
            DEAD_LETTERED.labels(self.group).inc(len(outcome.rejected))
        if parked:
            log.warning("%d items to the retry queue: %s", len(parked), outcome.failed[0][1],
                        extra={"sink": self.group})

    async def send_backlog(self, items: Sequence[SinkItem]) -> SinkOutcome:
        """Deliver items from the application's own durable store (see the module doc):
        accepted ones are recorded by the kind, rejected ones dead-lettered (their replay
        stream names this sink), failed ones only reported. Nothing is sent while the
        breaker is open."""
        outcome = SinkOutcome()
        if self.sender is None or not items:
            return outcome
        await self._deliver(items, None, outcome)
        if outcome.rejected:
            async with self.redis.pipeline(transaction=True) as pipe:
                for item, err in outcome.rejected:
                    pipe.xadd(self.dead_stream, {"d": self._letter(item, err, 1)})
                await pipe.execute()
            DEAD_LETTERED.labels(self.group).inc(len(outcome.rejected))
        return outcome

    async def retry_once(self) -> int:
        """Send the due items of the retry queue once; returns how many were taken."""
        if self.sender is None or not self.sender.breaker.ready():
            return 0
        cfg = self.config
        lease = int(cfg.timeout_s * 1000 * max(1, cfg.attempts)) + LEASE_SLACK_MS
        taken = await self.queue.take(cfg.batch, lease)
        if not taken:
            return 0
        member = {id(t.item): t.member for t in taken}
        outcome = SinkOutcome()
        try:
            await self._deliver([t.item for t in taken], 1, outcome)
        except Transient as exc:
            # accepted but not recorded: the lease brings them back; sent again, deduped
            log.warning("retry batch not recorded: %s", exc, extra={"sink": self.group})
            return len(taken)
        now = self.clock.now_ms()
        dead: list[tuple[RetryItem, str]] = []
        again: list[RetryItem] = []
        for item, err in outcome.rejected:
            assert isinstance(item, RetryItem)
            dead.append((item, err))
        for item, err in outcome.failed:
            assert isinstance(item, RetryItem)
            if now - item.first_ms >= cfg.retry_budget_ms:
                dead.append((item, f"retry budget spent: {err}"))
            else:
                again.append(RetryItem(key=item.key, payload=item.payload, stream=item.stream,
                                       entry_id=item.entry_id, first_ms=item.first_ms,
                                       attempts=item.attempts + 1, error=err))
        async with self.redis.pipeline(transaction=True) as pipe:
            gone = [member[id(i)] for i in outcome.delivered]
            gone += [member[id(i)] for i, _ in outcome.rejected]
            gone += [member[id(i)] for i, _ in outcome.failed]
            if gone:
                pipe.zrem(self.queue.key, *gone)
            for item in again:
                pipe.zadd(self.queue.key,
                          {retry_encoder.encode(item): int(now + self._backoff(item.attempts))})
            for item, err in dead:
                pipe.xadd(self.dead_stream, {"d": self._letter(item, err, item.attempts)})
            await pipe.execute()
        if dead:
            DEAD_LETTERED.labels(self.group).inc(len(dead))
            log.error("%d items dead-lettered: %s", len(dead), dead[0][1],
                      extra={"sink": self.group})
        return len(taken)

    async def run_retries(self, stop: asyncio.Event) -> None:
        """The retry loop: until ``stop``, send what is due, else wait a little."""
        if self.sender is None:
            return
        try:
            while not stop.is_set():
                try:
                    taken = await self.retry_once()
                    RETRY_QUEUED.labels(self.group).set(await self.queue.size())
                    await self.sender.publish_state()
                except Exception as exc:  # noqa: BLE001 - Redis down: try again later
                    log.warning("retry loop: %r", exc, extra={"sink": self.group})
                    taken = 0
                if not taken:
                    try:
                        await asyncio.wait_for(stop.wait(), RETRY_POLL_S)
                    except TimeoutError:
                        pass
        finally:
            await self.sender.aclose()
