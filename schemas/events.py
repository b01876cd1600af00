"""Events from other systems: the inbound stream ``<prefix>:events``.

Each entry has one field, ``d``: a JSON object tagged by ``type``, one of the 19
names in :data:`EVENT_TYPES` (device, user, billing and tenant events). Every event
carries ``event_id`` (its idempotency key: the same id is applied once),
``occurred_at_ms``, an optional ``version`` and its entity's id, ``device_id``
for device events, ``user_id`` for user and billing events; then the fields of
its type. Unknown fields are refused, constraints are in the types, so a bad
event fails at decode with a message naming the field (the events stage
dead-letters it with that message).

Ordering (``version``): versions are per entity and per source: a device's
events (by ``device_id``), a user's ``user.*`` events and a user's ``billing.*``
events (both by ``user_id``, from two different systems) each form one sequence.
An event whose version is not above the last applied one of its sequence changes
nothing; an event without a version is applied in arrival order.

:data:`CRITICAL` names the events that must take effect: when applying one fails
it is retried and, past the delivery limit, dead-lettered with the error. The
others are informational: a failure is recorded in the dead stream and the event
acked, never retried (SPEC B4).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from schemas.messages import Id, Name

Millis = Annotated[int, Meta(ge=0, le=(1 << 53) - 1)]
"""A time in milliseconds since the Unix epoch."""
Version = Annotated[int, Meta(ge=0, le=(1 << 53) - 1)]
"""A per-entity, per-source sequence number; higher is newer."""
Text = Annotated[str, Meta(max_length=1000)]
Money = Annotated[float, Meta(ge=0, le=1e15)]
Balance = Annotated[float, Meta(ge=-1e15, le=1e15)]
"""A balance may be negative."""


class _Event(Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    event_id: Id
    """Idempotency key: an event id already applied (kept DEVSCHED_IDEMPOTENCY_TTL_S)
    changes nothing the second time."""
    occurred_at_ms: Millis
    """When it happened in the system that sent it."""
    version: Version | None = None
    """Its entity's sequence number (see the module docstring); absent: no ordering."""


class _DeviceEvent(_Event, kw_only=True):
    device_id: Id


class _UserEvent(_Event, kw_only=True):
    user_id: Id


# --- device events ------------------------------------------------------------------


class DeviceFailed(_DeviceEvent, tag="device.failed", kw_only=True):
    """The device failed: its allocation ends (``device_failed``), it leaves the free
    pool until a ``device.status_changed`` to ``running`` or a ``device.created``."""

    reason: Text | None = None


class DeviceDeleted(_DeviceEvent, tag="device.deleted", kw_only=True):
    """The device is gone: its allocation ends (``device_deleted``), it leaves the pool
    and the device listings."""

    reason: Text | None = None


class DeviceStatusChanged(_DeviceEvent, tag="device.status_changed", kw_only=True):
    """``stopped`` or ``error``: its allocation ends (``device_stopped`` /
    ``device_error``) and it leaves the pool; ``running``: it is back in the pool."""

    status: Literal["running", "stopped", "error"]
    previous_status: Name | None = None
    """What the sender saw before (informational)."""
    reason: Text | None = None


class DeviceMaintenance(_DeviceEvent, tag="device.maintenance", kw_only=True):
    """The device goes to maintenance: its allocation ends (``device_maintenance``), its
    user is told ``info`` and ``expected_end_ms``; it is out of the pool until back
    (``device.status_changed`` to ``running``)."""

    info: Text | None = None
    expected_end_ms: Millis | None = None
    reason: Text | None = None


class DeviceCreated(_DeviceEvent, tag="device.created", kw_only=True):
    """A device to add (or update), as ``devsched devices add`` does; it is (back) in its
    pool. The defaults are those of ``devices add``; ``name`` defaults to the id."""

    name: Name | None = None
    pool: Id = "default"
    model: Name = "generic"
    host: Name = "node-1"
    adb_host: Name = "127.0.0.1"
    adb_port: Annotated[int, Meta(ge=1, le=65535)] = 5555
    cpu_cores: Annotated[int, Meta(ge=1, le=4096)] = 2
    memory_mb: Annotated[int, Meta(ge=1, le=1 << 30)] = 4096
    storage_mb: Annotated[int, Meta(ge=0, le=1 << 30)] = 32768


# --- user events --------------------------------------------------------------------


class UserDeleted(_UserEvent, tag="user.deleted", kw_only=True):
    """Every allocation of the user ends (``user_deleted``); later requests are refused."""

    reason: Text | None = None


class UserSuspended(_UserEvent, tag="user.suspended", kw_only=True):
    """Every allocation of the user ends (``user_suspended``); later requests get
    ``user_suspended`` until ``user.activated``."""

    reason: Text | None = None


class UserActivated(_UserEvent, tag="user.activated", kw_only=True):
    """The user is no longer suspended or deleted (a billing block stays)."""

    reason: Text | None = None


class UserQuotaUpdated(_UserEvent, tag="user.quota_updated", kw_only=True):
    """New limits; a limit left out keeps its value (a user without a quota record gets
    one, the left-out limits at the defaults of ``devsched quota set``). When the use
    is above the new limits, the oldest allocations end first (``quota_reduced``) until
    it is within them; the newest are kept."""

    max_devices: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    max_cpu_per_device: Annotated[int, Meta(ge=0, le=4096)] | None = None
    max_memory_mb_per_device: Annotated[int, Meta(ge=0, le=1 << 30)] | None = None
    total_cpu_cores: Annotated[int, Meta(ge=0, le=1 << 30)] | None = None
    total_memory_gb: Annotated[int, Meta(ge=0, le=1 << 30)] | None = None
    total_storage_gb: Annotated[int, Meta(ge=0, le=1 << 30)] | None = None
    expires_at_ms: Millis | None = None
    reason: Text | None = None


