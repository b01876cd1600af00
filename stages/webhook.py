"""webhook: the notifications, POSTed in signed JSON batches to DEVSCHED_WEBHOOK_URL.

The stage reads the outbound ``notifications`` stream (what notify writes: allocation
success, failure, expiry, release, renewal, replacement, queue, quota, device and
billing notices, each with its channel hints) in its own group (``webhook``); the
stream itself stays for its other readers. Each notification goes out as a
:class:`~schemas.messages.WebhookNotification` (the notification plus ``id``, its entry
id on the stream, the receiver's dedupe key) in a body ``{"notifications": [...]}``
signed with HMAC-SHA256 over the exact body bytes with DEVSCHED_WEBHOOK_SECRET, sent as
``X-Devsched-Signature: sha256=<hex>``, with an ``Idempotency-Key``. Timeouts, retries,
circuit breaker, retry queue and dead letters are pipeline.http_sink's, as for the
billing export. With DEVSCHED_WEBHOOK_URL unset the stage acks what it reads and sends
nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Sequence

import msgspec
from redis.asyncio.client import Pipeline

from pipeline.http_sink import SinkItem, SinkStage
from pipeline.worker import Entry
from schemas.keys import GROUP_WEBHOOK
from schemas.messages import Notification, WebhookNotification
from stages.context import StageContext
from stages.export import shared_sink_stage

SIGNATURE_HEADER = "X-Devsched-Signature"

_notification = msgspec.json.Decoder(Notification)
_delivered = msgspec.json.Decoder(WebhookNotification)


def signature(secret: str, body: bytes) -> str:
    """The header value that signs ``body``: ``sha256=<hex of HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` signs ``body`` (constant-time comparison)."""
    return header is not None and hmac.compare_digest(signature(secret, body), header)


class WebhookSink:
    """The webhook as a pipeline.http_sink.SinkKind."""

    name = GROUP_WEBHOOK
    path = ""

    def __init__(self, ctx: StageContext) -> None:
        self.secret = ctx.settings.webhook_secret

    async def items(self, entries: Sequence[Entry]) -> list[SinkItem]:
        items = []
        for entry in entries:
            note = _notification.decode(entry.data)
            out = WebhookNotification(id=entry.id, **msgspec.structs.asdict(note))
            items.append(SinkItem(entry.id, msgspec.json.encode(out).decode(), entry.stream,
                                  entry.id))
        return items

    def key_of(self, payload: str) -> str:
        return _delivered.decode(payload).id

    def body(self, payloads: Sequence[str]) -> bytes:
        return ('{"notifications":[' + ",".join(payloads) + "]}").encode()

    def headers(self, body: bytes, idempotency: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "Idempotency-Key": idempotency,
                SIGNATURE_HEADER: signature(self.secret, body)}

    async def accepted(self, keys: Sequence[str]) -> None:
        return None

    def note(self, pipe: Pipeline, entries: Sequence[Entry]) -> None:
        return None


def webhook_stage(ctx: StageContext) -> SinkStage:
    """The stage of this process (one per context, shared with its retry loop)."""
    return shared_sink_stage(ctx, GROUP_WEBHOOK, WebhookSink, ctx.keys.notifications,
                             ctx.settings.webhook_url)


async def run_webhook_retries(ctx: StageContext, stop: asyncio.Event) -> None:
    """Beside the webhook workers: the retry loop."""
    await webhook_stage(ctx).run_retries(stop)
