"""Embedded local servers: a redis-server and a PostgreSQL cluster under the data dir.

When REDIS_URL or DATABASE_URL is empty, devsched runs its own server for it,
kept under ``Settings.data_dir``; tests and benchmarks use the same launcher.
What the package guarantees (each module states its own part):

- A URL set in the settings is used as given; nothing is started for it (unless it
  is the recorded URL of this data dir's embedded server: that one is restarted
  when down).
- One set of servers per data dir, found, reused and stopped through
  ``servers.json`` under an exclusive lock (``registry``); a stale record (dead
  pid, or a pid reused by a stranger, told apart by working directory) is
  detected, its leftovers stopped, and a fresh server started.
- Servers listen on loopback only, run in their own session (a Ctrl-C in the
  terminal does not reach them) and outlive the process that started them until
  someone stops them; stopping is clean, waits for them and reaps them
  (``process``).
- Redis keeps the live state in an append-only file under ``<data_dir>/redis``
  (fsync every second by default, ``DEVSCHED_REDIS_FSYNC``) and asks for a password
  generated once and kept there (``redis_server``); PostgreSQL keeps its cluster in
  ``<data_dir>/pg/data`` with fsync on, and runs as ``nobody`` under root
  (``postgres``). Both outlive ``stop``. File locations: ``layout``.
- A server that does not come up in time raises ``EmbeddedServerError`` with the
  tail of its log.
"""

from __future__ import annotations

from pipeline.embedded.process import EmbeddedServerError
from pipeline.embedded.registry import (
    ServerUrls,
    ensure_servers,
    local_servers,
    running_servers,
    stop_servers,
)

__all__ = [
    "EmbeddedServerError",
    "ServerUrls",
    "ensure_servers",
    "local_servers",
    "running_servers",
    "stop_servers",
]