class UserQuotaExceeded(_UserEvent, tag="user.quota_exceeded", kw_only=True):
    """The user is over quota: the oldest allocations end (``quota_exceeded``) until the
    use is within the limits."""

    reason: Text | None = None


# --- billing events -----------------------------------------------------------------


class PaymentFailed(_UserEvent, tag="billing.payment_failed", kw_only=True):
    """Counted per user in Redis (kept DEVSCHED_PAYMENT_FAILURE_TTL_S after the last
    one); below DEVSCHED_PAYMENT_FAILURE_THRESHOLD a warning; at it, every allocation
    ends (``payment_failed``) and the user is suspended until a payment succeeds."""

    amount: Money | None = None
    reason: Text | None = None


class BalanceLow(_UserEvent, tag="billing.balance_low", kw_only=True):
    """A warning to the user; nothing else changes."""

    balance: Balance
    threshold: Balance | None = None


class Overdue(_UserEvent, tag="billing.overdue", kw_only=True):
    """Every allocation ends at once (``billing_overdue``); later requests get
    ``billing_overdue`` until a payment succeeds or the account is recharged."""

    amount: Money
    days: Annotated[int, Meta(ge=0, le=100_000)]


class PaymentSucceeded(_UserEvent, tag="billing.payment_success", kw_only=True):
    """The failure count is reset; an overdue user, or one suspended for failed
    payments, is unblocked."""

    amount: Money | None = None
    balance: Balance | None = None


class Recharged(_UserEvent, tag="billing.recharged", kw_only=True):
    """As billing.payment_success."""

    amount: Money
    balance: Balance | None = None


class Standing(_UserEvent, tag="billing.standing", kw_only=True):
    """The billing service's answer about the account (GET <base>/accounts/<user_id>),
    observed at ``observed_at_ms``: the ok/overdue part of the billing status becomes
    ``status``. The export stage's refresher sends it when the answer differs from that
    part; the billing service may send it too. It is in the user's billing.* sequence
    (``version``, when given) and applied only when no billing event or standing observed
    later was applied before (its ``observed_at_ms`` against their ``occurred_at_ms`` /
    ``observed_at_ms``): the newest observation wins. A ``suspended`` set by failed
    payments is kept (payment events own it). It ends no allocation: ``overdue`` refuses
    new allocations and renewals (``billing_overdue``), ``ok`` admits them again."""

    status: Literal["ok", "overdue"]
    balance: Balance | None = None
    observed_at_ms: Millis


# --- tenant events -------------------------------------------------------------------


class _TenantEvent(_Event, kw_only=True):
    tenant_id: Id


class TenantCreated(_TenantEvent, tag="tenant.created", kw_only=True):
    """A tenant joins on ``plan``: it enters one batch of each kind's schedule of the
    plan's interval tier (stages/schedules.py). An existing tenant changes plan."""

    plan: Name


class TenantPlanChanged(_TenantEvent, tag="tenant.plan_changed", kw_only=True):
    """The tenant's plan changes: it moves to the schedules of the new tier, atomically
    (never in two batches, never in none). An unknown tenant is created."""

    plan: Name
    previous_plan: Name | None = None
    """What the sender saw before (informational)."""


class TenantDeleted(_TenantEvent, tag="tenant.deleted", kw_only=True):
    """The tenant leaves every schedule and the retry queue."""

    reason: Text | None = None


DeviceEvent = DeviceFailed | DeviceDeleted | DeviceStatusChanged | DeviceMaintenance | DeviceCreated
UserEvent = (UserDeleted | UserSuspended | UserActivated | UserQuotaUpdated | UserQuotaExceeded
             | PaymentFailed | BalanceLow | Overdue | PaymentSucceeded | Recharged | Standing)
TenantEvent = TenantCreated | TenantPlanChanged | TenantDeleted
Event = DeviceEvent | UserEvent | TenantEvent
"""Every inbound event, tagged by ``type``."""

EVENT_CLASSES: tuple[type[_Event], ...] = (
    DeviceFailed, DeviceDeleted, DeviceStatusChanged, DeviceMaintenance, DeviceCreated,
    UserDeleted, UserSuspended, UserActivated, UserQuotaUpdated, UserQuotaExceeded,
    PaymentFailed, BalanceLow, Overdue, PaymentSucceeded, Recharged, Standing,
    TenantCreated, TenantPlanChanged, TenantDeleted,
)


def event_type(cls: type[Struct] | Struct) -> str:
    """The ``type`` tag of an event class or event."""
    klass = cls if isinstance(cls, type) else type(cls)
    return str(klass.__struct_config__.tag)


EVENT_TYPES: tuple[str, ...] = tuple(event_type(c) for c in EVENT_CLASSES)
"""The 19 names, in the order above."""

CRITICAL: frozenset[str] = frozenset({
    "device.failed", "device.deleted", "user.deleted", "user.suspended", "billing.overdue",
})
"""Events retried and then dead-lettered when applying them fails (SPEC B4)."""

event_decoder = msgspec.json.Decoder(Event)
