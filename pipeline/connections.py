"""Redis and PostgreSQL connections, made one way everywhere.

Every Redis client uses hiredis when installed, the settings' socket timeout
(kept above the blocking read's BLOCK), and decodes nothing: stream payloads
stay bytes until a msgspec decoder reads them. Blocking readers get a client of
their own (one connection) so a read in progress never blocks other commands
and is never returned half-done to a shared pool.
"""

from __future__ import annotations

import asyncpg
from redis.asyncio import BlockingConnectionPool, Redis

from pipeline.settings import Settings


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
    return Redis.from_pool(pool)


def blocking_reader(settings: Settings) -> Redis:
    """A single-connection client for XREADGROUP/XREAD BLOCK loops."""
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.socket_timeout_s + settings.block_ms / 1000,
        socket_connect_timeout=settings.socket_timeout_s,
        single_connection_client=True,
    )


async def pg_pool(settings: Settings, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(settings.database_url, min_size=min_size, max_size=max_size)
    assert pool is not None
    return pool
