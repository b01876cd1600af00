"""select: the deciding stage. Takes devices from the free pool and gives them back.

One script call per batch (select.lua) picks each device by the strategy in force
(``Keys.strategy``, read once per call, so ``devsched strategy set`` applies from the
next batch; resource_based by default), records the allocation and its expiry, settles the quota hold, answers
the producer, writes the change and acks: a crash before the call changes
nothing, after it everything is done. Each answer is stored under its request id,
so a redelivered or retried request finds its first answer and can never make a
second allocation while the answer is kept (``DEVSCHED_IDEMPOTENCY_TTL_S``). A new
allocation's id is made in the script from the state's epoch (stages/state.py),
the user, the request id and the time of the call (:func:`allocation_id`): unique
across state losses and answer expiries, so PostgreSQL's version guard never takes
a new allocation for an old one. Without the state marker the call changes
nothing and the batch waits (``StateMissing``). Each entry becomes one typed row
of that call (schemas/rows.py: allocate, release, allocate_batch for count > 1 (device i
gets the id of request ``<request id>#<i>``), release_batch for allocation_ids, renew, cancel, or dead). A
batch is decided whole in the same call: all or nothing (devices taken tentatively and put
back when not every one fits) or best effort.
A renewal extends an active allocation in the same atomic step as its checks (renew in
select.lua), never into a booking of its device (``reserved``).
Reservations (reserve, cancel_reservation, claim_reservation rows) are decided in the same
call by bookings.lua: a device is booked only when no booking and no allocation holds it
during the interval, and a plain allocation passes over a device booked before it would
end (one HLEN per call while no device has a booking).
An allocate request with ``wait_seconds`` that finds no fitting device waits in the
queue (see common.lua) and is served, with the id made when it arrived, by whichever
script call frees a device it fits.

With ``DEVSCHED_REPLICAS_TO_ACK`` = n > 0 the producer hears only what n replicas have:
the script writes every reply of the batch to the held stream (``Keys.replies_held``)
instead of its reply stream, atomically with the effects, the change and the ack; the
stage then sends WAIT n on the same connection and, once n replicas acknowledged,
moves those replies to their streams (``pipeline.replication``; each once). Fewer in
time: the batch is done but its replies stay held, and every select worker's periodic
sweep delivers held replies once a WAIT succeeds (also those a crash between the two
steps, or a failover, left behind).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence

import msgspec

from pipeline.connections import RawChannel
from pipeline.metrics import DEAD_LETTERED
from pipeline.replication import HeldReplies, NotReplicated, held_entries
from pipeline.worker import Entry, dead_letter_of
from schemas.keys import GROUP_SELECT
from schemas.messages import (
    AllocateRequest,
    CancelRequest,
    CancelReservationRequest,
    ClaimReservationRequest,
    ReleaseRequest,
    RenewRequest,
    Request,
    ReserveRequest,
    request_decoder,
)
from schemas.rows import (
    AllocateBatchRow,
    AllocateRow,
    CancelReservationRow,
    CancelRow,
    ClaimReservationRow,
    DeadRow,
    RefuseRow,
    ReleaseBatchRow,
    ReleaseRow,
    RenewRow,
    ReserveRow,
    SelectCall,
    SelectKeys,
    SelectRow,
)
from schemas.runtime import dead_encoder
from stages.context import StageContext
from stages.quota import invalid_row, release_problem
from stages.scripts import SELECT
from stages.state import StateMissing

log = logging.getLogger("devsched.select")

WAIT_MARGIN_MS = 1_000
"""A WAIT's timeout stays this far below the socket timeout (else the connection's
watchdog would drop a WAIT still within its time)."""


def allocation_id(epoch: str, user_id: str, request_id: str, now_ms: int) -> str:
    """The id select.lua gives the allocation it makes for ``request_id`` of ``user_id``
    at ``now_ms`` in the state of ``epoch``: a UUID (version 5 layout) of the SHA-1 of
    ``epoch/user/request/now``."""
    digest = hashlib.sha1(f"{epoch}/{user_id}/{request_id}/{now_ms}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


class SelectStage:
    group = GROUP_SELECT

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.keys = ctx.keys
        # this stage's own connection for its script calls (the fast path of a hot loop)
        self.channel = RawChannel(ctx.redis)
        self.streams = [self.keys.admitted]
        self._dead_lettered = DEAD_LETTERED.labels(self.group)
        k = self.keys
        self.script_keys = SelectKeys(admitted=k.admitted, changes=k.changes, dead=k.dead,
                                      state=k.state, replies_held=k.replies_held)
        s = ctx.settings
        # a WAIT must answer well within the connection's socket timeout
        wait_ms = min(s.replicas_timeout_ms, int(s.socket_timeout_s * 1000) - WAIT_MARGIN_MS)
        self.held = (HeldReplies(k.replies_held, s.replicas_to_ack, wait_ms)
                     if s.replicas_to_ack > 0 else None)

    def item(self, entry: Entry) -> SelectRow:
        """The row for one admitted entry (schemas.messages.AdmittedEntry: the request in
        ``d``, the quota hold in ``c``; ``d`` alone: a release a producer sent here)."""
        if len(entry.fields) == 1 and b"d" in entry.fields:
            return self.direct_item(entry)
        try:
            request = request_decoder.decode(entry.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            letter = dead_letter_of(entry, stage=self.group,
                                    error=f"undecodable admitted entry: {exc}",
                                    at_ms=self.ctx.clock.now_ms(), refused=True)
            return DeadRow(entry_id=entry.id, letter=dead_encoder.encode(letter).decode())
        return self.request_item(entry, request)

    def direct_item(self, entry: Entry) -> SelectRow:
        """An entry a producer added to the admitted stream itself (``d`` alone, no ``c``): only a
        release (one or a batch) may come this way, skipping quota, which has nothing to
        check for it; it is validated as quota validates it (size, schema, reply stream,
        fields), and what fails gets quota's answer: an ``invalid_request`` reply, or a
        dead letter when it names no reply stream of ours."""
        raw = entry.data
        s = self.ctx.settings

        def invalid(reason: str) -> RefuseRow | DeadRow:
            return invalid_row(entry, raw, reason, prefix=self.keys.prefix, stage=self.group,
                               now_ms=self.ctx.clock.now_ms())

        if len(raw) > s.max_message_bytes:
            return invalid(f"message of {len(raw)} bytes exceeds {s.max_message_bytes} bytes")
        try:
            request = request_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            return invalid(str(exc) or type(exc).__name__)
        if not request.reply_to.startswith(f"{self.keys.prefix}:reply:"):
            return invalid(f"reply_to must start with {self.keys.prefix}:reply:")
        if not isinstance(request, ReleaseRequest):
            return invalid(f"only a release may be sent to {self.keys.admitted}; send this "
                           f"request to {self.keys.requests}")
        problem = release_problem(request)
        if problem:
            return invalid(problem)
        return self.request_item(entry, request)

    def request_item(self, entry: Entry, request: Request) -> SelectRow:
        """The row of a decoded request."""
        if isinstance(request, AllocateRequest) and request.count > 1:
            return AllocateBatchRow(
                entry_id=entry.id, request_id=request.request_id, user_id=request.user_id,
                tenant_id=request.tenant_id, reply_to=request.reply_to,
                min_cpu_cores=request.min_cpu_cores, min_memory_mb=request.min_memory_mb,
                duration_seconds=request.duration_seconds or request.duration_minutes * 60,
                pool=request.pool, model=request.model,
                hold=entry.fields.get(b"c", b"").decode(), count=request.count,
                best_effort=request.mode == "best_effort",
            )
        if isinstance(request, AllocateRequest):
            return AllocateRow(
                entry_id=entry.id, request_id=request.request_id, user_id=request.user_id,
                tenant_id=request.tenant_id, reply_to=request.reply_to,
                min_cpu_cores=request.min_cpu_cores, min_memory_mb=request.min_memory_mb,
                duration_seconds=request.duration_seconds or request.duration_minutes * 60,
                pool=request.pool, model=request.model,
                hold=entry.fields.get(b"c", b"").decode(),
                replace_on_failure=request.replace_on_failure or None,
                wait_seconds=request.wait_seconds, priority=request.priority or None,
            )
        if isinstance(request, CancelRequest):
            return CancelRow(
                entry_id=entry.id, request_id=request.request_id, reply_to=request.reply_to,
                cancel_request_id=request.cancel_request_id, user_id=request.user_id,
            )
        if isinstance(request, ReserveRequest | CancelReservationRequest
                      | ClaimReservationRequest):
            return self.reservation_item(entry, request)
        if isinstance(request, RenewRequest):
            seconds = request.extend_seconds or (request.extend_minutes or 0) * 60
            if seconds <= 0:  # quota refuses such a request; only a hand-made entry gets here
                letter = dead_letter_of(entry, stage=self.group,
                                        error="renew without extend_minutes or extend_seconds",
                                        at_ms=self.ctx.clock.now_ms(), refused=True)
                return DeadRow(entry_id=entry.id, letter=dead_encoder.encode(letter).decode())
            return RenewRow(
                entry_id=entry.id, request_id=request.request_id, user_id=request.user_id,
                reply_to=request.reply_to, allocation_id=request.allocation_id,
                extend_seconds=seconds, max_total_s=self.ctx.settings.max_allocation_s,
            )
        if request.allocation_ids:
            return ReleaseBatchRow(
                entry_id=entry.id, request_id=request.request_id, reply_to=request.reply_to,
                allocation_ids=request.allocation_ids, user_id=request.user_id,
            )
        return ReleaseRow(
            entry_id=entry.id, request_id=request.request_id, reply_to=request.reply_to,
            allocation_id=request.allocation_id, device_id=request.device_id,
            user_id=request.user_id,
        )

    def reservation_item(
        self, entry: Entry,
        request: ReserveRequest | CancelReservationRequest | ClaimReservationRequest,
    ) -> SelectRow:
        """The row of a reservation request (bookings.lua handles it)."""
        if isinstance(request, ReserveRequest):
            return ReserveRow(
                entry_id=entry.id, request_id=request.request_id, user_id=request.user_id,
                tenant_id=request.tenant_id, reply_to=request.reply_to,
                start_ms=request.start_ms, end_ms=request.end_ms, device_id=request.device_id,
                min_cpu_cores=request.min_cpu_cores, min_memory_mb=request.min_memory_mb,
                pool=request.pool, model=request.model,
                max_total_s=self.ctx.settings.max_allocation_s,
            )
        row = (CancelReservationRow if isinstance(request, CancelReservationRequest)
               else ClaimReservationRow)
        return row(entry_id=entry.id, request_id=request.request_id, reply_to=request.reply_to,
                   reservation_id=request.reservation_id, user_id=request.user_id)

    async def handle(self, entries: Sequence[Entry]) -> None:
        s = self.ctx.settings
        call = SelectCall(
            prefix=s.prefix, group=self.group, now_ms=self.ctx.clock.now_ms(),
            idempotency_ttl_s=s.idempotency_ttl_s, reply_ttl_s=s.reply_ttl_s,
            released_ttl_s=s.released_ttl_s, queue_max_per_user=s.queue_max_per_user,
            queue_aging_step_ms=s.queue_aging_step_ms,
            hold_replies=True if self.held is not None else None,
            items=[self.item(entry) for entry in entries],
        )
        done = await SELECT(self.channel, self.script_keys, call)
        if done is None:  # no live state: nothing changed, nothing acked
            raise StateMissing(self.keys)
        dead = done[3]
        if dead:
            self._dead_lettered.inc(dead)
        if self.held is not None:
            try:
                await self.held.release(self.channel, held_entries(done[4]))
            except NotReplicated as exc:
                # the batch is decided and acked (retrying it would hold its replies a
                # second time); they wait in the held stream for the sweep
                log.warning("replies held: %s", exc)

    async def periodic(self) -> None:
        """Deliver held replies left behind (a crash, a failed WAIT, a failover) once the
        replicas have them (run by the worker every DEVSCHED_CLAIM_EVERY_MS)."""
        if self.held is not None:
            await self.held.sweep(self.channel)
