"""notify: one notification per outcome, on the outbound notifications stream.

Every change that a person or another system cares about (allocated, released
with its reason, expired, refused, and each event from other systems that was
applied: device failed, maintenance, ..., an allocation moved to another device
(allocation.replaced), user suspended, billing warnings, each step of a reservation
(reservation.booked, .active, .claimed, .completed, .cancelled, .no_show); the
list is in docs/wire-format.md) becomes one Notification; each entry's notification is added and the entry acked
in the same script call, so a crash cannot send one twice or drop one, and a
notification is added only by the call whose XACK took its entry off the pending
list, so an entry handled by two consumers (one slow, one that took it over) is
still notified once. A large batch goes in several such calls, each atomic for its
own entries. Device and quota updates by command are administrative and produce none. Webhook
delivery over HTTP comes later, reading this stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from pipeline.scripts import HANDOFF, HandoffCall, HandoffKeys, HandOn
from pipeline.worker import Entry
from schemas.keys import GROUP_NOTIFY
from schemas.messages import (
    AllocationChange,
    AllocationRenewed,
    AllocationReplaced,
    DeviceEventApplied,
    Notification,
    RequestRejected,
    ReservationChange,
    UserEventApplied,
    encoder,
)
from stages.changes import decode_changes
from stages.context import StageContext

NOTIFICATIONS_MAXLEN = 100_000
"""The outbound stream keeps about this many notifications for its readers."""
HANDOFF_CHUNK = 64
"""Entries per hand-off call: a write-behind batch of hundreds is handed on in several
calls, so Redis serves the request path between them instead of stalling for a
millisecond or more. Each call is atomic for its own entries, which is all the
once-only promise needs."""


WEB = ["webhook", "websocket"]
MAIL = ["webhook", "websocket", "email"]
URGENT = ["webhook", "websocket", "email", "sms"]
"""Channel hints: every notification goes to the webhook and the websocket; the ones a
user must not miss also by email; an overdue account also by SMS."""


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _money(amount: float | None) -> str:
    return "" if amount is None else f"{amount:.2f}"


def allocation_notification(change: AllocationChange) -> Notification:
    """device.allocated, device.released (with its reason) or allocation.expired."""
    reason: str | None = None
    if change.status == "allocated":
        event, message = "device.allocated", f"Device {change.device_id} allocated"
    elif change.status == "released":
        event, reason = "device.released", change.reason or "released"
        message = f"Device {change.device_id} released after {change.duration_seconds} s"
        if reason != "released":
            message += f" ({reason.replace('_', ' ')})"
    else:
        event, reason = "allocation.expired", "expired"
        message = f"Allocation on device {change.device_id} expired"
    return Notification(
        event=event, user_id=change.user_id, tenant_id=change.tenant_id,
        allocation_id=change.allocation_id, device_id=change.device_id,
        request_id=change.request_id, reason=reason, message=message, at_ms=change.at_ms,
        channels=WEB, status=change.status, duration_seconds=change.duration_seconds,
    )


def replaced_notification(change: AllocationReplaced) -> Notification:
    """allocation.replaced: the allocation moved to an equivalent device; the user gets the
    new device and its ADB endpoint (same allocation id and expires-at)."""
    why = change.replace_reason.replace("_", " ")
    message = (f"Device {change.previous_device_id} went down ({why}); allocation "
               f"{change.allocation_id} moved to device {change.device_id} "
               f"({change.device_name}) at {change.adb_host}:{change.adb_port}")
    return Notification(
        event="allocation.replaced", user_id=change.user_id, tenant_id=change.tenant_id,
        allocation_id=change.allocation_id, device_id=change.device_id,
        request_id=change.request_id, reason=change.replace_reason, message=message,
        at_ms=change.at_ms, channels=MAIL, status=change.status,
        previous_device_id=change.previous_device_id, device_name=change.device_name,
        adb_host=change.adb_host, adb_port=change.adb_port,
    )


def device_event_notification(change: DeviceEventApplied) -> Notification:
    """The device event, for the user whose allocation it ended (if any) and for other
    systems: device.failed, device.deleted, device.status_changed, device.maintenance (with
    its info and expected end), device.created."""
    dev, why = change.device_id, f": {change.reason}" if change.reason else ""
    if change.event == "device.failed":
        message, channels = f"Device {dev} failed{why}", MAIL
    elif change.event == "device.deleted":
        message, channels = f"Device {dev} deleted{why}", MAIL
    elif change.event == "device.maintenance":
        message, channels = f"Device {dev} is in maintenance{why}", MAIL
        if change.info:
            message += f" ({change.info})"
        if change.expected_end_ms is not None:
            end = datetime.fromtimestamp(change.expected_end_ms / 1000, tz=UTC)
            message += f", expected back at {end.isoformat(timespec='seconds')}"
    elif change.event == "device.created":
        message, channels = f"Device {dev} added to pool {change.pool}", WEB
    else:
        message, channels = f"Device {dev} is {change.status}{why}", WEB
    if change.replacement_device_id:
        message += (f"; allocation {change.allocation_id} moved to device "
                    f"{change.replacement_device_id}")
    elif change.allocation_id:
        message += f"; allocation {change.allocation_id} released"
    return Notification(
        event=change.event, user_id=change.user_id, allocation_id=change.allocation_id,
        device_id=dev, reason=change.reason, message=message, at_ms=change.at_ms,
        channels=channels, status=change.status, info=change.info,
        expected_end_ms=change.expected_end_ms,
        replacement_device_id=change.replacement_device_id,
    )


def user_event_notification(change: UserEventApplied) -> Notification:
    """The user or billing event, for the user: suspended, deleted, activated, quota
    updated or exceeded (with the allocations it released), payment warnings (1 and 2
    of 3) and the suspension at the threshold, low balance, overdue (amount and days),
    payment succeeded, recharged, and the billing service's standing (overdue: new
    allocations refused; ok again: admitted)."""
    uid, n, ev = change.user_id, change.released_allocations, change.event
    released = f"; {_plural(n, 'allocation')} released" if n else ""
    channels = WEB
    if ev == "user.deleted":
        message, channels = f"User {uid} deleted{released}", MAIL
    elif ev == "user.suspended":
        message, channels = f"User {uid} suspended{released}", MAIL
    elif ev == "user.activated":
        message = f"User {uid} activated" + (
            f" (still {change.status})" if change.status != "active" else "")
    elif ev == "user.quota_updated":
        message = (f"Quota updated: at most {_plural(change.max_devices, 'device')}, "
                   f"{change.total_cpu_cores} CPU cores, {change.total_memory_gb} GB memory"
                   + (f"; {_plural(n, 'oldest allocation')} released" if n else ""))
    elif ev == "user.quota_exceeded":
        message = "Quota exceeded" + (f"; {_plural(n, 'oldest allocation')} released" if n else "")
    elif ev == "billing.payment_failed":
        count, limit = change.failure_count or 0, change.failure_threshold or 0
        channels = MAIL
        if count < limit:
            message = f"Payment failed ({count} of {limit}): please update your payment method"
        else:
            message = f"Payment failed {count} times: service suspended{released}"
    elif ev == "billing.balance_low":
        message, channels = f"Balance low: {_money(change.balance)}", MAIL
    elif ev == "billing.overdue":
        message = (f"Account overdue: {_money(change.amount)} for "
                   f"{_plural(change.days or 0, 'day')}{released}")
        channels = URGENT
    elif ev == "billing.standing":
        balance = f" (balance {_money(change.balance)})" if change.balance is not None else ""
        if change.billing_status == "overdue":
            message = f"Account overdue{balance}: new allocations are refused until it is paid"
            channels = MAIL
        elif change.billing_status == "suspended":
            message = f"Account standing{balance}; still suspended for failed payments"
        else:
            message = f"Account in good standing again{balance}: allocations are admitted"
    elif ev == "billing.payment_success":
        message = f"Payment of {_money(change.amount)} succeeded" + (
            f", balance {_money(change.balance)}" if change.balance is not None else "")
    else:
        message = f"Account recharged with {_money(change.amount)}" + (
            f", balance {_money(change.balance)}" if change.balance is not None else "")
    if change.status != change.previous_status and ev != "user.activated":
        message += f" (status: {change.status})"
    return Notification(
        event=ev, user_id=uid, reason=change.reason, message=message, at_ms=change.at_ms,
        channels=channels, status=change.status, released_allocations=n,
        amount=change.amount, days=change.days, balance=change.balance,
        failure_count=change.failure_count, failure_threshold=change.failure_threshold,
    )


def renewed_notification(change: AllocationRenewed) -> Notification:
    """allocation.renewed: the allocation now ends at its new expires-at."""
    return Notification(
        event="allocation.renewed", user_id=change.user_id, tenant_id=change.tenant_id,
        allocation_id=change.allocation_id, device_id=change.device_id,
        request_id=change.renew_request_id,
        message=(f"Allocation {change.allocation_id} on device {change.device_id} renewed by "
                 f"{change.extended_seconds} s"),
        at_ms=change.at_ms, channels=WEB, status=change.status,
        expires_at_ms=change.expires_at_ms, previous_expires_at_ms=change.previous_expires_at_ms,
    )


def reservation_notification(change: ReservationChange) -> Notification:
    """reservation.<status>: booked, active (with the allocation, the device and its ADB
    endpoint: claim it within the grace period), claimed (an active one claimed),
    completed, cancelled (with its reason), no_show."""
    rid, dev = change.reservation_id, change.device_id
    event = f"reservation.{change.status}"
    channels = WEB
    if change.status == "booked":
        message = f"Reservation {rid} of device {dev} booked"
    elif change.status == "active" and change.claimed_at_ms is not None:
        event, message = "reservation.claimed", f"Reservation {rid} of device {dev} claimed"
    elif change.status == "active":
        message = (f"Reservation {rid} started: device {dev} ({change.device_name}) at "
                   f"{change.adb_host}:{change.adb_port} is held for you as allocation "
                   f"{change.allocation_id}; claim it before {change.claim_by_ms}")
        channels = MAIL
    elif change.status == "completed":
        message = f"Reservation {rid} of device {dev} completed"
    elif change.status == "no_show":
        message = f"Reservation {rid} of device {dev} cancelled: not claimed in time"
        channels = MAIL
    else:
        message = (f"Reservation {rid} of device {dev} cancelled "
                   f"({(change.reason or 'cancelled').replace('_', ' ')})")
        channels = MAIL if change.reason != "cancelled" else WEB
    return Notification(
        event=event, user_id=change.user_id, tenant_id=change.tenant_id,
        allocation_id=change.allocation_id, device_id=dev, request_id=change.request_id,
        reason=change.reason, message=message, channels=channels, at_ms=change.at_ms,
        status=change.status, device_name=change.device_name, adb_host=change.adb_host,
        adb_port=change.adb_port, reservation_id=rid, start_ms=change.start_ms,
        end_ms=change.end_ms,
    )


def notification_for(change: object) -> Notification | None:
    """The notification of one change, or None for an administrative one (a device
    added or a quota set by command)."""
    if isinstance(change, AllocationReplaced):
        return replaced_notification(change)
    if isinstance(change, AllocationRenewed):
        return renewed_notification(change)
    if isinstance(change, AllocationChange):
        return allocation_notification(change)
    if isinstance(change, DeviceEventApplied):
        return device_event_notification(change)
    if isinstance(change, UserEventApplied):
        return user_event_notification(change)
    if isinstance(change, ReservationChange):
        return reservation_notification(change)
    if isinstance(change, RequestRejected):
        event = ("allocation.quota_exceeded" if change.reason == "quota_exceeded"
                 else "allocation.failed")
        return Notification(
            event=event, user_id=change.user_id, tenant_id=change.tenant_id,
            request_id=change.request_id, reason=change.reason, message=change.message,
            at_ms=change.at_ms, channels=WEB,
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
