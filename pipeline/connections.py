"""Redis and PostgreSQL connections, made one way everywhere.

Every Redis client uses hiredis (a dependency) to parse replies and to pack
commands (redis-py's asyncio connections pack in pure Python, a large share of
a small command's cost), the settings' socket timeout
(kept above the blocking read's BLOCK), and decodes nothing: stream payloads
stay bytes until a msgspec decoder reads them. Blocking readers get a client of
their own (one connection) so a read in progress never blocks other commands
and is never returned half-done to a shared pool.

``REDIS_URL`` names either one server (``redis://``, ``rediss://``, ``unix://``) or
a primary found through Sentinels::

    redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?sentinel_password=...]

(``password`` and ``user``: the data servers' ones, percent-encoded; ``db`` 0 when
left out; ``sentinel_password`` when the Sentinels themselves ask for one). Every
client made here for such a URL asks the Sentinels for the current primary each
time it connects, and drops a connection that finds a demoted primary (READONLY)
or a dead one: after a failover the next call connects to the promoted replica
by itself. Scripts are loaded again on NOSCRIPT (``pipeline.scripts``) and the
worker loop re-creates a consumer group Redis lost (NOGROUP), so nothing above
this module knows which server it talks to.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
import hiredis
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.settings import RuntimeSettings


class _HiredisPacking:
    """Packs each command with hiredis (C) instead of redis-py's Python packer, and
    writes it without a task per write: redis-py wraps every write in
    ``asyncio.wait_for``, which makes a task each time; here the bytes go to the
    transport directly, and only a write that finds the socket backed up waits for it
    to drain, under the socket timeout."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        writer = getattr(self, "_writer", None)
        if writer is None or not self.is_connected:  # type: ignore[attr-defined]
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        if check_health:
            await self.check_health()  # type: ignore[attr-defined]
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            writer.writelines(command)
            if writer.transport.get_write_buffer_size():
                await asyncio.wait_for(writer.drain(), self.socket_timeout)  # type: ignore[attr-defined]
        except TimeoutError:
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise RedisConnectionError(f"Error while writing to socket: {exc!r}") from exc

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


class FastSentinelConnection(_HiredisPacking, SentinelManagedConnection):
    pass


_FAST: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: FastConnection,
    UnixDomainSocketConnection: FastUnixConnection,
    SSLConnection: FastSSLConnection,
    SentinelManagedConnection: FastSentinelConnection,
}


def fast_packing(client: Redis) -> Redis:
    """Switch a client's pool, before its first connection, to hiredis packing."""
    pool = client.connection_pool
    pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
    return client


SENTINEL_SCHEME = "redis+sentinel"
"""The scheme of a REDIS_URL that names Sentinels instead of a server."""
SENTINEL_DEFAULT_PORT = 26379


@dataclass(frozen=True)
class SentinelUrl:
    """A ``redis+sentinel://`` URL, parsed (see the module docstring for its form)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """The Sentinels, service and credentials a ``redis+sentinel://`` URL names; None for
    any other URL. A malformed one raises ``ValueError`` saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":") if ":" in item else (item, "", "")
        host = host.strip("[]") or "127.0.0.1"
        try:
            sentinels.append((host, int(port) if sep else SENTINEL_DEFAULT_PORT))
        except ValueError:
            raise ValueError(f"REDIS_URL: bad Sentinel address {item!r}") from None
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("REDIS_URL: redis+sentinel:// needs /<service>[/<db>] after the "
                         "Sentinels")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ValueError(f"REDIS_URL: bad database number {path[1]!r}") from None
    query = parse_qs(parts.query)
    sentinel_password = query.get("sentinel_password", [None])[0]
    return SentinelUrl(sentinels=tuple(sentinels), service=unquote(path[0]), db=db,
                       username=username, password=password,
                       sentinel_password=sentinel_password)


class _SentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A pool of connections to the primary the Sentinels name (callers past
    ``max_connections`` wait, as with :class:`BlockingConnectionPool`); closing it closes
    its connections to the Sentinels too."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the pool is being closed (not a primary change)
            await self.sentinel_manager.aclose()


def _pool(url: str, *, socket_timeout: float, connect_timeout: float,
          max_connections: int, wait_s: float, health_check_s: int) -> ConnectionPool:
    """The one place a Redis connection pool is made, for a plain URL or a Sentinel one."""
    sentinel = parse_sentinel_url(url)
    if sentinel is None:
        return BlockingConnectionPool.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
            max_connections=max_connections, timeout=wait_s,
            health_check_interval=health_check_s)
    manager = Sentinel(  # type: ignore[no-untyped-call]
        list(sentinel.sentinels),
        sentinel_kwargs={"socket_timeout": connect_timeout,
                         "socket_connect_timeout": connect_timeout,
                         "password": sentinel.sentinel_password},
    )
    return _SentinelPool(  # type: ignore[no-untyped-call]
        sentinel.service, manager, connection_class=FastSentinelConnection,
        db=sentinel.db, username=sentinel.username, password=sentinel.password,
        socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
        max_connections=max_connections, timeout=wait_s,
        health_check_interval=health_check_s,
    )


def redis_client(settings: RuntimeSettings, *, max_connections: int = 32) -> Redis:
    """A pooled client; callers past ``max_connections`` wait for a free connection."""
    pool = _pool(settings.redis_url, socket_timeout=settings.socket_timeout_s,
                 connect_timeout=settings.socket_timeout_s, max_connections=max_connections,
                 wait_s=settings.socket_timeout_s, health_check_s=30)
    return fast_packing(Redis.from_pool(pool))


