"""Server processes: start in their own session, recognise, signal, wait for, reap.

What it promises:

- A recorded pid counts as our server only while it is alive (a zombie is not)
  and works in the server's own folder (``/proc/<pid>/cwd``); where /proc cannot
  tell the folder, its command line must name the server. A stranger that reused
  a recorded pid is therefore never signalled.
- ``spawn`` starts a server in its own session (a Ctrl-C in the terminal does not
  reach it, and it outlives this process), with its output appended to its log,
  optionally as another user; the ``Popen`` is kept, so stopping it later reaps
  it and leaves no zombie. Servers whose starter has exited are reaped by init.
- ``terminate`` escalates to SIGKILL when a process outlives its timeout and
  raises ``EmbeddedServerError`` if even that fails.
- Dropping privileges (``as_user``) keeps only the user's own group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger(__name__)

KILL_TIMEOUT_S = 5.0
"""How long a process may take to exit after SIGTERM/SIGQUIT, and again after SIGKILL."""
POLL_S = 0.02
"""Sleep between two looks at a process we wait for."""
START_ATTEMPTS = 3
"""Starts on a fresh free port before giving up (another process may take the port
between choosing it and the server binding it)."""


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


class ServerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A server this package started: its process, TCP port and the URL to reach it."""

    pid: int
    port: int
    url: str


# Popen objects of the servers this process started, so stopping reaps them.
_children: dict[int, subprocess.Popen[bytes]] = {}


def pid_alive(pid: int) -> bool:
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


def cmdline(pid: int) -> str | None:
    """The process's command line, or None where /proc cannot tell."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace")


def is_server(pid: int, workdir: Path, marker: str) -> bool:
    """True when pid is alive and is our server, not a stranger that reused the pid.

    Our servers work in their own folder (redis: --dir, postgres: its data dir),
    so the process's working directory identifies them; where /proc does not
    tell it, the command line must hold marker.
    """
    if not pid_alive(pid):
        return False
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(workdir)
    except OSError:
        pass
    line = cmdline(pid)
    return line is None or marker in line


def spawn(
    args: list[str], *, cwd: Path, log_path: Path, user: pwd.struct_passwd | None = None
) -> subprocess.Popen[bytes]:
    """Start args as a server: own session, output appended to log_path, as user if given."""
    with open(log_path, "ab") as out:
        if user is not None:
            os.chown(log_path, user.pw_uid, user.pw_gid)
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=cwd, start_new_session=True, **as_user(user),
        )
    _children[proc.pid] = proc
    return proc


def forget(proc: subprocess.Popen[bytes]) -> None:
    """Drop a child that has exited (and was reaped by its poll) from the kept ones."""
    _children.pop(proc.pid, None)


def reap_children() -> None:
    """Reap the servers this process started that have exited since."""
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            _children.pop(pid, None)


def wait_gone(pid: int, timeout: float) -> bool:
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
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def signal_and_wait(pid: int, sig: signal.Signals, timeout: float) -> bool:
    """Send sig and wait up to timeout for the process to exit; True when it did."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    return wait_gone(pid, timeout)


def terminate(pid: int, sig: signal.Signals, timeout: float) -> None:
    """Send sig and wait; SIGKILL if the process outlives timeout."""
    if signal_and_wait(pid, sig, timeout):
        return
    log.warning("process %d ignored %s for %.0f s; killing it", pid, sig.name, timeout)
    if not signal_and_wait(pid, signal.SIGKILL, KILL_TIMEOUT_S):
        raise EmbeddedServerError(f"process {pid} survived SIGKILL")


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_answers(port: int) -> bool:
    """True when something accepts a TCP connection on loopback at port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a server's log, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def read_pid(path: Path) -> int | None:
    """The pid written first in a pidfile, or None when there is none."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """subprocess keyword arguments that drop to user (and its group only)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def ensure_traversable(path: Path, user: pwd.struct_passwd) -> None:
    """Give others the search bit on path and its parents where user lacks it."""
    for folder in [path, *path.parents]:
        st = folder.stat()
        if st.st_uid == user.pw_uid or st.st_mode & stat.S_IXOTH:
            continue
        log.info("adding o+x to %s so %s can reach the data dir", folder, user.pw_name)
        folder.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
