"""The stages' Lua scripts, each wrapped once (shared helpers first)."""

from __future__ import annotations

from pathlib import Path

from pipeline.scripts import APPEND, HANDOFF, Script

LUA = Path(__file__).parent / "lua"
_COMMON = LUA / "common.lua"

QUOTA = Script("quota", _COMMON, LUA / "quota.lua")
"""Admit or refuse a batch of requests and ack them (user keys)."""
SELECT = Script("select", _COMMON, LUA / "select.lua")
"""Allocate or release for a batch of admitted requests, reply, ack."""
EXPIRE = Script("expire", _COMMON, LUA / "expire.lua")
"""Close allocations past their expires-at."""
ADMIN = Script("admin", _COMMON, LUA / "admin.lua")
"""Add or update a device; set a user's quota."""
REBUILD = Script("rebuild", _COMMON, LUA / "rebuild.lua")
"""Write a chunk of the live state loaded from PostgreSQL (devsched rebuild)."""

ALL = (QUOTA, SELECT, EXPIRE, ADMIN, HANDOFF, APPEND)
