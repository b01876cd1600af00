"""Every message on every stream, as msgspec Structs.

Wire format (see docs/wire-format.md): each stream entry carries one field,
``d``, whose value is a UTF-8 JSON object. The public request stream takes the
tagged union :data:`Request` (``"type": "allocate" | "release" | "renew" | "cancel" |
"reserve" | "cancel_reservation" | "claim_reservation"``); replies on a producer's reply
stream are the tagged union :data:`Reply` (``"type": "allocated" | "released" | "failed" |
"renewed" | "queued" | "cancelled" | "reserved" | "reservation_cancelled" | "claimed"``,
and the batch replies). Constraints live in the types, so a
value out of range fails at decode with a message naming the field.

Times on the wire are integers: milliseconds since the Unix epoch (``*_ms``).

The replies and changes are written by the Lua scripts (one builder per kind, in
stages/lua/common.lua when two scripts emit it); their Structs forbid unknown fields, so a key renamed or
added in Lua alone fails to decode instead of passing unread, and
tests/test_script_contract.py decodes everything every script emits with them. What
the scripts are called with is declared in :mod:`schemas.rows`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

Id = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@\-]+$")]
"""Identifiers: users, tenants, devices, requests. No spaces or braces."""
Name = Annotated[str, Meta(min_length=1, max_length=128)]
StreamKey = Annotated[str, Meta(min_length=1, max_length=200)]
Minutes = Annotated[int, Meta(gt=0, le=525_600)]
"""Allocation length in minutes: more than 0, at most a year."""
Cores = Annotated[int, Meta(ge=0, le=4096)]
MegaBytes = Annotated[int, Meta(ge=0, le=1 << 30)]
Priority = Annotated[int, Meta(ge=0, le=9)]
MAX_BATCH = 100
"""Most devices one allocate request asks for, most allocations one release names."""
BatchMode = Literal["all_or_nothing", "best_effort"]

FailureReason = Literal[
    "no_available_devices",
    "quota_exceeded",
    "user_suspended",
    "billing_overdue",
    "invalid_request",
    "not_owner",
    "not_found",
    "rate_limited",
    "timed_out",
    "invalid_reply",
    "not_active",
    "exceeds_quota_expiry",
    "exceeds_max_duration",
    "queue_full",
    "cancelled",
    "billing_unavailable",
    "overlaps",
    "invalid_interval",
    "reserved",
]
"""Why a request failed. ``timed_out`` and ``invalid_reply`` are the client's own: no
reply came in time, or the reply that came did not decode. ``rate_limited``: the user
or the tenant made more allocate requests than its rate allows (``retry_after_ms``).
A renewal is refused as
``not_active`` (the allocation ended or is past its expires-at), ``exceeds_quota_expiry``
(the new expires-at would pass the quota's expiry) or ``exceeds_max_duration`` (the
allocation would last longer than DEVSCHED_MAX_ALLOCATION_S in all).
A waiting request (``wait_seconds``) ends ``timed_out`` when its wait ends without a
device, ``cancelled`` by a CancelRequest; ``queue_full``: its user already has
DEVSCHED_QUEUE_MAX_PER_USER requests waiting. ``billing_unavailable``: the billing check
fails closed (DEVSCHED_BILLING_FAIL_OPEN=false) and the user's billing standing is unknown
or older than DEVSCHED_BILLING_STANDING_MAX_AGE_S.
Reservations: a reserve request is refused ``invalid_interval`` (end not after start,
start in the past, longer than DEVSCHED_MAX_ALLOCATION_S), ``overlaps`` (the device, or
every device matching the specs, is booked or held during the interval),
``exceeds_quota_expiry`` (it would end after the quota expires), ``not_found`` (no such
device); a renewal is refused ``reserved`` when the new expires-at runs into a booking
of the device; a cancel or claim of a reservation ``not_found``, ``not_owner`` or
``not_active`` (not started yet, or ended)."""
WaitSeconds = Annotated[int, Meta(ge=1, le=3600)]
"""How long an allocate request may wait in the queue for a device: 1 s to an hour."""

EndReason = Literal[
    "released",
    "expired",
    "device_failed",
    "device_deleted",
    "device_maintenance",
    "device_stopped",
    "device_error",
    "user_deleted",
    "user_suspended",
    "quota_reduced",
    "quota_exceeded",
    "payment_failed",
    "billing_overdue",
    "no_show",
]
"""Why an allocation ended: ``released`` by its user, ``expired`` at its expires-at, or
closed by an event from another system (schemas/events.py): its device failed, was
deleted, went to maintenance, stopped or reported an error; its user was deleted or
suspended; the user's quota was lowered below the use (``quota_reduced``, oldest
allocations first) or reported exceeded; payments failed up to the threshold; billing
overdue; ``no_show``: the allocation a reservation became was not claimed within
DEVSCHED_RESERVATION_GRACE_S."""


# --- requests (public stream) ------------------------------------------------


class AllocateRequest(Struct, tag_field="type", tag="allocate", kw_only=True,
                      forbid_unknown_fields=True, omit_defaults=True):
    """Ask for one device for ``duration_minutes``. Fields at their defaults are left out
    of the encoding (a producer's request stays small; they decode to the same values)."""

    request_id: Id
    """Idempotency key: the same id always gets the first answer."""
    user_id: Id
    reply_to: StreamKey
    """Stream the reply is added to (one per producer)."""
    tenant_id: Id | None = None
    duration_minutes: Minutes = 60
    duration_seconds: Annotated[int, Meta(gt=0, le=31_536_000)] | None = None
    """When set, wins over duration_minutes (for short sessions and tests)."""
    min_cpu_cores: Cores = 0
    min_memory_mb: MegaBytes = 0
    pool: Id | None = None
    model: Name | None = None
    priority: Priority = 0
    count: Annotated[int, Meta(ge=1, le=MAX_BATCH)] = 1
    """How many devices (each fitting the request); above 1 the reply is an
    AllocatedBatch."""
    mode: BatchMode | None = None
    """With count > 1: ``all_or_nothing`` (the default: every device or none) or
    ``best_effort`` (what fits)."""
    sent_at_ms: int | None = None
    wait_seconds: WaitSeconds | None = None
    """With no fitting device free, wait up to this long in the priority queue (a
    ``queued`` notice first, then one final reply) instead of failing at once. Only for
    a single device (count 1)."""
    replace_on_failure: bool = False
    """When the device fails, is deleted, goes to maintenance or stops, move the
    allocation to an equivalent free device (same pool, model and size; same allocation
    id, user and expires-at) instead of ending it; ended only when none is free."""


class ReleaseRequest(Struct, tag_field="type", tag="release", kw_only=True, forbid_unknown_fields=True):
    """Give a device back, named by allocation id or device id."""

    request_id: Id
    reply_to: StreamKey
    allocation_id: Id | None = None
    device_id: Id | None = None
    user_id: Id | None = None
    """When set, only this user's allocation may be released."""
    allocation_ids: Annotated[list[Id], Meta(min_length=1, max_length=MAX_BATCH)] | None = None
    """Release these allocations (a batch: the reply is a ReleasedBatch)."""
    sent_at_ms: int | None = None


class RenewRequest(Struct, tag_field="type", tag="renew", kw_only=True, forbid_unknown_fields=True):
    """Extend an active allocation of ``user_id`` by ``extend_seconds`` (wins when set) or
    ``extend_minutes``; one of the two is required."""

    request_id: Id
    reply_to: StreamKey
    allocation_id: Id
    user_id: Id
    extend_minutes: Minutes | None = None
    extend_seconds: Annotated[int, Meta(gt=0, le=31_536_000)] | None = None
    sent_at_ms: int | None = None


class CancelRequest(Struct, tag_field="type", tag="cancel", kw_only=True,
                    forbid_unknown_fields=True):
    """Take a waiting allocate request (``cancel_request_id``, of ``user_id``) out of the
    wait queue: it gets its final reply, ``failed`` with reason ``cancelled``; this
    request gets ``cancelled``, or ``failed`` ``not_found`` when that request is not
    waiting (answered, timed out, never sent)."""

    request_id: Id
    reply_to: StreamKey
    cancel_request_id: Id
    user_id: Id
    sent_at_ms: int | None = None


class ReserveRequest(Struct, tag_field="type", tag="reserve", kw_only=True,
                     forbid_unknown_fields=True, omit_defaults=True):
    """Book a device for ``user_id`` over ``[start_ms, end_ms)``: the device ``device_id``,
    or (without it) any device matching the specs (pool, model, minimums; the best fit
    free over the whole interval is chosen at booking). Answered ``reserved`` with the
    reservation id and the device, or ``failed``. At start the reservation becomes an
    allocation held for the user (see docs/wire-format.md, Reservations)."""

    request_id: Id
    user_id: Id
    reply_to: StreamKey
    tenant_id: Id | None = None
    start_ms: Annotated[int, Meta(ge=0)]
    end_ms: Annotated[int, Meta(gt=0)]
    device_id: Id | None = None
    min_cpu_cores: Cores = 0
    min_memory_mb: MegaBytes = 0
    pool: Id | None = None
    model: Name | None = None
    sent_at_ms: int | None = None


class CancelReservationRequest(Struct, tag_field="type", tag="cancel_reservation",
                               kw_only=True, forbid_unknown_fields=True):
    """Cancel the reservation ``reservation_id`` of ``user_id``: a booked one is dropped,
    an active one's allocation released. Answered ``reservation_cancelled`` or
    ``failed`` (not_found, not_owner, not_active)."""

    request_id: Id
    reply_to: StreamKey
    reservation_id: Id
    user_id: Id
    sent_at_ms: int | None = None


class ClaimReservationRequest(Struct, tag_field="type", tag="claim_reservation",
                              kw_only=True, forbid_unknown_fields=True):
    """Claim the allocation an active reservation became (the user shows up): without a
    claim (or a renewal of that allocation) within DEVSCHED_RESERVATION_GRACE_S of its
    activation the reservation ends ``no_show``. Answered ``claimed`` (again, the same,
    when claimed before) or ``failed`` (not_found, not_owner, not_active)."""

    request_id: Id
    reply_to: StreamKey
    reservation_id: Id
    user_id: Id
    sent_at_ms: int | None = None


Request = (AllocateRequest | ReleaseRequest | RenewRequest | CancelRequest | ReserveRequest
           | CancelReservationRequest | ClaimReservationRequest)


# --- replies (a producer's reply stream) ------------------------------------


class DeviceInfo(Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    name: str
    status: str


class Allocated(
    Struct, tag_field="type", tag="allocated", kw_only=True, forbid_unknown_fields=True
):
    request_id: str
    allocation_id: str
    device: DeviceInfo
    user_id: str
    allocated_at_ms: int
    expires_at_ms: int
    adb_host: str
    adb_port: int


class Released(Struct, tag_field="type", tag="released", kw_only=True, forbid_unknown_fields=True):
    request_id: str
    allocation_id: str
    device_id: str
    user_id: str
    released_at_ms: int
    duration_seconds: int
    already_released: bool = False
    """True when the allocation was closed before: nothing changed."""
    status: str = "released"
    """How the allocation ended: released or expired."""


class Failed(Struct, tag_field="type", tag="failed", kw_only=True, forbid_unknown_fields=True):
    request_id: str
    reason: FailureReason
    message: str
    remaining_devices: int | None = None
    retry_after_ms: int | None = None
    """``rate_limited`` only: how long until the request would be admitted."""


class AllocatedBatch(
    Struct, tag_field="type", tag="allocated_batch", kw_only=True, forbid_unknown_fields=True
):
    """The answer to an allocate request with count > 1 that select decided: one
    Allocated per device given, one Failed per device not given (all of them for an
    all_or_nothing request that could not have them all)."""

    request_id: str
    mode: BatchMode
    success_count: int
    failed_count: int
    allocations: list[Allocated]
    failures: list[Failed]


class ReleasedBatch(
    Struct, tag_field="type", tag="released_batch", kw_only=True, forbid_unknown_fields=True
):
    """The answer to a release request with allocation_ids: one Released or one Failed
    per allocation named, in the order named."""

    request_id: str
    success_count: int
    failed_count: int
    releases: list[Released]
    failures: list[Failed]


class Renewed(Struct, tag_field="type", tag="renewed", kw_only=True, forbid_unknown_fields=True):
    """The allocation now ends at ``expires_at_ms`` (it was ``previous_expires_at_ms``)."""

    request_id: str
    allocation_id: str
    user_id: str
    device_id: str
    expires_at_ms: int
    previous_expires_at_ms: int
    duration_minutes: int
    """The allocation's whole length now, from its allocated-at (rounded up)."""


class Queued(Struct, tag_field="type", tag="queued", kw_only=True, forbid_unknown_fields=True):
    """A notice, not an answer: the allocate request (with ``wait_seconds``) found no
    fitting device and waits in the queue at ``position`` (1: the next served, among the
    waiters a freed device fits). Exactly one final reply follows: ``allocated``, or
    ``failed`` (``timed_out`` at ``wait_until_ms``, ``cancelled``)."""

    request_id: str
    position: int
    wait_until_ms: int
    priority: int


class Cancelled(Struct, tag_field="type", tag="cancelled", kw_only=True,
                forbid_unknown_fields=True):
    """The answer to a CancelRequest that took ``cancel_request_id`` out of the queue."""

    request_id: str
    cancel_request_id: str


ReservationStatus = Literal["booked", "active", "completed", "cancelled", "no_show"]
"""A reservation's life: ``booked`` until its start, ``active`` while the allocation it
became is held, then ``completed`` (that allocation ended: expired at the end, released,
or ended by an event), ``cancelled`` (by a cancel_reservation request, or at start: its
device unavailable, its user blocked) or ``no_show`` (not claimed in the grace period)."""

ReservationReason = Literal[
    "cancelled", "no_show", "device_unavailable", "user_suspended", "billing_overdue",
    "quota_exceeded", "missed",
]
"""Why a reservation ended other than ``completed``: ``cancelled`` by its user,
``no_show``, ``device_unavailable`` (at start its device was down or still held),
``user_suspended`` / ``billing_overdue`` / ``quota_exceeded`` (its user blocked at start),
``missed`` (the timers first saw it after its end)."""


class Reserved(Struct, tag_field="type", tag="reserved", kw_only=True,
               forbid_unknown_fields=True):
    """The answer to a ReserveRequest that booked ``device_id`` over ``[start_ms,
    end_ms)`` as ``reservation_id``."""

    request_id: str
    reservation_id: str
    user_id: str
    device_id: str
    device_name: str
    pool: str
    start_ms: int
    end_ms: int
    status: ReservationStatus


class ReservationCancelled(Struct, tag_field="type", tag="reservation_cancelled",
                           kw_only=True, forbid_unknown_fields=True):
    """The answer to a CancelReservationRequest: the reservation is ``cancelled`` now
    (it was ``previous_status``: booked, or active, its allocation then released)."""

    request_id: str
    reservation_id: str
    previous_status: ReservationStatus
    allocation_id: str | None = None
    """The allocation released with it (an active reservation's)."""


class Claimed(Struct, tag_field="type", tag="claimed", kw_only=True,
              forbid_unknown_fields=True):
    """The answer to a ClaimReservationRequest: the allocation the reservation became,
    as an Allocated reply describes one."""

    request_id: str
    reservation_id: str
    allocation_id: str
    device: DeviceInfo
    user_id: str
    allocated_at_ms: int
    expires_at_ms: int
    adb_host: str
    adb_port: int


Reply = (Allocated | Released | Failed | AllocatedBatch | ReleasedBatch | Renewed | Queued
         | Cancelled | Reserved | ReservationCancelled | Claimed)


# --- internal streams ---------------------------------------------------------


class AllocationChange(
    Struct, tag_field="kind", tag="allocation", kw_only=True, forbid_unknown_fields=True
):
    """One state change of one allocation; ``version`` grows by one per change."""

    allocation_id: str
    device_id: str
    user_id: str
    tenant_id: str | None = None
    request_id: str
    status: Literal["allocated", "released", "expired"]
    allocated_at_ms: int
    expires_at_ms: int
    released_at_ms: int | None = None
    duration_minutes: int
    duration_seconds: int | None = None
    cpu_cores: int
    memory_mb: int
    storage_mb: int
    pool: str
    version: int
    at_ms: int
    reason: EndReason | None = None
    """Why a closed allocation ended (None while it is active)."""
    replace_on_failure: bool = False
    """Its request asked to move it to an equivalent device when its device goes down
    (set on the change that made it and on a move)."""
    min_cpu_cores: int | None = None
    """What its request asked for (on the change that made it; a batch's do not carry
    it): persist keeps it in the row's metadata for ``devsched trace record`` and the
    smart strategy's model."""
    min_memory_mb: int | None = None
    requested_model: str | None = None
    """The model its request named (absent: any)."""


class AllocationReplaced(AllocationChange, tag="allocation_replaced", kw_only=True,
                         forbid_unknown_fields=True):
    """An active allocation moved to an equivalent free device because its device went
    down (``replace_on_failure``): the same allocation (id, user, sizes, allocated-at,
    expires-at, still ``allocated``) on ``device_id``, its version one higher; persist
    writes it as any AllocationChange (the row's device_id changes), notify announces
    ``allocation.replaced`` with the new ADB endpoint."""

    previous_device_id: str
    """The device it was on (now down)."""
    device_name: str
    adb_host: str
    adb_port: int
    """The new device's name and ADB endpoint."""
    replace_reason: EndReason
    """What the previous device's event would have ended it for (device_failed, ...)."""
    event: str
    """The device event's type, e.g. ``device.failed``."""
    event_id: str


class AllocationRenewed(AllocationChange, tag="allocation_renewed", kw_only=True,
                        forbid_unknown_fields=True):
    """An active allocation extended (a renew request): the same allocation with its new
    ``expires_at_ms`` and ``duration_minutes``, its version one higher; persist writes it
    as any AllocationChange, notify announces ``allocation.renewed``. ``request_id`` stays
    the allocation's own; the renewal's is ``renew_request_id``."""

    previous_expires_at_ms: int
    extended_seconds: int
    renew_request_id: str


class ReservationChange(
    Struct, tag_field="kind", tag="reservation", kw_only=True, forbid_unknown_fields=True
):
    """One state change of one reservation (persist writes the ``reservations`` row,
    notify announces ``reservation.<status>``); ``version`` grows by one per change."""

    reservation_id: str
    request_id: str
    user_id: str
    tenant_id: str | None = None
    device_id: str
    pool: str
    start_ms: int
    end_ms: int
    status: ReservationStatus
    allocation_id: str | None = None
    """The allocation it became at start (active, and after)."""
    reason: ReservationReason | None = None
    created_at_ms: int
    claimed_at_ms: int | None = None
    claim_by_ms: int | None = None
    """Active and not claimed: it ends ``no_show`` at this time."""
    ended_at_ms: int | None = None
    version: int
    at_ms: int
    device_name: str | None = None
    adb_host: str | None = None
    adb_port: int | None = None
    """At activation: the device's name and ADB endpoint (for the notification)."""


class RequestRejected(
    Struct, tag_field="kind", tag="rejected", kw_only=True, forbid_unknown_fields=True
):
    """A request that got a failure reply (for notify and outbound events)."""

    request_id: str
    user_id: str | None = None
    tenant_id: str | None = None
    reason: FailureReason
    message: str
    at_ms: int


class DeviceUpserted(
    Struct, tag_field="kind", tag="device", kw_only=True, forbid_unknown_fields=True
):
    device_id: str
    name: str
    pool: str
    model: str
    host: str
    adb_host: str
    adb_port: int
    cpu_cores: int
    memory_mb: int
    storage_mb: int
    status: str
    version: int
    at_ms: int


class QuotaSet(Struct, tag_field="kind", tag="quota", kw_only=True, forbid_unknown_fields=True):
    user_id: str
    status: str
    expires_at_ms: int | None = None
    max_devices: int
    max_cpu_per_device: int
    max_memory_mb_per_device: int
    total_cpu_cores: int
    total_memory_gb: int
    total_storage_gb: int
    version: int
    at_ms: int


class DeviceEventApplied(DeviceUpserted, tag="device_event", kw_only=True,
                         forbid_unknown_fields=True):
    """A device event (schemas/events.py) applied: the device's whole record as it is now
    (persist writes it like DeviceUpserted), with what notify announces: the event, the
    status before, the allocation it ended (and its user), the maintenance details."""

    event: str
    """The inbound event's type, e.g. ``device.failed``."""
    event_id: str
    previous_status: str | None = None
    """The device's status before the event (None: the event created it)."""
    reason: str | None = None
    """The event's own text (why it failed, what the maintenance is for)."""
    info: str | None = None
    """Maintenance information (``device.maintenance``)."""
    expected_end_ms: int | None = None
    """When the maintenance is expected to end."""
    allocation_id: str | None = None
    """The allocation the event ended on this device, or moved off it."""
    user_id: str | None = None
    """That allocation's user (who is notified)."""
    replacement_device_id: str | None = None
    """The device the allocation moved to (``replace_on_failure``); None: it was ended."""


class UserEventApplied(QuotaSet, tag="user_event", kw_only=True, forbid_unknown_fields=True):
    """A user or billing event (schemas/events.py) applied: the user's whole quota record
    as it is now (persist writes it like QuotaSet), with what notify announces."""

    event: str
    """The inbound event's type, e.g. ``billing.overdue``."""
    event_id: str
    previous_status: str
    reason: str | None = None
    """The event's own text."""
    released_allocations: int = 0
    """How many of the user's allocations the event ended."""
    amount: float | None = None
    """billing: the amount (overdue, failed, paid or recharged)."""
    days: int | None = None
    """billing.overdue: days overdue."""
    balance: float | None = None
    """billing: the balance the event reports."""
    failure_count: int | None = None
    """billing.payment_failed: failed payments counted (within the count's TTL)."""
    failure_threshold: int | None = None
    """billing.payment_failed: the count at which the user is suspended."""
    user_status: str | None = None
    """The user service's part of the status (active, suspended, deleted, ...), kept
    apart from billing's (persist records both; a rebuild restores them)."""
    billing_status: str | None = None
    """Billing's part: ok, overdue or suspended (payments failed)."""
    user_event_version: int | None = None
    """The version of the last user.* event applied (events of a lower one are stale)."""
    billing_event_version: int | None = None
    """The version of the last billing.* event applied."""
    payment_failures: int = 0
    """Failed payments counted now (0 once a payment succeeded or the count expired)."""
    payment_failures_until_ms: int | None = None
    """When that count expires (DEVSCHED_PAYMENT_FAILURE_TTL_S after the last failure)."""


class WaiterChange(
    Struct, tag_field="kind", tag="waiter", kw_only=True, forbid_unknown_fields=True
):
    """A request joined the wait queue (``status`` ``waiting``) or left it (``left``, with
    ``reason``: allocated, timed_out, cancelled, or the failure a user blocked since got).
    persist keeps each waiting request in ``waiting_requests`` (the newest ``version``
    wins: the joining's time doubled, leaving adds one), so that ``devsched rebuild``
    re-queues the requests that were waiting when Redis lost its state. Every field of
    the request it needs to wait again is carried both ways."""

    user_id: str
    request_id: str
    status: Literal["waiting", "left"]
    version: int
    at_ms: int
    reason: str | None = None
    queue_score: int
    """Its place in the queue (arrival ms minus priority times the aging step)."""
    queued_at_ms: int
    wait_until_ms: int
    priority: int
    wait_seconds: int
    tenant_id: str | None = None
    reply_to: str
    min_cpu_cores: int
    min_memory_mb: int
    duration_seconds: int
    pool: str | None = None
    model: str | None = None
    hold: str
    allocation_id: str
    """The id of the allocation it gets when a device is given to it."""
    replace_on_failure: bool = False
    idem_ttl_s: int
    reply_ttl_s: int


class TenantChange(
    Struct, tag_field="kind", tag="tenant", kw_only=True, forbid_unknown_fields=True
):
    """A tenant of the global schedules changed (schedules.lua): created, its plan changed,
    an override set, cleared or run out, the version of the last tenant event applied
    moved, or the tenant deleted. persist writes its ``tenants`` row (the newest
    ``version`` wins) so that ``devsched rebuild`` restores the registry; ``version`` comes
    from one counter of the schedules, so a tenant deleted and created again moves on."""

    tenant_id: str
    action: Literal["created", "plan_changed", "override_set", "override_cleared",
                    "override_expired", "event_version", "deleted"]
    status: Literal["active", "deleted"]
    plan: str | None = None
    override_ms: int | None = None
    """A custom interval in force until ``override_until_ms`` (None: none)."""
    override_until_ms: int | None = None
    event_version: int | None = None
    """The version of the last ``tenant.*`` event applied (older ones stay stale)."""
    created_at_ms: int | None = None
    version: int
    at_ms: int


class ScheduleChange(
    Struct, tag_field="kind", tag="schedule", kw_only=True, forbid_unknown_fields=True
):
    """A global schedule paused or resumed (``devsched schedules pause|resume``); persist
    writes its ``schedule_state`` row so that ``devsched rebuild`` keeps it paused."""

    schedule_id: str
    paused: bool
    version: int
    at_ms: int


Change = (AllocationChange | AllocationReplaced | AllocationRenewed | RequestRejected | DeviceUpserted | QuotaSet
          | DeviceEventApplied | UserEventApplied | WaiterChange | ReservationChange
          | TenantChange | ScheduleChange)


Hold = Annotated[str, Meta(pattern=r"^(-?[0-9]+ -?[0-9]+ -?[0-9]+( [0-9]+)?)?$")]
"""What quota holds of a user's quota for an admitted request: "cpu mem sto" (integers),
one device; "cpu mem sto n" for a batch holding n devices; empty for a release, which
holds nothing."""


class AdmittedEntry(Struct, kw_only=True, forbid_unknown_fields=True):
    """One entry of the admitted stream (quota -> select), field by field. Unlike the other
    streams its entry has two fields: ``d``, the request as the producer sent it
    (:data:`Request`, JSON, passed on byte for byte), and ``c``, its :data:`Hold`. An
    entry of ``d`` alone is a release (:class:`ReleaseRequest`, one or a batch) that a
    producer added here itself, skipping quota (docs/wire-format.md); select validates it
    as quota would and answers anything else ``invalid_request``."""

    d: Request
    c: Hold | None = None


class Tick(Struct, kw_only=True):
    at_ms: int


JobName = Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[a-z_]+$")]
"""A tracked job's name (stages.jobs.JOBS: expire, trim, stats_snapshot, purge, ...)."""


class JobRunRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """A manual run of one job now (``devsched jobs run NAME``), added to the
    ``<prefix>:job_requests`` stream that the timers stage reads beside the ticks; the
    answer (a :class:`JobRunResult`) goes to ``reply_to``. The same ``request_id``
    always gets the first answer (the job runs once)."""

    request_id: Annotated[str, Meta(min_length=1, max_length=128)]
    reply_to: Annotated[str, Meta(min_length=1, max_length=512)]
    job: JobName


JobRunStatus = Literal["succeeded", "failed", "busy", "unknown_job"]
"""How a manual run ended: ``busy`` when another run of the job holds its claim (nothing
ran), ``unknown_job`` when no job has that name."""


class JobRunResult(Struct, kw_only=True, forbid_unknown_fields=True):
    """The answer to a :class:`JobRunRequest`."""

    request_id: str
    operation: str
    """The job's name."""
    executed_at: str
    """When the run started, ISO 8601 UTC (``2026-01-15T10:30:00.000Z``)."""
    status: JobRunStatus
    processed_count: int
    """What the run handled: allocations expired, entries trimmed, rows purged, ..."""
    error: str | None
    execution_time_ms: int


class Notification(Struct, kw_only=True, omit_defaults=True):
    """One entry of the outbound notifications stream (docs/wire-format.md lists every
    ``event``). Fields that do not apply to an event are left out."""

    event: str
    user_id: str | None = None
    tenant_id: str | None = None
    allocation_id: str | None = None
    device_id: str | None = None
    request_id: str | None = None
    reason: str | None = None
    message: str
    channels: list[str]
    """Where to deliver it: ``webhook``, ``websocket``, ``email``, ``sms`` (hints)."""
    at_ms: int
    status: str | None = None
    """The device's or user's status after the event."""
    duration_seconds: int | None = None
    """device.released / allocation.expired: the allocation's billed length."""
    released_allocations: int | None = None
    """User and billing events: how many allocations the event ended."""
    info: str | None = None
    expected_end_ms: int | None = None
    """device.maintenance: what it is and when it is expected to end."""
    amount: float | None = None
    days: int | None = None
    balance: float | None = None
    failure_count: int | None = None
    failure_threshold: int | None = None
    """Billing details (see the event that caused it)."""
    previous_device_id: str | None = None
    """allocation.replaced: the device the allocation was on (``device_id`` is the new one)."""
    device_name: str | None = None
    adb_host: str | None = None
    adb_port: int | None = None
    """allocation.replaced: the new device's name and ADB endpoint."""
    replacement_device_id: str | None = None
    """A device event: the device its allocation moved to (``allocation.replaced``
    carries the details)."""
    expires_at_ms: int | None = None
    previous_expires_at_ms: int | None = None
    """allocation.renewed: when the allocation ends now, and when it was to end before."""
    reservation_id: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    """reservation.*: the reservation and its interval."""


# --- records ------------------------------------------------------------------


class DeviceSpec(Struct, kw_only=True, forbid_unknown_fields=True):
    id: Id
    name: Name | None = None
    pool: Id = "default"
    model: Name = "generic"
    host: Name = "node-1"
    adb_host: Name = "127.0.0.1"
    adb_port: Annotated[int, Meta(ge=1, le=65535)] = 5555
    cpu_cores: Annotated[int, Meta(ge=1, le=4096)] = 2
    memory_mb: Annotated[int, Meta(ge=1, le=1 << 30)] = 4096
    storage_mb: Annotated[int, Meta(ge=0, le=1 << 30)] = 32768


class QuotaSpec(Struct, kw_only=True, forbid_unknown_fields=True):
    user_id: Id
    status: Literal["active", "suspended", "expired", "overdue"] = "active"
    expires_at_ms: int | None = None
    max_devices: Annotated[int, Meta(ge=0, le=100_000)] = 10
    max_cpu_per_device: Annotated[int, Meta(ge=0, le=4096)] = 16
    max_memory_mb_per_device: Annotated[int, Meta(ge=0, le=1 << 30)] = 65536
    total_cpu_cores: Annotated[int, Meta(ge=0, le=1 << 30)] = 160
    total_memory_gb: Annotated[int, Meta(ge=0, le=1 << 30)] = 640
    total_storage_gb: Annotated[int, Meta(ge=0, le=1 << 30)] = 10240


# Encoders and decoders, made once.
encoder = msgspec.json.Encoder()
request_decoder = msgspec.json.Decoder(Request)
reply_decoder = msgspec.json.Decoder(Reply)
change_decoder = msgspec.json.Decoder(Change)
notification_decoder = msgspec.json.Decoder(Notification)
tick_decoder = msgspec.json.Decoder(Tick)
job_run_request_decoder = msgspec.json.Decoder(JobRunRequest)
job_run_result_decoder = msgspec.json.Decoder(JobRunResult)



def decode_admitted(fields: Mapping[bytes, bytes]) -> AdmittedEntry:
    """An admitted stream entry's fields (as XREAD returns them), read strictly: exactly
    ``d`` and ``c``, a valid request and a well-formed hold."""
    named: dict[str, object] = {k.decode(): v for k, v in fields.items()}
    if isinstance(raw := named.get("d"), bytes):
        named["d"] = request_decoder.decode(raw)
    if isinstance(hold := named.get("c"), bytes):
        named["c"] = hold.decode()
    return msgspec.convert(named, AdmittedEntry)


# --- HTTP sinks (docs/wire-format.md, "Billing export" and "Webhooks") ------------------


class UsageEntry(Struct, kw_only=True, forbid_unknown_fields=True):
    """One ledger row as the billing service gets it (POST <base>/usage): the final row of
    a closed allocation, or an interim row of a long one (periodic metering)."""

    entry_id: str
    """The receiver's dedupe key: the allocation id for the final entry, ``<allocation
    id>:<covered seconds>`` for an interim one. An entry may come again (a retried
    batch), never with other numbers."""
    kind: Literal["final", "interim"] = "final"
    allocation_id: str
    user_id: str
    tenant_id: str | None
    device_id: str
    started_at_ms: int
    ended_at_ms: int
    billed_seconds: int
    """Seconds this entry bills; an allocation's entries add up to its exact length."""
    reason: str
    """released, expired, or the event that ended it (device_failed, ...); ``interim`` for
    an interim entry."""
    covered_from_ms: int | None = None
    """The part of the allocation this entry bills: from (ms) ..."""
    covered_to_ms: int | None = None
    """... to (ms); the final entry covers from the end of the last interim one."""


class UsageBatch(Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of POST <DEVSCHED_BILLING_URL>/usage."""

    entries: list[UsageEntry]


class AccountStanding(Struct, kw_only=True):
    """The answer of GET <DEVSCHED_BILLING_URL>/accounts/<user_id> (other fields ignored)."""

    status: Literal["ok", "overdue"]
    balance: float | None = None


class WebhookNotification(Notification, kw_only=True, omit_defaults=True):
    """A notification as the webhook gets it: with ``id``, the notification's entry id on
    the notifications stream (the receiver's dedupe key)."""

    id: str


class WebhookBatch(Struct, kw_only=True):
    """The body of POST <DEVSCHED_WEBHOOK_URL>, signed in X-Devsched-Signature."""

    notifications: list[WebhookNotification]
