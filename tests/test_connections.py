"""The connection layer on real Redis: hiredis packing, and the RawChannel hot path.

RawChannel promises raw replies, an error reply that leaves the connection usable,
callers that take turns on the one connection, scripts that reload after a SCRIPT
FLUSH, and the socket timeout kept by its watchdog: a reply overdue past the timeout
fails the call with redis' TimeoutError and the next call connects again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import NamedTuple

import msgspec
import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.connections import (
    FastConnection,
    FastUnixConnection,
    RawChannel,
    pg_pool,
    redis_client,
)
from pipeline.scripts import Script
from stages.settings import Settings


class EchoKeys(NamedTuple):
    suffix: str


class EchoCall(msgspec.Struct):
    text: str


@pytest_asyncio.fixture
async def client(settings: Settings) -> AsyncIterator[Redis]:
    made = redis_client(replace(settings, socket_timeout_s=1.0))
    yield made
    await made.aclose()


async def test_clients_pack_with_hiredis_and_split_subcommands(
    client: Redis, settings: Settings
) -> None:
    assert client.connection_pool.connection_class in (FastConnection, FastUnixConnection)
    stream = f"{settings.prefix}:s"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)  # sent as "XGROUP CREATE"
    await client.xadd(stream, {b"d": b"\x00\xffbinary", "n": 7})
    got = await client.xreadgroup("g", "c", {stream: ">"}, count=1)
    fields = next(iter(got.values()))[0][0][1] if isinstance(got, dict) else got[0][1][0][1]
    assert fields == {b"d": b"\x00\xffbinary", b"n": b"7"}


async def test_raw_channel_returns_raw_replies_and_survives_an_error_reply(
    client: Redis, settings: Settings
) -> None:
    channel = RawChannel(client)
    key = f"{settings.prefix}:k"
    try:
        assert await channel.call("SET", key, "v") in (b"OK", "OK", True)
        with pytest.raises(ResponseError):
            await channel.call("INCR", key)  # not an integer: an error reply
        assert await channel.call("GET", key) == b"v"  # same channel, still in step
    finally:
        await channel.close()


async def test_raw_channel_callers_take_turns(client: Redis, settings: Settings) -> None:
    channel = RawChannel(client)
    key = f"{settings.prefix}:n"
    try:
        got = await asyncio.gather(*[channel.call("INCR", key) for _ in range(50)])
    finally:
        await channel.close()
    assert sorted(got) == list(range(1, 51))  # every caller read its own reply


async def test_raw_channel_times_out_an_overdue_reply_then_reconnects(
    client: Redis, settings: Settings
) -> None:
    channel = RawChannel(client)  # socket timeout 1 s
    try:
        with pytest.raises(RedisTimeoutError):
            # Redis would answer (nil) in 30 s: only the 1 s watchdog ends it sooner
            await channel.call("BLPOP", f"{settings.prefix}:never", 30)
        assert await channel.call("PING") in (b"PONG", "PONG", True)
    finally:
        await channel.close()


async def test_a_script_on_a_raw_channel_loads_itself_after_a_flush(client: Redis) -> None:
    script = Script("echo", EchoKeys, EchoCall, "return CALL.text .. KEY.suffix")
    channel = RawChannel(client)
    try:
        await channel.call("SCRIPT", "FLUSH")
        assert await script(channel, EchoKeys(suffix="!"), EchoCall(text="hi")) == b"hi!"
    finally:
        await channel.close()


async def test_a_pooled_postgresql_connection_comes_back_without_the_reset_round_trip(
    settings: Settings,
) -> None:
    pool = await pg_pool(settings, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.execute("SET application_name = 'kept'")
            # a transaction left open by hand, not by a context manager
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMP TABLE left_open (x int)")
        async with pool.acquire() as conn:
            # the same session: asyncpg's reset query (RESET ALL among others) did not run,
            # so the setting stays; the open transaction was rolled back all the same
            assert await conn.fetchval("SELECT pg_backend_pid()") == backend
            assert await conn.fetchval("SHOW application_name") == "kept"
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
    finally:
        await pool.close()
