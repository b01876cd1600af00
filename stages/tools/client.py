"""The producer client: ask for devices and give them back, with typed results.

Each client owns a reply stream (``<prefix>:reply:<client id>``) and one reader
task that blocks on it (on a connection of its own, short BLOCKs, stopped by a
flag) and resolves the waiting call by request id. A call that gets no reply
within its timeout returns ``Failed(reason="timed_out")``; a late reply to it is
dropped. A reply that does not decode is never dropped in silence: it is counted
(``devsched_client_invalid_replies_total``), logged with its request id, and the
call it answers (when a lenient read finds its request id) returns
``Failed(reason="invalid_reply")`` at once instead of timing out. Request ids
default to fresh UUIDs; pass your own to make a retry idempotent (the same id
always gets the first answer).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Self

import msgspec
from redis.asyncio import Redis

from pipeline.connections import (
    REDIS_DOWN,
    RawChannel,
    blocking_reader,
    redis_client,
    stream_items,
    text,
)
from pipeline.scripts import APPEND, AppendCall, AppendKeys
from schemas.keys import Keys
from schemas.messages import (
    Allocated,
    AllocatedBatch,
    AllocateRequest,
    Cancelled,
    CancelRequest,
    CancelReservationRequest,
    Claimed,
    ClaimReservationRequest,
    Failed,
    Queued,
    Released,
    ReleasedBatch,
    ReleaseRequest,
    Renewed,
    RenewRequest,
    Reply,
    ReservationCancelled,
    Reserved,
    ReserveRequest,
    encoder,
    reply_decoder,
)
from stages.metrics import CLIENT_ALLOCATE_SECONDS, CLIENT_INVALID_REPLIES
from stages.settings import Settings

log = logging.getLogger("devsched.client")

READ_BLOCK_MS = 100
"""How long the reply reader blocks per read; bounds how fast close() returns."""
SEND_BATCH = 1_000
"""Most requests sent in one call."""
TRIM_EVERY_S = 1.0
"""How often the reply reader drops the replies it has read."""


class _ReplyEnvelope(msgspec.Struct):
    """The least of a reply that names the call it answers: any JSON object, any value."""

    request_id: object = None


_envelope = msgspec.json.Decoder(_ReplyEnvelope)


def _request_id_of(raw: bytes) -> str | None:
    """The request id of an undecodable reply, when it has a readable one."""
    try:
        found = _envelope.decode(raw).request_id
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return found if isinstance(found, str) else None


_ALLOCATE_SECONDS: dict[str, Any] = {
    outcome: CLIENT_ALLOCATE_SECONDS.labels(outcome)
    for outcome in ("allocated", "allocated_batch", "failed", "timed_out")}
"""The histogram's children, bound once (a labels() lookup per call costs)."""


def _allocate_seconds(reply: Reply, seconds: float) -> None:
    """Record an allocate call's end-to-end latency by the kind of its answer."""
    if isinstance(reply, Failed):
        outcome = "timed_out" if reply.reason == "timed_out" else "failed"
    else:
        outcome = "allocated_batch" if isinstance(reply, AllocatedBatch) else "allocated"
    _ALLOCATE_SECONDS[outcome].observe(seconds)


def _time_out(future: asyncio.Future[Reply | None]) -> None:
    if not future.done():
        future.set_result(None)


