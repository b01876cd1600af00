"""quota: the first stage. Validates each request and admits or refuses it.

Every request is decoded against the public schema. A request that does not
decode, is too large, or names neither allocation nor device gets a typed
``invalid_request`` reply when it says where to reply, else a dead letter with
the reason; it never stops the stage. Allocations are checked against the
user's quota and hold their maximum share of it (see quota.lua) before going on
to ``select``; releases go on unchanged. The whole batch, replies, hand-off and
ack, is one script call: atomic, and idempotent by request id.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from pipeline.connections import RawChannel
from pipeline.worker import Entry, dead_letter_of
from schemas.keys import GROUP_QUOTA
from schemas.messages import AllocateRequest, ReleaseRequest, request_decoder
from schemas.runtime import dead_encoder
from stages.context import StageContext
from stages.scripts import QUOTA

STRIDE = 9


class _Envelope(msgspec.Struct):
    """The least a broken request must carry for us to answer it. Any JSON value is
    accepted in each field (a wrongly typed user_id must not cost the reply); only
    strings are used."""

    request_id: object = ""
    reply_to: object = ""
    user_id: object = ""
    tenant_id: object = ""


_envelope = msgspec.json.Decoder(_Envelope)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _pad(item: list[str | int | bytes]) -> list[str | int | bytes]:
    return item + [""] * (STRIDE - len(item))


class QuotaStage:
    group = GROUP_QUOTA

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.keys = ctx.keys
        # this stage's own connection for its script calls (the fast path of a hot loop)
        self.channel = RawChannel(ctx.redis)
        self.streams = [self.keys.requests]

    def item(self, entry: Entry) -> list[str | int | bytes]:
        raw = entry.data
        limit = self.ctx.settings.max_message_bytes
        if len(raw) > limit:
            return self._invalid(entry, raw, f"message of {len(raw)} bytes exceeds {limit} bytes")
        try:
            request = request_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return self._invalid(entry, raw, str(exc))
        if not request.reply_to.startswith(f"{self.keys.prefix}:reply:"):
            # never write a reply (and its EXPIRE) into a stream that is not a reply stream
            return self._invalid(entry, raw, f"reply_to must start with {self.keys.prefix}:reply:")
        if isinstance(request, AllocateRequest):
            return [
                "A", entry.id, request.request_id, request.user_id, request.tenant_id or "",
                request.reply_to, request.min_cpu_cores, request.min_memory_mb, raw,
            ]
        assert isinstance(request, ReleaseRequest)
        if not request.allocation_id and not request.device_id:
            return self._invalid(entry, raw, "release needs allocation_id or device_id")
        return _pad(["F", entry.id, raw])

    def _invalid(self, entry: Entry, raw: bytes, reason: str) -> list[str | int | bytes]:
        try:
            env = _envelope.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            env = _Envelope()
        reply_to = _text(env.reply_to)
        if len(reply_to) <= 200 and reply_to.startswith(f"{self.keys.prefix}:reply:"):
            return _pad([
                "R", entry.id, _text(env.request_id)[:128], _text(env.user_id)[:128],
                _text(env.tenant_id)[:128],
                reply_to, "invalid_request", f"Invalid request: {reason}"[:1000],
            ])
        letter = dead_letter_of(entry, stage=self.group, error=f"invalid_request: {reason}",
                                at_ms=self.ctx.clock.now_ms(), refused=True)
        return _pad(["D", entry.id, dead_encoder.encode(letter)])

    async def handle(self, entries: Sequence[Entry]) -> None:
        s = self.ctx.settings
        args: list[str | int | bytes] = [
            s.prefix, self.group, self.ctx.clock.now_ms(), s.idempotency_ttl_s, s.reply_ttl_s,
            "1" if s.quota_fail_open else "0", len(entries),
        ]
        for entry in entries:
            args.extend(self.item(entry))
        k = self.keys
        await QUOTA(self.channel, [k.requests, k.admitted, k.changes, k.dead], args)
