"""Apply numbered SQL migrations, each once, in order.

The migrations are the ``NNN_name.sql`` files of a folder the caller gives as an
``importlib.resources`` Traversable (package data, so an installed package
migrates as a checkout does); other files in it are ignored, and two files with
one number are refused before anything runs. The runner takes a PostgreSQL
advisory lock, so two processes migrating at once apply each file exactly once;
each file runs in its own transaction together with its row in
``schema_migrations``, so a failed file leaves no trace and is retried next
time. Running it again applies nothing.
"""

from __future__ import annotations

import re
from importlib.resources.abc import Traversable

import asyncpg

MIGRATION_LOCK = 7_314_159_265
"""Advisory lock id held while migrating."""
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def migration_files(source: Traversable) -> list[tuple[int, Traversable]]:
    """The numbered migration files in source, as (number, file), in number order."""
    found: dict[int, Traversable] = {}
    for entry in sorted(source.iterdir(), key=lambda e: e.name):
        m = _NAME.match(entry.name)
        if not (m and entry.is_file()):
            continue
        version = int(m.group(1))
        if version in found:
            raise ValueError(
                f"two migrations numbered {version:03d}: {found[version].name}, {entry.name}"
            )
        found[version] = entry
    return sorted(found.items())


async def migrate(database_url: str, source: Traversable) -> list[str]:
    """Apply the migrations of source that are missing; return the names applied now."""
    files = migration_files(source)
    conn = await asyncpg.connect(database_url)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version INTEGER PRIMARY KEY,
                   name TEXT NOT NULL,
                   applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, entry in files:
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(entry.read_text(encoding="utf-8"))
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    version, entry.name,
                )
            applied.append(entry.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        await conn.close()
    return applied