class Client:
    def __init__(self, settings: Settings, *, client_id: str | None = None,
                 timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.client_id = client_id or uuid.uuid4().hex
        self.reply_stream = self.keys.reply(self.client_id)
        self.timeout_s = timeout_s
        self._redis: Redis | None = None
        self._reader: Redis | None = None
        self._send_channel: RawChannel | None = None
        self._read_channel: RawChannel | None = None
        self._waiting: dict[str, asyncio.Future[Reply | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._outbox: list[str] = []
        self._direct: list[str] = []  # releases, for the admitted stream
        self._outbox_ready = asyncio.Event()
        self._closing = False
        self.queued: dict[str, Queued] = {}
        """The last ``queued`` notice of each request still waiting, by request id."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._redis = redis_client(self.settings)
        self._reader = blocking_reader(self.settings)
        await self._redis.ping()
        # the hot loops each hold one connection and skip redis-py's per-command machinery
        self._send_channel = RawChannel(self._redis)
        self._read_channel = RawChannel(self._reader)
        self._task = asyncio.create_task(self._read_replies())
        self._sender = asyncio.create_task(self._send_requests())

    async def close(self) -> None:
        self._closing = True
        self._outbox_ready.set()
        if self._sender:
            await self._sender
        if self._task:
            await self._task
        for channel in (self._send_channel, self._read_channel):
            if channel is not None:
                await channel.close()
        if self._redis:
            await self._redis.delete(self.reply_stream)
            await self._redis.aclose()
        if self._reader:
            await self._reader.aclose()

    async def allocate(
        self, user_id: str, *, tenant_id: str | None = None, duration_minutes: int = 60,
        duration_seconds: int | None = None, min_cpu_cores: int = 0, min_memory_mb: int = 0, pool: str | None = None,
        model: str | None = None, priority: int = 0, request_id: str | None = None,
        timeout_s: float | None = None, replace_on_failure: bool = False,
        wait_seconds: int | None = None,
    ) -> Allocated | Failed:
        """Ask for one device. With ``wait_seconds`` a request that finds no fitting device
        waits for one in the queue (its ``queued`` notice is kept in :attr:`queued`); the
        call then waits that long plus its timeout for the final reply."""
        request = AllocateRequest(
            request_id=request_id or uuid.uuid4().hex, user_id=user_id, reply_to=self.reply_stream,
            tenant_id=tenant_id, duration_minutes=duration_minutes,
            duration_seconds=duration_seconds, min_cpu_cores=min_cpu_cores,
            min_memory_mb=min_memory_mb, pool=pool, model=model, priority=priority,
            replace_on_failure=replace_on_failure, wait_seconds=wait_seconds,
        )
        if wait_seconds:
            timeout_s = (timeout_s or self.timeout_s) + wait_seconds
        started = time.perf_counter()
        reply = await self.send(request.request_id, encoder.encode(request), timeout_s)
        _allocate_seconds(reply, time.perf_counter() - started)
        assert isinstance(reply, Allocated | Failed)
        return reply

    async def cancel(
        self, cancel_request_id: str, user_id: str, *, request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Cancelled | Failed:
        """Take the user's waiting request ``cancel_request_id`` out of the queue (it is
        answered ``failed`` ``cancelled``); ``not_found`` when it is not waiting."""
        request = CancelRequest(
            request_id=request_id or uuid.uuid4().hex, reply_to=self.reply_stream,
            cancel_request_id=cancel_request_id, user_id=user_id,
        )
        reply = await self.send(request.request_id, encoder.encode(request), timeout_s)
        assert isinstance(reply, Cancelled | Failed)
        return reply

    async def allocate_many(
        self, user_id: str, count: int, *, best_effort: bool = False,
        tenant_id: str | None = None, duration_minutes: int = 60,
        duration_seconds: int | None = None, min_cpu_cores: int = 0, min_memory_mb: int = 0,
        pool: str | None = None, model: str | None = None, request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> AllocatedBatch | Failed:
        """Ask for ``count`` (2..100) devices in one request: all of them or none
        (``all_or_nothing``), or what fits (``best_effort``). A request refused whole at
        admission (quota, rate, invalid) answers one Failed."""
        request = AllocateRequest(
            request_id=request_id or uuid.uuid4().hex, user_id=user_id, reply_to=self.reply_stream,
            tenant_id=tenant_id, duration_minutes=duration_minutes,
            duration_seconds=duration_seconds, min_cpu_cores=min_cpu_cores,
            min_memory_mb=min_memory_mb, pool=pool, model=model, count=count,
            mode="best_effort" if best_effort else "all_or_nothing",
        )
        started = time.perf_counter()
        reply = await self.send(request.request_id, encoder.encode(request), timeout_s)
        _allocate_seconds(reply, time.perf_counter() - started)
        assert isinstance(reply, AllocatedBatch | Failed)
        return reply

    async def release_many(
        self, allocation_ids: list[str], *, user_id: str | None = None,
        request_id: str | None = None, timeout_s: float | None = None,
    ) -> ReleasedBatch | Failed:
        """Release several allocations in one request; one result per allocation."""
        request = ReleaseRequest(
            request_id=request_id or uuid.uuid4().hex, reply_to=self.reply_stream,
            allocation_ids=allocation_ids, user_id=user_id,
        )
        reply = await self.send(request.request_id, encoder.encode(request), timeout_s,
                                direct=True)
        assert isinstance(reply, ReleasedBatch | Failed)
        return reply

    async def release(
        self, *, allocation_id: str | None = None, device_id: str | None = None,
        user_id: str | None = None, request_id: str | None = None, timeout_s: float | None = None,
    ) -> Released | Failed:
        request = ReleaseRequest(
            request_id=request_id or uuid.uuid4().hex, reply_to=self.reply_stream,
            allocation_id=allocation_id, device_id=device_id, user_id=user_id,
        )
        reply = await self.send(request.request_id, encoder.encode(request), timeout_s,
                                direct=True)
        assert isinstance(reply, Released | Failed)
        return reply

    async def renew(
        self, allocation_id: str, user_id: str, *, extend_minutes: int | None = None,
        extend_seconds: int | None = None, request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Renewed | Failed:
        """Extend an active allocation by ``extend_seconds`` or ``extend_minutes``."""
        request = RenewRequest(
            request_id=request_id or uuid.uuid4().hex, reply_to=self.reply_stream,
            allocation_id=allocation_id, user_id=user_id, extend_minutes=extend_minutes,
            extend_seconds=extend_seconds,
        )
        reply = await self.send(request.request_id, encoder.encode(request), timeout_s)
        assert isinstance(reply, Renewed | Failed)
        return reply

    async def reserve(
        self, user_id: str, start_ms: int, end_ms: int, *, device_id: str | None = None,
        tenant_id: str | None = None, min_cpu_cores: int = 0, min_memory_mb: int = 0,
        pool: str | None = None, model: str | None = None, request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Reserved | Failed:
        """Book ``device_id`` (or the best fitting device matching the specs) over
        ``[start_ms, end_ms)``."""
        request = ReserveRequest(
            request_id=request_id or uuid.uuid4().hex, user_id=user_id,
            reply_to=self.reply_stream, tenant_id=tenant_id, start_ms=start_ms, end_ms=end_ms,
            device_id=device_id, min_cpu_cores=min_cpu_cores, min_memory_mb=min_memory_mb,
            pool=pool, model=model,
        )
        reply = await self.send(request.request_id, encoder.encode(request), timeout_s)
        assert isinstance(reply, Reserved | Failed)
        return reply

    async def cancel_reservation(
        self, reservation_id: str, user_id: str, *, request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ReservationCancelled | Failed:
        """Cancel a booked reservation, or end an active one (its allocation released)."""
        request = CancelReservationRequest(
            request_id=request_id or uuid.uuid4().hex, reply_to=self.reply_stream,
            reservation_id=reservation_id, user_id=user_id,
        )
        reply = await self.send(request.request_id, encoder.encode(request), timeout_s)
        assert isinstance(reply, ReservationCancelled | Failed)
        return reply

    async def claim_reservation(
        self, reservation_id: str, user_id: str, *, request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Claimed | Failed:
        """Claim the allocation an active reservation became (before its grace ends)."""
        request = ClaimReservationRequest(
            request_id=request_id or uuid.uuid4().hex, reply_to=self.reply_stream,
            reservation_id=reservation_id, user_id=user_id,
        )
        reply = await self.send(request.request_id, encoder.encode(request), timeout_s)
        assert isinstance(reply, Claimed | Failed)
        return reply

    async def send(self, request_id: str, payload: bytes, timeout_s: float | None = None, *,
                   direct: bool = False) -> Reply:
        """Add a raw request (UTF-8 JSON) to the request stream and wait for its reply.
        ``direct``: a release, added to the admitted stream instead (select's input: it
        needs no admission, so it skips the quota hop; see docs/wire-format.md)."""
        assert self._redis is not None, "call start() first"
        text = payload.decode()  # a script call carries text; raises here, not in the sender
        timeout = timeout_s or self.timeout_s
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply | None] = loop.create_future()
        self._waiting[request_id] = future
        # one timer handle per call (cheaper than wait_for's task and callbacks)
        timer = loop.call_later(timeout, _time_out, future)
        try:
            (self._direct if direct else self._outbox).append(text)
            self._outbox_ready.set()
            reply = await future
        finally:
            timer.cancel()
            self._waiting.pop(request_id, None)
        if reply is None:
            log.warning("no reply within %s s", timeout, extra={"request_id": request_id})
            return Failed(request_id=request_id, reason="timed_out",
                          message=f"No reply within {timeout} s")
        return reply

    async def _send_requests(self) -> None:
        """Send what callers queued, all of it per round trip (one XADD or one script call)."""
        assert self._send_channel is not None
        while not (self._closing and not self._outbox and not self._direct):
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            batch, self._outbox = self._outbox, []
            direct, self._direct = self._direct, []
            try:
                if batch:
                    await self._add(self.keys.requests, batch)
                if direct:
                    await self._add(self.keys.admitted, direct)
            except REDIS_DOWN:
                # not known to be sent: put them back in front and try again shortly (a
                # request sent twice is answered once: request ids make it idempotent)
                self._outbox[:0] = batch
                self._direct[:0] = direct
                await asyncio.sleep(0.1)
                self._outbox_ready.set()

    async def _add(self, stream: str, batch: list[str]) -> None:
        """One entry per payload (field ``d``) on ``stream``, in order."""
        assert self._send_channel is not None
        if len(batch) == 1:  # a plain XADD costs Redis less than a script call
            await self._send_channel.call("XADD", stream, "*", "d", batch[0])
            return
        for start in range(0, len(batch), SEND_BATCH):
            await APPEND(self._send_channel, AppendKeys(stream=stream),
                         AppendCall(payloads=batch[start:start + SEND_BATCH]))

    async def _read_replies(self) -> None:
        assert self._read_channel is not None
        last = b"0-0"
        trimmed_at = 0.0
        while not self._closing:
            try:
                # the raw reply (see stream_items): no dict per entry
                batch = await self._read_channel.call(
                    "XREAD", "COUNT", 512, "BLOCK", READ_BLOCK_MS, "STREAMS", self.reply_stream,
                    last)
            except REDIS_DOWN:
                await asyncio.sleep(0.1)
                continue
            for _stream, items in stream_items(batch):
                for entry_id, fields in items:
                    last = entry_id
                    self._deliver(entry_id, fields)
            now = time.monotonic()
            if batch and self._redis is not None and now - trimmed_at > TRIM_EVERY_S:
                # replies already read are dropped so the stream stays small
                trimmed_at = now
                await self._redis.xtrim(self.reply_stream, minid=last)

    def _deliver(self, entry_id: object, fields: list[bytes]) -> None:
        """Resolve the call a reply answers. An undecodable reply is counted, logged and,
        when its request id can be read, answered as ``Failed(reason="invalid_reply")``."""
        names = fields[::2]
        raw = fields[2 * names.index(b"d") + 1] if b"d" in names else b""
        try:
            reply: Reply = reply_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            request_id = _request_id_of(raw)
            CLIENT_INVALID_REPLIES.inc()
            log.error("undecodable reply %s on %s: %s", text(entry_id), self.reply_stream, exc,
                      extra={"request_id": request_id, "reply_stream": self.reply_stream})
            if request_id is None:
                return
            reply = Failed(request_id=request_id, reason="invalid_reply", message=str(exc))
        if isinstance(reply, Queued):
            # a notice, not the answer: the request waits for a device (its final reply
            # comes later; the caller's timeout covers its wait)
            self.queued[reply.request_id] = reply
            return
        if self.queued:  # answered: its notice is no longer needed
            self.queued.pop(reply.request_id, None)
        future = self._waiting.get(reply.request_id)
        if future is not None and not future.done():
            future.set_result(reply)
