"""The Redis the state lives in: refused when it may evict keys, warned about when it keeps
nothing on disk, reached through a password, and URLs passed on untouched.

Each test runs a redis-server of its own (the embedded launcher, in a folder of the
test, with its generated password), so changing its configuration touches nothing
else; a changed setting is put back before the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError

from pipeline.clock import ManualClock
from pipeline.connections import FastSSLConnection, blocking_reader, pg_pool, redis_client
from pipeline.durability import EX_CONFIG, UnsafeRedisError, check_redis
from pipeline.embedded import redis_server
from pipeline.embedded.layout import Layout
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, QuotaSpec, Released
from stages.app import serve
from stages.settings import Settings
from stages.state import mark_state
from stages.tools.admin import delete_keys, write_behind_drained
from stages.tools.audit import audit
from stages.tools.client import Client
from tests.conftest import seed, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[redis_server.RedisRecord]:
    """A redis-server of this test alone (AOF on, a generated password)."""
    layout = Layout.of(tmp_path / "own")
    record = redis_server.start(layout)
    yield record
    redis_server.stop(layout, record)


@pytest.fixture
def on_own(settings: Settings, own_redis: redis_server.RedisRecord) -> Settings:
    """The test's settings, with Redis at its own server, reached over TCP with the password."""
    secret = own_redis.url.split("://:", 1)[1].split("@", 1)[0]
    return replace(settings, redis_url=f"redis://:{secret}@127.0.0.1:{own_redis.port}/0")


@pytest_asyncio.fixture
async def own_client(on_own: Settings) -> AsyncIterator[Redis]:
    client = redis_client(on_own)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def evicting(own_client: Redis) -> AsyncIterator[Redis]:
    """The own server switched to an evicting policy, put back afterwards."""
    await own_client.config_set("maxmemory-policy", "allkeys-lru")
    yield own_client
    await own_client.config_set("maxmemory-policy", "noeviction")


async def test_a_noeviction_server_with_an_append_only_file_passes(own_client: Redis) -> None:
    found = await check_redis(own_client)
    assert (found.maxmemory_policy, found.append_only, found.persistent) == (
        "noeviction", True, True)


async def test_an_evicting_redis_is_refused_with_the_setting_and_the_fix(
    evicting: Redis,
) -> None:
    with pytest.raises(UnsafeRedisError) as refused:
        await check_redis(evicting)
    message = str(refused.value)
    assert "maxmemory-policy is 'allkeys-lru', must be 'noeviction'" in message
    assert "CONFIG SET maxmemory-policy noeviction" in message
    assert (refused.value.setting, refused.value.value) == ("maxmemory-policy", "allkeys-lru")


async def test_a_worker_refuses_to_serve_on_an_evicting_redis(
    evicting: Redis, on_own: Settings, clock: ManualClock,
) -> None:
    with pytest.raises(UnsafeRedisError, match="maxmemory-policy"):
        await serve(["quota", "select"], on_own, clock, install_signals=False)
    assert await evicting.exists(Keys(on_own.prefix).requests) == 0  # it touched nothing


def _cli(*args: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix)
    return subprocess.run([sys.executable, "-m", "stages.tools.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


@pytest.mark.parametrize("command", [["stats"], ["worker", "quota"], ["run", "quota"],
                                     ["audit"], ["rebuild"], ["up"],
                                     ["devices", "add", "--id", "x"]])
async def test_commands_refuse_an_evicting_redis_with_exit_78(
    evicting: Redis, on_own: Settings, command: list[str],
) -> None:
    done = await asyncio.to_thread(_cli, *command, settings=on_own)
    assert done.returncode == EX_CONFIG, done.stderr
    assert "maxmemory-policy is 'allkeys-lru', must be 'noeviction'" in done.stderr
    assert await evicting.exists(Keys(on_own.prefix).devices) == 0


def test_the_supervisor_does_not_restart_a_worker_that_refuses_its_configuration() -> None:
    script = ("import sys; from pipeline.runner import supervise; "
              "sys.exit(supervise([[sys.executable, '-c', 'import sys; sys.exit(78)'], "
              "[sys.executable, '-c', 'import time; time.sleep(60)']]))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=60, check=False)
    assert done.returncode == EX_CONFIG


async def test_a_redis_without_persistence_is_a_logged_warning(
    own_client: Redis, caplog: pytest.LogCaptureFixture,
) -> None:
    await own_client.config_set("appendonly", "no")
    try:
        with caplog.at_level(logging.WARNING, logger="devsched.durability"):
            found = await check_redis(own_client)
    finally:
        await own_client.config_set("appendonly", "yes")
        await wait_until(lambda: aof_written(own_client))  # put back whole before it stops
    assert not found.persistent
    assert "keeps nothing on disk (appendonly no, no save points)" in caplog.text


async def aof_written(client: Redis) -> bool:
    """The append-only file turned on again has been written (its first rewrite is done)."""
    info = await client.info("persistence")
    return bool(info["aof_enabled"]) and not info["aof_rewrite_in_progress"] and not info[
        "aof_rewrite_scheduled"]


async def test_the_pipeline_serves_through_a_password_protected_redis(
    on_own: Settings, clock: ManualClock, pg: asyncpg.Pool, own_client: Redis,
) -> None:
    """REDIS_URL with a password, end to end: every stage, the producer, the write-behind
    and the audit go through AUTH; the same URL without the password is refused."""
    keys = Keys(on_own.prefix)
    await mark_state(own_client, keys, by="test", now_ms=clock.now_ms())  # a fresh state
    await seed(own_client, keys, clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="alice")])
    stop = asyncio.Event()
    names = ["quota", "select", "persist", "bill", "notify", "timers"]
    task = asyncio.create_task(serve(names, on_own, clock, stop=stop, install_signals=False))
    try:
        async with Client(on_own, timeout_s=5) as client:
            got = await client.allocate("alice")
            assert isinstance(got, Allocated)
            clock.advance(5_000)
            done = await client.release(allocation_id=got.allocation_id)
            assert isinstance(done, Released) and done.duration_seconds == 5
        await wait_until(lambda: write_behind_drained(own_client, keys))
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert (await audit(own_client, keys, pg))["consistent"]
    async with pg.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM billing_ledger") == 1
    await delete_keys(own_client, on_own.prefix)

    anonymous = replace(on_own, redis_url=f"redis://127.0.0.1:{on_own.redis_url.rsplit(':', 1)[1]}")
    with pytest.raises(AuthenticationError):
        await serve(["quota"], anonymous, clock, install_signals=False)


async def test_tls_and_sslmode_urls_are_passed_through_untouched(settings: Settings) -> None:
    """rediss:// gives TLS connections (with hiredis packing) and keeps the password;
    DATABASE_URL's sslmode is asyncpg's to read (prefer/disable work on a server without
    TLS)."""
    tls = replace(settings, redis_url="rediss://:s3cret@redis.example:6380/2")
    for client in (redis_client(tls), blocking_reader(tls)):
        pool = client.connection_pool
        assert pool.connection_class is FastSSLConnection
        assert (pool.connection_kwargs["password"], pool.connection_kwargs["host"],
                pool.connection_kwargs["port"], pool.connection_kwargs["db"]) == (
            "s3cret", "redis.example", 6380, 2)
        await client.aclose()
    for mode in ("disable", "prefer"):
        sep = "&" if "?" in settings.database_url else "?"
        pool = await pg_pool(replace(settings, database_url=f"{settings.database_url}{sep}"
                                                            f"sslmode={mode}"))
        try:
            assert await pool.fetchval("SELECT 1") == 1
        finally:
            await pool.close()
