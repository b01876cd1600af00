"""quota: the first stage. Validates each request and admits or refuses it.

Every request is decoded against the public schema. A request that does not
decode, is too large, or names neither allocation nor device gets a typed
``invalid_request`` reply when it says where to reply, else a dead letter with
the reason; it never stops the stage (JSON nested too deep to decode included: its
reply stream is then read from the text). A cancel request goes on unchanged, as a
release. Allocations are checked against the
user's quota and hold their maximum share of it (see quota.lua) before going on
to ``select``; releases go on unchanged; renewals and reservations go on when the user
is active and the quota not expired (a reservation whose interval can never be booked,
end not after start or longer than DEVSCHED_MAX_ALLOCATION_S, is refused
``invalid_interval`` here); cancel_reservation and claim_reservation go on unchanged. The whole batch, replies, hand-off and
ack, is one script call: atomic, and idempotent by request id. With rate limits set
(DEVSCHED_RATE_USER_PER_S, DEVSCHED_RATE_TENANT_PER_S) an allocate request also takes a
token of its user's and its tenant's bucket, or is refused ``rate_limited`` with
``retry_after_ms`` (see quota.lua); with none set the call carries no ``rate`` and the
script reads no bucket. With DEVSCHED_BILLING_URL set the call carries
``billing_check`` (and, failing closed, ``billing_max_age_ms``): the script reads the
user's billing standing that the export stage keeps fresh (stages/export.py), never the
billing service itself. A Redis without the state marker (stages/state.py) gets no
answer at all: the call changes nothing and the batch waits (``StateMissing``). Each
entry becomes
one typed row of that call (schemas/rows.py: admit, forward, refuse or dead).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import msgspec

from pipeline.connections import RawChannel
from pipeline.metrics import DEAD_LETTERED
from pipeline.worker import Entry, dead_letter_of
from schemas.keys import GROUP_QUOTA
from schemas.messages import (
    AllocateRequest,
    CancelRequest,
    CancelReservationRequest,
    ClaimReservationRequest,
    ReleaseRequest,
    RenewRequest,
    ReserveRequest,
    request_decoder,
)
from schemas.rows import (
    AdmitRow,
    DeadRow,
    ForwardRow,
    QuotaCall,
    QuotaKeys,
    QuotaRow,
    RateLimits,
    RefuseRow,
    RenewCheckRow,
    ReserveCheckRow,
)
from schemas.runtime import dead_encoder
from stages.context import StageContext
from stages.scripts import QUOTA
from stages.settings import Settings
from stages.state import StateMissing

log = logging.getLogger("devsched.quota")


class _Envelope(msgspec.Struct):
    """The least a broken request must carry for us to answer it. Any JSON value is
    accepted in each field (a wrongly typed user_id must not cost the reply); only
    strings are used."""

    request_id: object = ""
    reply_to: object = ""
    user_id: object = ""
    tenant_id: object = ""


_envelope = msgspec.json.Decoder(_Envelope)


_FIELD = {name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*"([A-Za-z0-9_.:@/-]{1,200})"')
          for name in ("request_id", "reply_to", "user_id", "tenant_id")}


def _shallow_envelope(raw: bytes) -> _Envelope:
    """The envelope of a request nested too deep to decode (a value thousands of levels
    deep): each field found as a plain string in the text, else empty. Only used to
    address the invalid_request reply, which can only go to a reply stream of ours."""
    found = {name: (m.group(1).decode() if (m := pattern.search(raw)) else "")
             for name, pattern in _FIELD.items()}
    return _Envelope(**found)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _burst(per_s: float, burst: int) -> int:
    return burst or max(1, math.ceil(per_s))


def rate_limits(settings: Settings) -> RateLimits | None:
    """The buckets quota.lua checks, from the settings; None when both are off (the
    script then reads no bucket at all)."""
    user, tenant = settings.rate_user_per_s, settings.rate_tenant_per_s
    if not user and not tenant:
        return None
    return RateLimits(
        user_per_s=user or None, user_burst=_burst(user, settings.rate_user_burst),
        tenant_per_s=tenant or None, tenant_burst=_burst(tenant, settings.rate_tenant_burst),
    )


def release_problem(request: ReleaseRequest) -> str | None:
    """Why a release request cannot be done as sent (None: it can). Quota and select
    (for a release a producer sent straight to the admitted stream) check the same."""
    if request.allocation_ids and (request.allocation_id or request.device_id):
        return "allocation_ids excludes allocation_id and device_id"
    if not request.allocation_id and not request.device_id and not request.allocation_ids:
        return "release needs allocation_id, device_id or allocation_ids"
    return None


def invalid_row(entry: Entry, raw: bytes, reason: str, *, prefix: str, stage: str,
                now_ms: int) -> RefuseRow | DeadRow:
    """A request that did not validate: an ``invalid_request`` refusal when it names a
    reply stream of ours, else a dead letter with the reason (never a silent drop)."""
    try:
        env = _envelope.decode(raw)
    except RecursionError:
        env = _shallow_envelope(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        env = _Envelope()
    reply_to = _text(env.reply_to)
    answerable = len(reply_to) <= 200 and reply_to.startswith(f"{prefix}:reply:")
    log.warning("request refused as invalid: %s", reason[:200], extra={
        "request_id": _text(env.request_id)[:128], "user_id": _text(env.user_id)[:128],
        "entry": entry.id, "outcome": "reply" if answerable else "dead_letter"})
    if answerable:
        return RefuseRow(
            entry_id=entry.id, request_id=_text(env.request_id)[:128],
            user_id=_text(env.user_id)[:128] or None,
            tenant_id=_text(env.tenant_id)[:128] or None, reply_to=reply_to,
            reason="invalid_request", message=f"Invalid request: {reason}"[:1000],
        )
    letter = dead_letter_of(entry, stage=stage, error=f"invalid_request: {reason}",
                            at_ms=now_ms, refused=True)
    return DeadRow(entry_id=entry.id, letter=dead_encoder.encode(letter).decode())


class QuotaStage:
    group = GROUP_QUOTA

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.keys = ctx.keys
        # this stage's own connection for its script calls (the fast path of a hot loop)
        self.channel = RawChannel(ctx.redis)
        self.streams = [self.keys.requests]
        self._dead_lettered = DEAD_LETTERED.labels(self.group)
        k = self.keys
        self.script_keys = QuotaKeys(requests=k.requests, admitted=k.admitted, changes=k.changes,
                                     dead=k.dead, state=k.state)
        self.rate = rate_limits(ctx.settings)
        s = ctx.settings
        self.billing_check = bool(s.billing_url)
        self.billing_max_age_ms = (s.billing_standing_max_age_s * 1000
                                   if s.billing_url and not s.billing_fail_open else None)

    def item(self, entry: Entry) -> QuotaRow:
        """The row for one request entry. A request that decoded is valid UTF-8 JSON, so
        its bytes go on as text unchanged."""
        raw = entry.data
        limit = self.ctx.settings.max_message_bytes
        if len(raw) > limit:
            return self._invalid(entry, raw, f"message of {len(raw)} bytes exceeds {limit} bytes")
        try:
            request = request_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            # RecursionError: JSON nested past the decoder's depth is invalid input too
            return self._invalid(entry, raw, str(exc) or type(exc).__name__)
        if not request.reply_to.startswith(f"{self.keys.prefix}:reply:"):
            # never write a reply (and its EXPIRE) into a stream that is not a reply stream
            return self._invalid(entry, raw, f"reply_to must start with {self.keys.prefix}:reply:")
        if isinstance(request, AllocateRequest) and request.wait_seconds and request.count > 1:
            return self._invalid(entry, raw, "wait_seconds applies to one device (count 1)")
        if isinstance(request, CancelRequest | CancelReservationRequest
                      | ClaimReservationRequest):
            return ForwardRow(entry_id=entry.id, payload=raw.decode())
        if isinstance(request, ReserveRequest):
            return self._reserve(entry, raw, request)
        if isinstance(request, AllocateRequest):
            return AdmitRow(
                entry_id=entry.id, request_id=request.request_id, user_id=request.user_id,
                tenant_id=request.tenant_id, reply_to=request.reply_to,
                min_cpu_cores=request.min_cpu_cores, min_memory_mb=request.min_memory_mb,
                count=request.count, best_effort=request.mode == "best_effort",
                payload=raw.decode(),
            )
        if isinstance(request, RenewRequest):
            if request.extend_seconds is None and request.extend_minutes is None:
                return self._invalid(entry, raw, "renew needs extend_minutes or extend_seconds")
            return RenewCheckRow(entry_id=entry.id, request_id=request.request_id,
                                 user_id=request.user_id, reply_to=request.reply_to,
                                 payload=raw.decode())
        assert isinstance(request, ReleaseRequest)
        problem = release_problem(request)
        if problem:
            return self._invalid(entry, raw, problem)
        return ForwardRow(entry_id=entry.id, payload=raw.decode())

    def _reserve(self, entry: Entry, raw: bytes, request: ReserveRequest) -> QuotaRow:
        """A reserve request: an interval that can never be booked is refused here
        (``invalid_interval``); the rest (start not past, the device free) is select's,
        atomically with the booking."""
        length_s = (request.end_ms - request.start_ms) / 1000
        if length_s <= 0 or length_s > self.ctx.settings.max_allocation_s:
            why = ("the end is not after the start" if length_s <= 0 else
                   f"it lasts longer than {self.ctx.settings.max_allocation_s} s")
            return RefuseRow(entry_id=entry.id, request_id=request.request_id,
                             user_id=request.user_id, tenant_id=request.tenant_id,
                             reply_to=request.reply_to, reason="invalid_interval",
                             message=f"Invalid interval [{request.start_ms}, "
                                     f"{request.end_ms}): {why}")
        return ReserveCheckRow(entry_id=entry.id, request_id=request.request_id,
                               user_id=request.user_id, reply_to=request.reply_to,
                               payload=raw.decode())

    def _invalid(self, entry: Entry, raw: bytes, reason: str) -> QuotaRow:
        return invalid_row(entry, raw, reason, prefix=self.keys.prefix, stage=self.group,
                           now_ms=self.ctx.clock.now_ms())

    async def handle(self, entries: Sequence[Entry]) -> None:
        s = self.ctx.settings
        call = QuotaCall(
            prefix=s.prefix, group=self.group, now_ms=self.ctx.clock.now_ms(),
            idempotency_ttl_s=s.idempotency_ttl_s, reply_ttl_s=s.reply_ttl_s,
            fail_open=s.quota_fail_open, rate=self.rate, billing_check=self.billing_check,
            billing_max_age_ms=self.billing_max_age_ms,
            items=[self.item(entry) for entry in entries],
        )
        done = await QUOTA(self.channel, self.script_keys, call)
        if done is None:  # no live state: nothing changed, nothing acked
            raise StateMissing(self.keys)
        dead = done[2]
        if dead:
            self._dead_lettered.inc(dead)
