"""Where the embedded servers keep their files under one data dir.

A data dir holds one set of servers and nothing else:

- ``.lock``: the ``flock`` that every start and stop holds;
- ``servers.json``: the registry of the live servers (see ``registry``; mode 600, as
  the URLs in it carry the Redis password);
- ``redis/``: redis-server's working folder, mode 700: its socket, log and pidfile,
  its append-only file (kept across restarts: the live state), its password and the
  config file that hands the password over (both mode 600);
- ``pg/``: PostgreSQL's folder (its socket, log and ``port``, the port it listened on
  last, taken again at the next start), with the cluster in ``pg/data``.

Paths are absolute (the data dir is resolved once): a server process is told
apart from a stranger by its working directory, which /proc reports resolved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

UNIX_PATH_MAX = 100
"""Longest unix socket path used (the kernel's limit is 108 bytes); longer paths fall
back to TCP on loopback."""


def fits_unix_socket(path: Path) -> bool:
    """True when path is short enough to bind a unix socket at."""
    return len(str(path).encode()) < UNIX_PATH_MAX


@dataclass(frozen=True)
class Layout:
    """The files of the embedded servers under root, the resolved data dir."""

    root: Path

    @classmethod
    def of(cls, data_dir: Path | str) -> Layout:
        return cls(Path(data_dir).expanduser().resolve())

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
    def redis_password(self) -> Path:
        return self.redis_dir / "password"

    @property
    def redis_conf(self) -> Path:
        return self.redis_dir / "redis.conf"

    @property
    def pg_dir(self) -> Path:
        return self.root / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "postgres.log"

    @property
    def pg_port(self) -> Path:
        return self.pg_dir / "port"
