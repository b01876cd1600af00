"""notify: one notification per outcome, on the outbound notifications stream.

Every change that a person cares about (allocated, released, expired, refused)
becomes one Notification; each entry's notification is added and the entry acked
in the same script call, so a crash cannot send one twice or drop one, and a
notification is added only by the call whose XACK took its entry off the pending
list, so an entry handled by two consumers (one slow, one that took it over) is
still notified once. A large batch goes in several such calls, each atomic for its
own entries. Device and quota updates are administrative and produce none. Webhook
delivery over HTTP comes later, reading this stream.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.scripts import HANDOFF, HandoffCall, HandoffKeys, HandOn
from pipeline.worker import Entry
from schemas.keys import GROUP_NOTIFY
from schemas.messages import AllocationChange, Notification, RequestRejected, encoder
from stages.changes import decode_changes
from stages.context import StageContext

NOTIFICATIONS_MAXLEN = 100_000
"""The outbound stream keeps about this many notifications for its readers."""
HANDOFF_CHUNK = 64
"""Entries per hand-off call: a write-behind batch of hundreds is handed on in several
calls, so Redis serves the request path between them instead of stalling for a
millisecond or more. Each call is atomic for its own entries, which is all the
once-only promise needs."""


def notification_for(change: object) -> Notification | None:
    if isinstance(change, AllocationChange):
        if change.status == "allocated":
            event, message = "device.allocated", f"Device {change.device_id} allocated"
        elif change.status == "released":
            event = "device.released"
            message = f"Device {change.device_id} released after {change.duration_seconds} s"
        else:
            event = "allocation.expired"
            message = f"Allocation on device {change.device_id} expired"
        return Notification(
            event=event, user_id=change.user_id, tenant_id=change.tenant_id,
            allocation_id=change.allocation_id, device_id=change.device_id,
            request_id=change.request_id, message=message, at_ms=change.at_ms,
            channels=["webhook", "websocket"],
        )
    if isinstance(change, RequestRejected):
        event = ("allocation.quota_exceeded" if change.reason == "quota_exceeded"
                 else "allocation.failed")
        return Notification(
            event=event, user_id=change.user_id, tenant_id=change.tenant_id,
            request_id=change.request_id, reason=change.reason, message=change.message,
            at_ms=change.at_ms, channels=["webhook", "websocket"],
        )
    return None


class NotifyStage:
    group = GROUP_NOTIFY

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.keys = ctx.keys
        self.batching = ctx.write_behind
        self.streams = [self.keys.changes]

    async def handle(self, entries: Sequence[Entry]) -> None:
        hand_on: list[HandOn] = []
        for entry, change in zip(entries, decode_changes(entries), strict=True):
            note = notification_for(change)
            output = None if note is None else encoder.encode(note).decode()
            hand_on.append(HandOn(entry_id=entry.id, output=output))
        # script calls in which each entry is acked and its notification added together,
        # and only by the call that acked it (a taken-over entry is never notified twice)
        keys = HandoffKeys(target=self.keys.notifications, source=self.streams[0])
        for first in range(0, len(hand_on), HANDOFF_CHUNK):
            await HANDOFF(self.ctx.redis, keys, HandoffCall(
                group=self.group, maxlen=NOTIFICATIONS_MAXLEN,
                entries=hand_on[first:first + HANDOFF_CHUNK]))
