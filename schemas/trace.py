"""The records of a trace file (docs/trace-format.md): JSON lines, one record a line,
each with its ``kind``.

A trace is what ``devsched trace record`` takes from a running system's history and
``devsched trace generate`` makes up; ``devsched simulate`` replays it. The first line is
the header, then every device, then the timed records (request, release, device_event,
reservation) in order of ``at_ms`` (ties in file order). The Structs forbid unknown
fields and a record out of order is refused by :func:`stages.tools.trace.read_trace`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from schemas.messages import Id, Name

Millis = Annotated[int, Meta(ge=0, le=(1 << 53) - 1)]
TRACE_VERSION = 1
"""The format's version, in every header."""


class TraceHeader(Struct, tag_field="kind", tag="header", kw_only=True,
                  forbid_unknown_fields=True):
    """What the trace covers: the replay runs from ``start_ms`` to ``end_ms``."""

    version: int = TRACE_VERSION
    source: Literal["generated", "recorded", "hand"]
    start_ms: Millis
    end_ms: Millis
    seed: int | None = None
    """The generator's seed (generated traces)."""
    description: str = ""


class TraceDevice(Struct, tag_field="kind", tag="device", kw_only=True,
                  forbid_unknown_fields=True):
    """A device of the farm, there for the whole trace (failures are device_event)."""

    id: Id
    host: Name
    pool: Id = "default"
    model: Name = "generic"
    cpu_cores: Annotated[int, Meta(ge=1)]
    memory_mb: Annotated[int, Meta(ge=1)]
    storage_mb: Annotated[int, Meta(ge=0)] = 32768


class TraceRequest(Struct, tag_field="kind", tag="request", kw_only=True,
                   forbid_unknown_fields=True):
    """An allocate request of one device, as a producer sends it at ``at_ms``."""

    at_ms: Millis
    request_id: Id
    user_id: Id
    min_cpu_cores: Annotated[int, Meta(ge=0)] = 0
    min_memory_mb: Annotated[int, Meta(ge=0)] = 0
    model: Name | None = None
    pool: Id | None = None
    duration_seconds: Annotated[int, Meta(ge=1)]
    """The length asked for (the allocation expires after it unless released first)."""
    wait_seconds: Annotated[int, Meta(ge=1)] | None = None
    """Wait in the queue up to this long when no device fits (absent: refused at once)."""
    priority: int | None = None


class TraceRelease(Struct, tag_field="kind", tag="release", kw_only=True,
                   forbid_unknown_fields=True):
    """The user lets go of what ``request_id`` got. ``at_ms - request.at_ms`` is how long
    the user keeps the device once served: a request served late (it waited) is released
    that much later. Ignored for a request that got nothing or whose allocation ended."""

    at_ms: Millis
    request_id: Id


class TraceDeviceEvent(Struct, tag_field="kind", tag="device_event", kw_only=True,
                       forbid_unknown_fields=True):
    """A device fails (its allocation ends ``device_failed``, it leaves the pool) or
    comes back (``recovered``)."""

    at_ms: Millis
    device_id: Id
    event: Literal["failed", "recovered"]


class TraceReservation(Struct, tag_field="kind", tag="reservation", kw_only=True,
                       forbid_unknown_fields=True):
    """A booking made at ``at_ms`` for ``[start_ms, end_ms)``: one device of the size
    (and model) for the user, replayed as a ``reserve`` request at ``at_ms``. At its
    start the reservations jobs make it an allocation; the user claims it then when
    ``showed_up`` (else it ends ``no_show`` after DEVSCHED_RESERVATION_GRACE_S), lets it
    go at ``released_at_ms`` (absent: it runs to ``end_ms``); ``cancelled_at_ms``: the
    user cancels it then (a ``cancel_reservation`` request)."""

    at_ms: Millis
    reservation_id: Id
    user_id: Id
    start_ms: Millis
    end_ms: Millis
    min_cpu_cores: Annotated[int, Meta(ge=0)] = 0
    min_memory_mb: Annotated[int, Meta(ge=0)] = 0
    model: Name | None = None
    pool: Id | None = None
    showed_up: bool = True
    """The user claimed the reservation at its start (False: a no-show)."""
    released_at_ms: Millis | None = None
    """The user released the reservation's allocation then, before its end."""
    cancelled_at_ms: Millis | None = None
    """The user cancelled the reservation then (before or after its start)."""


TraceRecord = (TraceHeader | TraceDevice | TraceRequest | TraceRelease | TraceDeviceEvent
               | TraceReservation)
"""One line of a trace file."""
TimedRecord = TraceRequest | TraceRelease | TraceDeviceEvent | TraceReservation

trace_decoder = msgspec.json.Decoder(TraceRecord)
trace_encoder = msgspec.json.Encoder()
