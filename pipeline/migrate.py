"""Apply the numbered SQL migrations in sql/, each once, in order.

The runner takes a PostgreSQL advisory lock, so two processes migrating at once
apply each file exactly once; each file runs in its own transaction together
with its row in ``schema_migrations``, so a failed file leaves no trace and is
retried next time. Running it again applies nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATION_LOCK = 7_314_159_265
"""Advisory lock id held while migrating."""
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def migration_files(sql_dir: Path = SQL_DIR) -> list[tuple[int, Path]]:
    found = []
    for path in sorted(sql_dir.glob("*.sql")):
        m = _NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return found


async def migrate(database_url: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply what is missing; return the names applied by this call."""
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
        for version, path in migration_files(sql_dir):
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    version, path.name,
                )
            applied.append(path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        await conn.close()
    return applied
