"""The registry of running embedded servers: ``servers.json`` under the data dir's lock.

What it promises:

- A URL set in the settings is used as given: nothing is started for it and the
  data dir is not written for it. Except the URL of an embedded server of this
  data dir, as ``servers.json`` records it (what `devsched env` exports): that
  names the embedded server, which is started again when it is down (a killed
  redis-server comes back with its data, and the same unix socket URL).
- One set of servers per data dir: ensuring and stopping hold an exclusive
  ``flock`` on ``<data_dir>/.lock``, so processes racing to start end up sharing
  one set of servers.
- ``servers.json`` holds one typed record per live server (pid, port, URL; for
  PostgreSQL also the bin/ it runs from). Any process of the same user can find and
  reuse them (the file is mode 600: the Redis URL carries its password).
  The file is replaced atomically (a temp file renamed over it) and removed
  when no server is recorded; a file that does not decode counts as empty.
- A record is trusted only while its pid is still our server (alive, working in
  the server's folder) and the server answers; otherwise it is stale, and its
  leftovers are stopped before a fresh start.
- ``ensure`` says which servers the call started, and a failed start stops what
  the same call had started. ``local_servers`` stops, on exit, exactly the
  servers its own call started, unless asked to keep them. Stopping twice is a
  no-op.
- ``running_servers`` starts nothing and reads the file without the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from pipeline.embedded import postgres, redis_server
from pipeline.embedded.layout import Layout
from pipeline.embedded.postgres import PostgresRecord
from pipeline.embedded.process import ServerRecord, reap_children
from pipeline.embedded.redis_server import RedisRecord
from pipeline.settings import RuntimeSettings

R = TypeVar("R", bound=ServerRecord)


@dataclass(frozen=True)
class ServerUrls:
    """Where the pipeline finds its Redis and its PostgreSQL."""

    redis_url: str
    database_url: str


class ServersFile(msgspec.Struct, frozen=True, omit_defaults=True):
    """The content of servers.json: the record of each live embedded server."""

    redis: RedisRecord | None = None
    postgres: PostgresRecord | None = None


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(ServersFile)


@dataclass(frozen=True)
class _Server(Generic[R]):
    """One kind of embedded server as the registry drives it."""

    name: str
    """Its field in servers.json (and in ServersFile)."""
    url_in: Callable[[RuntimeSettings], str]
    """The URL the settings give for it; empty means: run the embedded one."""
    recorded: Callable[[ServersFile], R | None]
    start: Callable[[Layout, RuntimeSettings], R]
    live: Callable[[Layout, R], bool]
    stop: Callable[[Layout, R | None], None]

    def with_record(self, state: ServersFile, record: R | None) -> ServersFile:
        return msgspec.structs.replace(state, **{self.name: record})


_REDIS: _Server[RedisRecord] = _Server(
    "redis", lambda s: s.redis_url, lambda f: f.redis,
    lambda layout, s: redis_server.start(layout, fsync=s.redis_fsync),
    redis_server.live, redis_server.stop,
)
_POSTGRES: _Server[PostgresRecord] = _Server(
    "postgres", lambda s: s.database_url, lambda f: f.postgres,
    lambda layout, s: postgres.start(layout), postgres.live, postgres.stop,
)
_SERVERS: tuple[_Server[Any], ...] = (_REDIS, _POSTGRES)


# ------------------------------------------------------------- file and lock


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_state(layout: Layout) -> ServersFile:
    """The records in servers.json; none when it is missing or does not decode."""
    try:
        return _DECODER.decode(layout.state.read_bytes())
    except (OSError, msgspec.DecodeError):  # ValidationError is a DecodeError
        return ServersFile()


def write_state(layout: Layout, state: ServersFile) -> None:
    """Replace servers.json atomically; remove it when no server is recorded."""
    if state == ServersFile():
        layout.state.unlink(missing_ok=True)
        return
    text = msgspec.json.format(_ENCODER.encode(state), indent=2) + b"\n"
    fd, tmp = tempfile.mkstemp(dir=layout.root, prefix=".servers.", suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)  # the Redis URL in it carries the password
    os.replace(tmp, layout.state)


# -------------------------------------------------------- ensure and stop


def _stop_one(layout: Layout, state: ServersFile, server: _Server[R]) -> ServersFile:
    server.stop(layout, server.recorded(state))
    state = server.with_record(state, None)
    write_state(layout, state)
    return state


def _urls(settings: RuntimeSettings) -> dict[str, str]:
    """The URL given for each server; empty for one to run embedded (none given, or the
    recorded URL of the embedded one, live or not)."""
    urls = {server.name: server.url_in(settings) for server in _SERVERS}
    if any(urls.values()):
        state = read_state(Layout.of(settings.data_dir))
        for server in _SERVERS:
            record = server.recorded(state)
            if record is not None and urls[server.name] == record.url:
                urls[server.name] = ""
    return urls


def _server_urls(urls: dict[str, str]) -> ServerUrls:
    return ServerUrls(urls[_REDIS.name], urls[_POSTGRES.name])


def _ensure(settings: RuntimeSettings) -> tuple[ServerUrls, set[str]]:
    """Like ensure_servers, but says which servers this call started."""
    urls = _urls(settings)
    wanted = [server for server in _SERVERS if not urls[server.name]]
    started: set[str] = set()
    if not wanted:
        return _server_urls(urls), started
    layout = Layout.of(settings.data_dir)
    reap_children()
    with _locked(layout):
        state = read_state(layout)
        try:
            for server in wanted:
                record = server.recorded(state)
                if record is None or not server.live(layout, record):
                    state = _stop_one(layout, state, server)
                    record = server.start(layout, settings)
                    state = server.with_record(state, record)
                    write_state(layout, state)
                    started.add(server.name)
                urls[server.name] = record.url
        except BaseException:
            for server in _SERVERS:
                if server.name in started:
                    state = _stop_one(layout, state, server)
            raise
    return _server_urls(urls), started


def _stop(settings: RuntimeSettings, names: set[str]) -> None:
    layout = Layout.of(settings.data_dir)
    if not layout.root.is_dir():
        return
    reap_children()
    with _locked(layout):
        state = read_state(layout)
        for server in _SERVERS:
            if server.name in names:
                state = _stop_one(layout, state, server)


# ---------------------------------------------------------------- public API


def ensure_servers(settings: RuntimeSettings) -> tuple[ServerUrls, bool]:
    """Return URLs of servers to use, and whether this call started anything.

    A URL set in the settings is used as is and nothing is started for it.
    Otherwise the embedded server running from settings.data_dir is reused when
    it is live and answers, or started fresh (stale leftovers are stopped
    first). The bool tells the caller whether it now owns servers to stop.
    """
    urls, started = _ensure(settings)
    return urls, bool(started)


def stop_servers(settings: RuntimeSettings) -> None:
    """Stop the embedded servers running from settings.data_dir; a no-op when none run.

    Redis gets SHUTDOWN SAVE (SIGTERM if it does not answer; its append-only file stays
    for the next start), PostgreSQL a fast shutdown; each is waited for and reaped.
    URLs in the settings play no part.
    """
    _stop(settings, {server.name for server in _SERVERS})


def running_servers(settings: RuntimeSettings) -> ServerUrls | None:
    """The URLs ensure_servers would return without starting anything, or None.

    Each URL is the one set in the settings, or else that of the live embedded
    server in settings.data_dir. None when a needed embedded server is not live.
    Reads servers.json without taking the lock.
    """
    layout = Layout.of(settings.data_dir)
    reap_children()
    state = read_state(layout)
    urls = _urls(settings)
    for server in _SERVERS:
        if urls[server.name]:
            continue
        record = server.recorded(state)
        if record is None or not server.live(layout, record):
            return None
        urls[server.name] = record.url
    return _server_urls(urls)


@contextlib.contextmanager
def local_servers(settings: RuntimeSettings, keep: bool = False) -> Iterator[ServerUrls]:
    """ensure_servers for a block; on exit stop what this call started, unless keep."""
    urls, started = _ensure(settings)
    try:
        yield urls
    finally:
        if started and not keep:
            _stop(settings, started)
