"""events: applies events from other systems (devices, users, billing) to the live state.

Reads ``<prefix>:events`` in its own group. Each entry is decoded against
:data:`schemas.events.Event`; one that does not decode (not JSON, an unknown
``type``, a missing or wrong field, too large) becomes a dead letter with the
reason (counted ``invalid``) and never stops the stage. The others become typed
rows of ONE events.lua call per batch, which applies each event, records the
changes it causes on the changes stream (persist, bill and notify take them from
there) and acks the batch, atomically: a crash before the call changes nothing,
after it everything is done. Each event is applied once (its ``event_id`` is
kept), in order per entity and source (its ``version``), and an allocation it
ends is closed exactly as a release closes one, with the reason (see
events.lua). An allocation whose request said ``replace_on_failure`` is moved
instead, in that same call, to an equivalent free device when its device goes
down (ended only when none is free; counted in ``scheduler_auto_replace_total``).
Events for a device or user the scheduler does not know are counted ``ignored``.
Tenant events (``tenant.created``, ``tenant.plan_changed``, ``tenant.deleted``) change the
global schedules instead (stages/schedules.py): they are applied and acked by one
schedules.lua call per batch, made before the events.lua call of the others (a crash
between the two redelivers the rest; a tenant event applied twice is a duplicate by its
``event_id``); one naming a plan not in DEVSCHED_PLAN_INTERVALS is dead-lettered.

Failures (SPEC B4): when the call fails, the worker retries the entries one at a
time. A critical event (:data:`schemas.events.CRITICAL`) that still fails is
raised again: it stays pending, is retried, and past ``DEVSCHED_MAX_DELIVERIES``
goes to the dead stream with the error. An informational event whose call fails
is handed to the dead stream with the error and acked at once (one atomic
hand-off), counted ``failed``: it is not retried, and not lost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec
from redis.exceptions import ResponseError

from pipeline.connections import text
from pipeline.scripts import HANDOFF, HandoffCall, HandoffKeys, HandOn
from pipeline.worker import Entry, dead_letter_of
from schemas.events import (
    CRITICAL,
    EVENT_TYPES,
    DeviceCreated,
    DeviceEvent,
    DeviceMaintenance,
    DeviceStatusChanged,
    Standing,
    TenantDeleted,
    TenantEvent,
    UserEvent,
    UserQuotaUpdated,
    event_decoder,
    event_type,
)
from schemas.keys import GROUP_EVENTS
from schemas.messages import QuotaSpec
from schemas.rows import (
    DeadRow,
    DeviceEventRow,
    EventsCall,
    EventsKeys,
    EventsRow,
    TenantOp,
    UserEventRow,
)
from schemas.runtime import dead_encoder
from stages import metrics
from stages.context import StageContext
from stages.schedules import apply_tenants, plan_tiers
from stages.scripts import EVENTS

log = logging.getLogger("devsched.events")

QUOTA_DEFAULTS = QuotaSpec(user_id="defaults")
"""The limits user.quota_updated gives a new user for those it leaves out: the defaults
of `devsched quota set`."""


class _TypeOnly(msgspec.Struct):
    type: object = None


_type_only = msgspec.json.Decoder(_TypeOnly)


def type_label(raw: bytes) -> str:
    """The ``type`` of an event that did not decode, as a metric label: one of the 19
    names, else ``unknown`` (labels stay a bounded set)."""
    try:
        value = _type_only.decode(raw).type
    except (msgspec.ValidationError, msgspec.DecodeError):
        return "unknown"
    return value if isinstance(value, str) and value in EVENT_TYPES else "unknown"


def event_row(entry_id: str, event: DeviceEvent | UserEvent) -> EventsRow:
    """The script row for one decoded event."""
    kind = event_type(event)
    if isinstance(event, DeviceEvent):
        row = DeviceEventRow(entry_id=entry_id, type=kind, event_id=event.event_id,
                             version=event.version, device_id=event.device_id,
                             reason=getattr(event, "reason", None))
        if isinstance(event, DeviceStatusChanged):
            row.status = event.status
        elif isinstance(event, DeviceMaintenance):
            row.info, row.expected_end_ms = event.info, event.expected_end_ms
        elif isinstance(event, DeviceCreated):
            row.name, row.pool, row.model, row.host = event.name, event.pool, event.model, event.host
            row.adb_host, row.adb_port = event.adb_host, event.adb_port
            row.cpu_cores, row.memory_mb, row.storage_mb = (event.cpu_cores, event.memory_mb,
                                                            event.storage_mb)
        return row
    row_u = UserEventRow(entry_id=entry_id, type=kind, event_id=event.event_id,
                         version=event.version, user_id=event.user_id,
                         reason=getattr(event, "reason", None),
                         amount=getattr(event, "amount", None), days=getattr(event, "days", None),
                         balance=getattr(event, "balance", None))
    if isinstance(event, Standing):
        row_u.status, row_u.observed_at_ms = event.status, event.observed_at_ms
    elif row_u.type.startswith("billing."):
        row_u.observed_at_ms = event.occurred_at_ms
    if isinstance(event, UserQuotaUpdated):
        row_u.max_devices = event.max_devices
        row_u.max_cpu_per_device = event.max_cpu_per_device
        row_u.max_memory_mb_per_device = event.max_memory_mb_per_device
        row_u.total_cpu_cores = event.total_cpu_cores
        row_u.total_memory_gb = event.total_memory_gb
        row_u.total_storage_gb = event.total_storage_gb
        row_u.expires_at_ms = event.expires_at_ms
    return row_u


class EventsStage:
    group = GROUP_EVENTS

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.keys = ctx.keys
        self.streams = [self.keys.events]
        k = self.keys
        self.script_keys = EventsKeys(events=k.events, changes=k.changes, dead=k.dead)

    def tenant_op(self, entry: Entry, event: TenantEvent) -> TenantOp | DeadRow:
        """A tenant event as a schedules.lua op (acked by that call); an unknown plan is a
        dead letter with the reason."""
        if isinstance(event, TenantDeleted):
            return TenantOp(action="delete", tenant_id=event.tenant_id, event_id=event.event_id,
                            version=event.version, entry_id=entry.id)
        if event.plan not in plan_tiers(self.ctx.settings):
            return self._invalid(entry, f"unknown plan {event.plan!r} (plans: "
                                        f"{', '.join(plan_tiers(self.ctx.settings))})")
        return TenantOp(action="set", tenant_id=event.tenant_id, plan=event.plan,
                        event_id=event.event_id, version=event.version, entry_id=entry.id)

    def item(self, entry: Entry) -> tuple[EventsRow | TenantOp, str]:
        """The row for one entry, and the event's type (its metric label)."""
        raw = entry.data
        limit = self.ctx.settings.max_message_bytes
        if len(raw) > limit:
            return self._invalid(entry, f"event of {len(raw)} bytes exceeds {limit} bytes"), \
                type_label(raw[:limit])
        try:
            event = event_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return self._invalid(entry, str(exc)), type_label(raw)
        if isinstance(event, TenantEvent):
            return self.tenant_op(entry, event), event_type(event)
        return event_row(entry.id, event), event_type(event)

    def _invalid(self, entry: Entry, reason: str) -> DeadRow:
        letter = dead_letter_of(entry, stage=self.group, error=f"invalid event: {reason}",
                                at_ms=self.ctx.clock.now_ms(), refused=True)
        return DeadRow(entry_id=entry.id, letter=dead_encoder.encode(letter).decode())

    async def handle(self, entries: Sequence[Entry]) -> None:
        s = self.ctx.settings
        both = [self.item(entry) for entry in entries]
        tenants = [(op, kind) for op, kind in both if isinstance(op, TenantOp)]
        if tenants:
            # tenant events change the schedules ({sched}): applied and acked in one call
            done = await apply_tenants(self.ctx.redis, s, self.ctx.clock.now_ms(),
                                       [op for op, _ in tenants])
            for (_, kind), (_, status) in zip(tenants, done, strict=True):
                label = {"duplicate": "duplicate", "stale": "stale",
                         "not_found": "ignored"}.get(status, "applied")
                metrics.EVENT_CONSUMED.labels(kind, label).inc()
            entries = [e for e, (op, _) in zip(entries, both, strict=True)
                       if not isinstance(op, TenantOp)]
            if not entries:
                return
        items = [(row, kind) for row, kind in both if not isinstance(row, TenantOp)]
        call = EventsCall(
            prefix=s.prefix, group=self.group, now_ms=self.ctx.clock.now_ms(),
            event_ttl_s=s.idempotency_ttl_s, released_ttl_s=s.released_ttl_s,
            payment_failure_ttl_s=s.payment_failure_ttl_s,
            payment_failure_threshold=s.payment_failure_threshold,
            quota_defaults=QUOTA_DEFAULTS, items=[row for row, _type in items],
        )
        try:
            statuses, reasons, replaced = await EVENTS(self.ctx.redis, self.script_keys, call)
        except ResponseError as exc:
            row, kind = items[0]
            if len(entries) > 1 or kind in CRITICAL or isinstance(row, DeadRow):
                raise  # the worker retries (one at a time) and dead-letters past the limit
            await self._give_up(entries[0], kind, exc)
            return
        for (_row, kind), status in zip(items, statuses, strict=True):
            label = text(status)
            metrics.EVENT_CONSUMED.labels(kind, "invalid" if label == "dead" else label).inc()
        for i in range(0, len(reasons), 2):
            metrics.AUTO_RELEASE.labels(text(reasons[i])).inc(int(reasons[i + 1]))
        for i in range(0, len(replaced), 2):
            metrics.AUTO_REPLACE.labels(text(replaced[i])).inc(int(replaced[i + 1]))

    async def _give_up(self, entry: Entry, kind: str, exc: ResponseError) -> None:
        """An informational event that could not be applied: to the dead stream with the
        error, and acked, in one hand-off (added only by the call whose XACK took it)."""
        error = f"{type(exc).__name__}: {exc}"
        letter = dead_letter_of(entry, stage=self.group, error=error,
                                at_ms=self.ctx.clock.now_ms())
        await HANDOFF(self.ctx.redis, HandoffKeys(target=self.keys.dead, source=entry.stream),
                      HandoffCall(group=self.group, maxlen=0, entries=[
                          HandOn(entry_id=entry.id, output=dead_encoder.encode(letter).decode())]))
        metrics.EVENT_CONSUMED.labels(kind, "failed").inc()
        log.error("informational event not applied, dead-lettered and acked: %s", error,
                  extra={"stage": self.group, "entry": entry.id, "event_type": kind})