REDIS_DOWN: tuple[type[BaseException], ...] = (
    RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
"""What a call raises when Redis cannot be reached or does not answer in time (redis-py
raises its own ConnectionError and TimeoutError, not the builtins): loops that outlive
an outage catch these, wait a little and try again."""


def text(value: object) -> str:
    """A reply value as str. Our clients never decode (payloads stay bytes), but
    redis-py's types allow str (or int) too."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def command(client: Redis, *args: Any) -> Any:
    """``execute_command``, typed (redis-py leaves it untyped): for commands it has no
    method for, or whose raw reply we want."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def stream_items(reply: Any) -> list[tuple[Any, Any]]:
    """The (stream, entries) pairs of a raw XREAD/XREADGROUP reply: a map under RESP3,
    a list of pairs under RESP2, nil when nothing came. Each entry is
    ``[id, [field, value, ...]]``."""
    if isinstance(reply, dict):
        return list(reply.items())
    return list(reply or [])


class RawChannel:
    """One connection of a client's pool, held, for a hot loop (callers take turns).

    ``call`` packs a command, sends it and returns the raw reply (no response
    callbacks: a stream read comes back as nested lists, or a map under RESP3), with
    none of the per-command pool, retry and event machinery of ``execute_command``.
    An error reply raises (``NoScriptError`` and the like, as usual); a broken
    connection is dropped and the next call connects again. ``evalsha`` and
    ``script_load`` let a :class:`pipeline.scripts.Script` run on it.

    The socket timeout still holds, but not as a timer per call (a large share of a
    small command's cost): one watchdog timer, armed while a call is in flight,
    looks every ``WATCH_PERIOD_S``; a reply overdue by more than the connection's
    socket timeout breaks the connection, so the waiting call fails with
    ``TimeoutError`` and never hangs on a half-open socket.
    """

    WATCH_PERIOD_S = 0.5

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._conn: AbstractConnection | None = None
        self._turn = asyncio.Lock()  # one command and its reply at a time on the connection
        kwargs = client.connection_pool.connection_kwargs
        self._timeout_s = float(kwargs.get("socket_timeout") or 5.0)
        self._since = 0.0  # loop time the call in flight was sent; 0.0: none
        self._overdue = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()  # disconnects in progress (kept alive)

    async def call(self, *args: Any) -> Any:
        async with self._turn:
            if self._conn is None:
                pool = self._client.connection_pool
                self._conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            conn = self._conn
            loop = asyncio.get_running_loop()
            self._since, self._overdue = loop.time(), False
            if self._watchdog is None:
                self._watchdog = loop.call_later(self.WATCH_PERIOD_S, self._watch)
            try:
                await conn.send_packed_command(conn.pack_command(*args), check_health=False)
                return await conn.read_response(timeout=math.inf)
            except ResponseError:
                raise  # an error reply, read in full: the connection is fine
            except BaseException as exc:
                # broken, timed out or cancelled mid-reply: never reuse a connection that
                # may still have a reply in flight
                await self._give_back(disconnect=True)
                if self._overdue and not isinstance(exc, asyncio.CancelledError):
                    raise RedisTimeoutError(
                        f"no reply within {self._timeout_s:g} s; connection dropped") from exc
                raise
            finally:
                self._since = 0.0

    async def _give_back(self, *, disconnect: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if disconnect:
                await conn.disconnect(nowait=True)
            await self._client.connection_pool.release(conn)

    def _watch(self) -> None:
        self._watchdog = None
        if not self._since:
            return  # idle: the next call arms the watchdog again
        loop = asyncio.get_running_loop()
        if loop.time() - self._since > self._timeout_s and self._conn is not None:
            self._overdue = True
            # closing the socket wakes the waiting read with an error
            task = loop.create_task(self._conn.disconnect(nowait=True))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._watchdog = loop.call_later(self.WATCH_PERIOD_S, self._watch)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.call("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, source: str) -> Any:
        return await self.call("SCRIPT", "LOAD", source)

    async def execute_command(self, *args: Any) -> Any:
        """Any command, raw (FCALL and FUNCTION LOAD for a Script)."""
        return await self.call(*args)

    async def close(self) -> None:
        """Give the connection back to the pool."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        await self._give_back(disconnect=False)


def blocking_reader(settings: RuntimeSettings) -> Redis:
    """A single-connection client for XREADGROUP/XREAD BLOCK loops."""
    pool = _pool(settings.redis_url,
                 socket_timeout=settings.socket_timeout_s + settings.block_ms / 1000,
                 connect_timeout=settings.socket_timeout_s, max_connections=16,
                 wait_s=settings.socket_timeout_s, health_check_s=0)
    client = Redis(connection_pool=pool, single_connection_client=True)
    client.auto_close_connection_pool = True
    return fast_packing(client)


async def keep_session(conn: asyncpg.Connection) -> None:
    """A connection's way back to the pool: nothing past what asyncpg always does (a
    transaction left open is rolled back, listeners dropped)."""


async def pg_pool(settings: RuntimeSettings, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """A pool of PostgreSQL connections. A connection goes back to the pool without
    asyncpg's reset query (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL``), a round trip after every batch: nothing here leaves session state on a
    pooled connection (locks are transaction-scoped, no LISTEN, SET or held cursor; the
    migrations' session lock is on a connection of their own), and an open transaction
    is still rolled back (asyncpg does that before ``reset``)."""
    pool = await asyncpg.create_pool(settings.database_url, min_size=min_size, max_size=max_size,
                                     reset=keep_session)
    assert pool is not None
    return pool
