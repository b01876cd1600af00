"""What schedules.lua answers to a ``dump`` call: the whole state of the global schedules
as one JSON document (stages/schedules.py ``dump``), decoded strictly by these types.

Every Struct forbids unknown fields, so a key renamed in the script fails the decode
(tests/test_script_contract.py). Redis's cjson encodes an empty Lua table as ``{}``, never
``[]``: a list field therefore also accepts an *empty* object (:data:`EmptyObject`), and
nothing else. A hash is read as Redis's flat ``HGETALL`` list (field, value, ...).
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

EmptyObject = Annotated[dict[str, str], Meta(max_length=0)]
"""``{}``: how cjson encodes an empty list."""
Flat = list[str] | EmptyObject
"""A hash as HGETALL gives it (field, value, field, value, ...), or a sorted set WITHSCORES."""


class BatchDump(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One batch of a schedule: ``<schedule>#<number>``."""

    ref: str
    number: int
    hash: Flat
    """size, offset_ms, next_run_ms, last_run_ms, running, started_ms, deadline_ms,
    period_end_ms, rerun, manual, last_status (schemas.keys.Keys.sched_tenants)."""
    count: int
    """Tenants in its members set."""
    due: str | bool
    """Its next run (ms, as text) in the due set; false when it has none."""
    members: list[str] | EmptyObject | None = None
    """Its tenants (only when the dump was asked for members)."""


class ScheduleDumpEntry(Struct, kw_only=True, forbid_unknown_fields=True):
    """One schedule ``<kind>:<tier>``: its hash and its batches."""

    id: str
    hash: Flat
    batches: list[BatchDump] | EmptyObject


class TenantDump(Struct, kw_only=True, forbid_unknown_fields=True):
    """A registered tenant: its plan and its hash (plan, override, batch per kind)."""

    id: str
    plan: str
    hash: Flat


class RetryDump(Struct, kw_only=True, forbid_unknown_fields=True):
    """A tenant run waiting in the retry queue (``<kind>|<tenant>``)."""

    item: str
    due_ms: int
    hash: Flat


class FailedDump(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A tenant run permanently failed (``devsched schedules failed``)."""

    kind: str
    tenant_id: str
    error: str | None = None
    tries: int
    first_failed_ms: int | None = None
    failed_at_ms: int


class ScheduleDump(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """The answer to ``dump``; ``tenants``, ``due`` and ``overrides`` are filled only when
    members were asked for."""

    now_ms: int
    schedules: list[ScheduleDumpEntry] | EmptyObject
    tenants: list[TenantDump] | EmptyObject
    retry: list[RetryDump] | EmptyObject
    failed: list[FailedDump] | EmptyObject
    tenant_count: int
    due: Flat | None = None
    overrides: Flat | None = None
