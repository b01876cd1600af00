"""select: the deciding stage. Takes devices from the free pool and gives them back.

One script call per batch (select.lua) picks each device by the resource_based
strategy, records the allocation and its expiry, settles the quota hold, answers
the producer, writes the change and acks: a crash before the call changes
nothing, after it everything is done. Allocation ids are derived from the user
and request id, so a redelivered request finds its first answer and a retried
one can never make a second allocation.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import msgspec

from pipeline.connections import RawChannel
from pipeline.worker import Entry, dead_letter_of
from schemas.keys import GROUP_SELECT
from schemas.messages import AllocateRequest, request_decoder
from schemas.runtime import dead_encoder
from stages.context import StageContext
from stages.scripts import SELECT

STRIDE = 13
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

    def item(self, entry: Entry) -> list[str | int | bytes]:
        try:
            request = request_decoder.decode(entry.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            letter = dead_letter_of(entry, stage=self.group,
                                    error=f"undecodable admitted entry: {exc}",
                                    at_ms=self.ctx.clock.now_ms(), refused=True)
            dead: list[str | int | bytes] = ["D", entry.id, dead_encoder.encode(letter)]
            return dead + [""] * (STRIDE - 3)
        if isinstance(request, AllocateRequest):
            hold = entry.fields.get(b"c", b"").decode()
            return [
                "A", entry.id, request.request_id, request.user_id, request.tenant_id or "",
                request.reply_to, request.min_cpu_cores, request.min_memory_mb,
                request.duration_seconds or request.duration_minutes * 60, request.pool or "", request.model or "", hold,
                allocation_id(request.user_id, request.request_id),
            ]
        return [
            "L", entry.id, request.request_id, request.reply_to, request.allocation_id or "",
            request.device_id or "", request.user_id or "", "", "", "", "", "", "",
        ]

    async def handle(self, entries: Sequence[Entry]) -> None:
        s = self.ctx.settings
        args: list[str | int | bytes] = [
            s.prefix, self.group, self.ctx.clock.now_ms(), s.idempotency_ttl_s, s.reply_ttl_s,
            s.released_ttl_s, len(entries),
        ]
        for entry in entries:
            args.extend(self.item(entry))
        k = self.keys
        await SELECT(self.channel, [k.admitted, k.changes, k.dead], args)
