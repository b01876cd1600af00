"""The stages' Lua scripts, each declared once with its keys and call types.

Each script is ``stages/lua/common.lua`` (shared helpers and the builders of the
messages two scripts emit), ``allocations.lua`` (the helpers of giving, taking back and
moving devices: every script but quota's, which needs none of them), ``call.lua`` (the
line where a Redis Function's per-call part begins, and the reset of the helpers'
state) and its own file, all package data (select's and quota's own files hold the
marker themselves, after their functions, so that on Redis 7 those are made once per
library); the keys
and call types live in ``schemas/rows.py`` and ``pipeline.scripts`` generates the
preamble that gives the script ``KEY`` and ``CALL`` by name. A call site passes
a keys NamedTuple and a call Struct: ``await QUOTA(redis, QuotaKeys(...),
QuotaCall(...))``.
"""

from __future__ import annotations

from typing import Any

from pipeline.scripts import APPEND, HANDOFF, Script, lua_source
from schemas.rows import (
    AdminCall,
    AdminKeys,
    EventsCall,
    EventsKeys,
    ExpireCall,
    ExpireKeys,
    JobsCall,
    JobsKeys,
    QuotaCall,
    QuotaKeys,
    RebuildCall,
    RebuildKeys,
    ReservationsCall,
    ReservationsKeys,
    SchedulesCall,
    SchedulesKeys,
    SelectCall,
    SelectKeys,
)

DEVICE_HELPERS = ("common.lua", "allocations.lua")
"""The helpers of every script but quota's."""
DEVICE_SIDE = (*DEVICE_HELPERS, "call.lua")
"""The helpers, then the per-call marker (select.lua holds its own, after its functions)."""

QUOTA = Script("quota", QuotaKeys, QuotaCall, lua_source("stages", "common.lua", "quota.lua"))
"""Admit or refuse a batch of requests and ack them (user keys)."""
SELECT = Script("select", SelectKeys, SelectCall,
                lua_source("stages", *DEVICE_HELPERS, "bookings.lua", "select.lua"))
"""Allocate or release for a batch of admitted requests (reservations too), reply, ack."""
EXPIRE = Script("expire", ExpireKeys, ExpireCall, lua_source("stages", *DEVICE_SIDE, "expire.lua"))
"""Close allocations past their expires-at."""
ADMIN = Script("admin", AdminKeys, AdminCall, lua_source("stages", *DEVICE_SIDE, "admin.lua"))
"""Add or update a device; set a user's quota."""
REBUILD = Script("rebuild", RebuildKeys, RebuildCall,
                 lua_source("stages", *DEVICE_SIDE, "rebuild.lua"))
"""Write a chunk of the live state loaded from PostgreSQL (devsched rebuild)."""

EVENTS = Script("events", EventsKeys, EventsCall, lua_source("stages", *DEVICE_SIDE, "events.lua"))
"""Apply a batch of events from other systems, record their changes, ack."""

RESERVATIONS = Script("reservations", ReservationsKeys, ReservationsCall,
                      lua_source("stages", *DEVICE_SIDE, "bookings.lua", "reservations.lua"))
"""Activate due reservations, end no-shows, complete the ended (the reservations jobs)."""

JOBS = Script("jobs", JobsKeys, JobsCall, lua_source("stages", "jobs.lua"))
"""Claim, finish and control the tracked timer jobs (their live state)."""

SCHEDULES = Script("schedules", SchedulesKeys, SchedulesCall, lua_source("stages", "schedules.lua"))
"""Tenants, global schedules and their batches, batch claims, the retry queue."""

ALL: tuple[Script[Any, Any], ...] = (QUOTA, SELECT, EXPIRE, ADMIN, EVENTS, JOBS, RESERVATIONS,
                                     SCHEDULES, HANDOFF, APPEND)
"""Every script a stage process runs, loaded once at start."""
