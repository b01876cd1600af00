"""Redis and PostgreSQL connections, made one way everywhere.

Every Redis client uses hiredis (a dependency) to parse replies and to pack
commands (redis-py's asyncio connections pack in pure Python, a large share of
a small command's cost), the settings' socket timeout
(kept above the blocking read's BLOCK), and decodes nothing: stream payloads
stay bytes until a msgspec decoder reads them. Blocking readers get a client of
their own (one connection) so a read in progress never blocks other commands
and is never returned half-done to a shared pool.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)

from pipeline.settings import Settings


class _HiredisPacking:
    """Packs each command with hiredis (C) instead of redis-py's Python packer."""

    def pack_command(self, *args: Any) -> list[bytes]:
        head = args[0]
        # a command name given with its subcommand ("XGROUP CREATE") is sent as two words
        if isinstance(head, str):
            if " " in head:
                args = (*head.split(), *args[1:])
        elif b" " in head:
            args = (*head.split(), *args[1:])
        return [hiredis.pack_command(args)]


class FastConnection(_HiredisPacking, Connection):
    pass


class FastUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


class FastSSLConnection(_HiredisPacking, SSLConnection):
    pass


_FAST: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: FastConnection,
    UnixDomainSocketConnection: FastUnixConnection,
    SSLConnection: FastSSLConnection,
}


def fast_packing(client: Redis) -> Redis:
    """Switch a client's pool, before its first connection, to hiredis packing."""
    pool = client.connection_pool
    pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
    return client


def redis_client(settings: Settings, *, max_connections: int = 32) -> Redis:
    """A pooled client; callers past ``max_connections`` wait for a free connection."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        max_connections=max_connections,
        timeout=settings.socket_timeout_s,
        health_check_interval=30,
    )
    return fast_packing(Redis.from_pool(pool))


def blocking_reader(settings: Settings) -> Redis:
    """A single-connection client for XREADGROUP/XREAD BLOCK loops."""
    return fast_packing(Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.socket_timeout_s + settings.block_ms / 1000,
        socket_connect_timeout=settings.socket_timeout_s,
        single_connection_client=True,
    ))


async def pg_pool(settings: Settings, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(settings.database_url, min_size=min_size, max_size=max_size)
    assert pool is not None
    return pool
