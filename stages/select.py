"""select: the deciding stage. Takes devices from the free pool and gives them back.

One script call per batch (select.lua) picks each device by the resource_based
strategy, records the allocation and its expiry, settles the quota hold, answers
the producer, writes the change and acks: a crash before the call changes
nothing, after it everything is done. Allocation ids are derived from the user
and request id, so a redelivered request finds its first answer and a retried
one can never make a second allocation. Each entry becomes one typed row of that
call (schemas/rows.py: allocate, release, renew or dead). A renewal extends an active
allocation in the same atomic step as its checks (renew in select.lua).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import msgspec

from pipeline.connections import RawChannel
from pipeline.metrics import DEAD_LETTERED
from pipeline.worker import Entry, dead_letter_of
from schemas.keys import GROUP_SELECT
from schemas.messages import AllocateRequest, RenewRequest, request_decoder
from schemas.rows import (
    AllocateRow,
    DeadRow,
    ReleaseRow,
    RenewRow,
    SelectCall,
    SelectKeys,
    SelectRow,
)
from schemas.runtime import dead_encoder
from stages.context import StageContext
from stages.scripts import SELECT

ALLOCATION_NAMESPACE = uuid.UUID("6f1c1d2e-3b7a-4c55-9a43-0d5e1f0a7b21")


def allocation_id(user_id: str, request_id: str) -> str:
    return str(uuid.uuid5(ALLOCATION_NAMESPACE, f"{user_id}/{request_id}"))


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
        self.script_keys = SelectKeys(admitted=k.admitted, changes=k.changes, dead=k.dead)

    def item(self, entry: Entry) -> SelectRow:
        """The row for one admitted entry (schemas.messages.AdmittedEntry: the request in
        ``d``, the quota hold in ``c``)."""
        try:
            request = request_decoder.decode(entry.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            letter = dead_letter_of(entry, stage=self.group,
                                    error=f"undecodable admitted entry: {exc}",
                                    at_ms=self.ctx.clock.now_ms(), refused=True)
            return DeadRow(entry_id=entry.id, letter=dead_encoder.encode(letter).decode())
        if isinstance(request, AllocateRequest):
            return AllocateRow(
                entry_id=entry.id, request_id=request.request_id, user_id=request.user_id,
                tenant_id=request.tenant_id, reply_to=request.reply_to,
                min_cpu_cores=request.min_cpu_cores, min_memory_mb=request.min_memory_mb,
                duration_seconds=request.duration_seconds or request.duration_minutes * 60,
                pool=request.pool, model=request.model,
                hold=entry.fields.get(b"c", b"").decode(),
                allocation_id=allocation_id(request.user_id, request.request_id),
                replace_on_failure=request.replace_on_failure or None,
            )
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
        return ReleaseRow(
            entry_id=entry.id, request_id=request.request_id, reply_to=request.reply_to,
            allocation_id=request.allocation_id, device_id=request.device_id,
            user_id=request.user_id,
        )

    async def handle(self, entries: Sequence[Entry]) -> None:
        s = self.ctx.settings
        call = SelectCall(
            prefix=s.prefix, group=self.group, now_ms=self.ctx.clock.now_ms(),
            idempotency_ttl_s=s.idempotency_ttl_s, reply_ttl_s=s.reply_ttl_s,
            released_ttl_s=s.released_ttl_s, items=[self.item(entry) for entry in entries],
        )
        dead = (await SELECT(self.channel, self.script_keys, call))[3]
        if dead:
            self._dead_lettered.inc(dead)
