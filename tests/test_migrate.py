"""Migrations: found as package data, applied once each, in order, and not again."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio

import sql
from pipeline.embedded import ServerUrls
from pipeline.migrate import migrate, migration_files

ROOT = Path(__file__).resolve().parent.parent


@pytest_asyncio.fixture
async def fresh_database(servers: ServerUrls) -> AsyncIterator[str]:
    """URL of an empty database on the test server, dropped afterwards."""
    name = f"migrate_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(servers.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlsplit(servers.database_url)._replace(path="/" + name).geturl()
        await admin.execute(f'DROP DATABASE "{name}"')
    finally:
        await admin.close()


async def _recorded(url: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    return [(r["version"], r["name"]) for r in rows]


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    finally:
        await conn.close()
    return {r["table_name"] for r in rows}


def test_the_packaged_migrations_are_the_numbered_sql_files() -> None:
    found = migration_files(sql.migrations())
    on_disk = sorted(p.name for p in (ROOT / "sql").glob("[0-9][0-9][0-9]_*.sql"))
    assert [entry.name for _, entry in found] == on_disk
    assert [version for version, _ in found] == list(range(1, len(on_disk) + 1))
    assert "CREATE TABLE" in found[0][1].read_text(encoding="utf-8")


def test_only_numbered_sql_files_count_and_a_number_is_used_once(tmp_path: Path) -> None:
    for name in ("002_second.sql", "001_first.sql", "README.md", "01_short.sql", "003_x.txt"):
        (tmp_path / name).write_text("SELECT 1;")
    assert [(v, e.name) for v, e in migration_files(tmp_path)] == [
        (1, "001_first.sql"), (2, "002_second.sql")]
    (tmp_path / "002_again.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="two migrations numbered 002"):
        migration_files(tmp_path)


async def test_migrate_applies_every_file_once_and_nothing_the_second_time(
    fresh_database: str,
) -> None:
    names = [entry.name for _, entry in migration_files(sql.migrations())]
    assert await migrate(fresh_database, sql.migrations()) == names
    recorded = await _recorded(fresh_database)
    assert recorded == [(v, entry.name) for v, entry in migration_files(sql.migrations())]
    assert {"device_allocations", "devices", "billing_ledger"} <= await _tables(fresh_database)

    assert await migrate(fresh_database, sql.migrations()) == []
    assert await _recorded(fresh_database) == recorded


async def test_a_failed_migration_leaves_no_trace_and_runs_again_next_time(
    fresh_database: str, tmp_path: Path,
) -> None:
    (tmp_path / "001_first.sql").write_text("CREATE TABLE first_table (id INT);")
    (tmp_path / "002_second.sql").write_text(
        "CREATE TABLE second_table (id INT); SELECT no_such_column FROM first_table;")
    with pytest.raises(asyncpg.UndefinedColumnError):
        await migrate(fresh_database, tmp_path)
    assert await _recorded(fresh_database) == [(1, "001_first.sql")]
    assert "second_table" not in await _tables(fresh_database)

    (tmp_path / "002_second.sql").write_text("CREATE TABLE second_table (id INT);")
    assert await migrate(fresh_database, tmp_path) == ["002_second.sql"]
    assert {"first_table", "second_table"} <= await _tables(fresh_database)


async def test_no_index_of_the_written_tables_is_the_prefix_of_another(
    fresh_database: str,
) -> None:
    """The write-behind pays every index of the tables it writes at every row: none is a
    full-table index whose columns lead another full-table index (that one serves its
    lookups), and the lookups by device, user, tenant and status still find an index."""
    await migrate(fresh_database, sql.migrations())
    conn = await asyncpg.connect(fresh_database)
    try:
        rows = await conn.fetch("""
            SELECT t.relname AS tab, i.relname AS idx, x.indpred IS NOT NULL AS partial,
                   array(SELECT a.attname FROM unnest(x.indkey) WITH ORDINALITY k(n, o)
                         JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.n
                         ORDER BY k.o)::text[] AS cols
            FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
            JOIN pg_class t ON t.oid = x.indrelid
            WHERE t.relname IN ('device_allocations', 'billing_ledger')""")
        full = [r for r in rows if not r["partial"]]
        for r in full:
            longer = [s["idx"] for s in full if s["tab"] == r["tab"] and s["idx"] != r["idx"]
                      and len(s["cols"]) > len(r["cols"])
                      and s["cols"][:len(r["cols"])] == r["cols"]]
            assert not longer, f"{r['idx']} {r['cols']} leads {longer}"
        await conn.execute("SET enable_seqscan = off")
        for column, value in (("device_id", "'d1'"), ("user_id", "'u1'"),
                              ("tenant_id", "'t1'"), ("status", "'allocated'")):
            plan = "\n".join(r[0] for r in await conn.fetch(
                f"EXPLAIN SELECT id FROM device_allocations WHERE {column} = {value}"))
            assert "Index" in plan and "Seq Scan" not in plan, plan
    finally:
        await conn.close()
