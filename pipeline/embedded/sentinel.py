"""A local failover topology: one primary, one replica and three Sentinels on loopback.

For tests and the demo of a failover (``devsched up --sentinel``), made from the same
redis-server binary as the embedded server (``redis-server --sentinel`` with a config
file per Sentinel). What it promises:

- Everything lives under one folder (``<data_dir>/sentinel`` for ``devsched up``), mode
  700: one sub-folder per server, with its config file (mode 600), append-only file,
  log and pidfile. ``topology.json`` (mode 600) records the pids, ports, the service
  name and the password; ``start`` reuses a recorded topology whose five servers all
  still run, and otherwise stops what is left of it and starts a fresh one.
- The data servers ask for a generated password (``requirepass``; the replica and the
  promoted primary authenticate with ``masterauth``); the Sentinels ask for the same
  password and use it with each other and with the servers. Nothing listens beyond
  127.0.0.1.
- The servers are durable as the embedded one (append-only file, ``appendfsync`` as
  given) and never evict (``maxmemory-policy noeviction``, the default).
- Sentinels judge the primary down after ``down_after_ms`` without an answer and agree
  with a quorum of 2; :attr:`Topology.url` is the ``redis+sentinel://`` URL naming them
  (see ``pipeline.connections``). ``start`` returns once the replica is in sync and
  every Sentinel knows the primary, the replica and the other Sentinels, so a failover
  can happen from then on.
- ``kill`` and ``restart`` are the fault tests' tools: SIGKILL one server; start a data
  server again as a replica of the primary the Sentinels name now.
- ``stop`` stops every recorded process (SIGTERM, then SIGKILL after a timeout) and
  removes the record; the data stays. Stopping what does not run does nothing.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from pathlib import Path

import msgspec
import redis

from pipeline.embedded.process import (
    KILL_TIMEOUT_S,
    POLL_S,
    EmbeddedServerError,
    free_port,
    is_server,
    log_tail,
    spawn,
    terminate,
)
from pipeline.embedded.redis_server import PASSWORD_BYTES, find_binary

log = logging.getLogger(__name__)

SERVICE = "devsched"
"""The name the Sentinels monitor the primary under (the URL's ``/service``)."""
QUORUM = 2
"""Sentinels that must agree the primary is down before a failover."""
SENTINELS = 3
DOWN_AFTER_MS = 5_000
"""Default time without an answer after which a Sentinel judges the primary down."""
FAILOVER_TIMEOUT_MS = 10_000
"""Default Sentinel failover-timeout (also how long before a failed failover is retried)."""
READY_TIMEOUT_S = 30.0
"""How long the topology may take to come up (replica in sync, Sentinels acquainted)."""


class Node(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    """primary, replica or sentinel<N> (its folder's name)."""
    pid: int
    port: int


class Topology(msgspec.Struct, frozen=True, kw_only=True):
    """A running topology as ``topology.json`` records it."""

    folder: str
    password: str
    service: str = SERVICE
    nodes: list[Node]

    def node(self, role: str) -> Node:
        return next(n for n in self.nodes if n.role == role)

    @property
    def sentinels(self) -> list[Node]:
        return [n for n in self.nodes if n.role.startswith("sentinel")]

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of this topology (with its password)."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.sentinels)
        return (f"redis+sentinel://:{self.password}@{hosts}/{self.service}/0"
                f"?sentinel_password={self.password}")

    def server_url(self, role: str) -> str:
        """The plain URL of one data server (``primary`` or ``replica`` as started)."""
        return f"redis://:{self.password}@127.0.0.1:{self.node(role).port}/0"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Topology)


def _record_path(folder: Path) -> Path:
    return folder / "topology.json"


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def recorded(folder: Path) -> Topology | None:
    """The recorded topology of ``folder``, None when there is none (or it does not
    decode)."""
    try:
        return _decoder.decode(_record_path(folder).read_bytes())
    except (FileNotFoundError, msgspec.DecodeError):
        return None


def _alive(folder: Path, node: Node) -> bool:
    return is_server(node.pid, folder / node.role, "redis-server")


def running(folder: Path) -> Topology | None:
    """The recorded topology when all of its servers still run, else None."""
    topo = recorded(folder)
    if topo is None or not all(_alive(folder, n) for n in topo.nodes):
        return None
    return topo


def live(folder: Path) -> Topology | None:
    """The recorded topology when at least one of its Sentinels still runs (its URL
    finds the primary, whichever data server that is now), else None."""
    topo = recorded(folder)
    if topo is None or not any(_alive(folder, n) for n in topo.sentinels):
        return None
    return topo


def _data_config(secret: str) -> str:
    return f"requirepass {secret}\nmasterauth {secret}\n"


def _sentinel_config(secret: str, port: int, primary_port: int, down_after_ms: int,
                     failover_timeout_ms: int, where: Path) -> str:
    return "\n".join([
        f"port {port}",
        "bind 127.0.0.1",
        "daemonize no",
        f"dir {where}",
        f"logfile {where / 'server.log'}",
        f"pidfile {where / 'server.pid'}",
        f"requirepass {secret}",
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} {QUORUM}",
        f"sentinel auth-pass {SERVICE} {secret}",
        f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
        f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}",
        f"sentinel parallel-syncs {SERVICE} 1",
        "",
    ])


def _data_args(binary: str, where: Path, port: int, fsync: str,
               replica_of: int | None) -> list[str]:
    args = [
        binary, str(where / "redis.conf"),
        "--bind", "127.0.0.1", "--port", str(port), "--daemonize", "no",
        "--save", "", "--appendonly", "yes", "--appendfsync", fsync,
        "--dir", str(where), "--pidfile", str(where / "server.pid"),
        "--logfile", str(where / "server.log"),
    ]
    if replica_of is not None:
        args += ["--replicaof", "127.0.0.1", str(replica_of)]
    return args


def _client(port: int, secret: str) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, password=secret, socket_timeout=1.0,
                       socket_connect_timeout=1.0)


def _in_sync(topo: Topology, role: str) -> bool:
    """The data server ``role`` is a replica whose link to its primary is up (its sync
    done); False while it does not answer."""
    try:
        client = _client(topo.node(role).port, topo.password)
        try:
            return bool(client.info("replication").get("master_link_status") == "up")
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def _ready(topo: Topology) -> bool:
    """Replica in sync with the primary, and every Sentinel knows both data servers and
    the other Sentinels."""
    if not _in_sync(topo, "replica"):
        return False
    try:
        for node in topo.sentinels:
            sentinel = _client(node.port, topo.password)
            try:
                state = sentinel.sentinel_master(topo.service)
                assert isinstance(state, dict)
            finally:
                sentinel.close()
            if int(state.get("num-slaves", 0)) < 1 or \
                    int(state.get("num-other-sentinels", 0)) < SENTINELS - 1:
                return False
        return True
    except (redis.RedisError, OSError):
        return False


def start(folder: Path, *, fsync: str = "everysec", down_after_ms: int = DOWN_AFTER_MS,
          failover_timeout_ms: int = FAILOVER_TIMEOUT_MS) -> Topology:
    """The running topology of ``folder``, started now when it does not run (see the
    module docstring); returns once a failover can happen."""
    live = running(folder)
    if live is not None:
        return live
    stop(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    secret = secrets.token_hex(PASSWORD_BYTES)
    binary = find_binary()
    nodes: list[Node] = []
    primary_port = free_port()
    try:
        for role, replica_of in (("primary", None), ("replica", primary_port)):
            where = folder / role
            where.mkdir(exist_ok=True)
            _write_private(where / "redis.conf", _data_config(secret))
            port = primary_port if role == "primary" else free_port()
            proc = spawn(_data_args(binary, where, port, fsync, replica_of), cwd=where,
                         log_path=where / "server.log")
            nodes.append(Node(role=role, pid=proc.pid, port=port))
        for n in range(1, SENTINELS + 1):
            where = folder / f"sentinel{n}"
            where.mkdir(exist_ok=True)
            port = free_port()
            _write_private(where / "sentinel.conf", _sentinel_config(
                secret, port, primary_port, down_after_ms, failover_timeout_ms, where))
            proc = spawn([binary, str(where / "sentinel.conf"), "--sentinel"], cwd=where,
                         log_path=where / "server.log")
            nodes.append(Node(role=f"sentinel{n}", pid=proc.pid, port=port))
        topo = Topology(folder=str(folder), password=secret, nodes=nodes)
        _write_private(_record_path(folder), _encoder.encode(topo).decode())
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(topo):
            if time.monotonic() > deadline:
                tails = "\n".join(f"{n.role}:\n{log_tail(folder / n.role / 'server.log')}"
                                  for n in nodes)
                raise EmbeddedServerError(
                    f"the Sentinel topology did not come up within {READY_TIMEOUT_S:.0f} s;"
                    f" log tails:\n{tails}")
            time.sleep(POLL_S * 5)
    except BaseException:
        for node in nodes:
            terminate(node.pid, signal.SIGTERM, KILL_TIMEOUT_S)
        _record_path(folder).unlink(missing_ok=True)
        raise
    log.info("started a Sentinel topology in %s (primary port %d)", folder, primary_port)
    return topo


def kill(topo: Topology, role: str) -> None:
    """SIGKILL one server of the topology (the fault tests' ``kill -9``) and wait for it
    to be gone."""
    terminate(topo.node(role).pid, signal.SIGKILL, KILL_TIMEOUT_S)


PROMOTABLE_PRIORITY = 100
"""Redis' default ``replica-priority``: what a restarted server gets once it is in sync."""


def restart(topo: Topology, role: str, *, fsync: str = "everysec",
            sync_timeout_s: float = READY_TIMEOUT_S) -> Topology:
    """Start the data server ``role`` again (after :func:`kill`, as a supervisor would),
    as a replica of the primary the Sentinels name now, on its former port; returns
    (and records) the topology with its new pid. It rejoins with a full resync: what
    the old primary had but never replicated is discarded, as Redis replication says.

    Until that sync is done the server still holds its own old data set (read back
    from its append-only file), and a Sentinel counts a replica whose link never came up
    as a candidate (``master_link_down_since_seconds`` is -1): a second failover in that
    window promoted it and took the live state back to before the first (seen in a
    failover test under load: writes answered after the first failover gone). So it
    starts with ``replica-priority 0``, which no Sentinel promotes, and
    :func:`make_promotable` gives it the default priority once it is in sync.
    Raises ``EmbeddedServerError`` when it is not in sync within ``sync_timeout_s`` (it
    keeps running, not promotable; call :func:`make_promotable` again)."""
    primary = current_primary_port(topo)
    if primary is None:
        raise EmbeddedServerError("no Sentinel names a primary: nothing to rejoin")
    node = topo.node(role)
    where = Path(topo.folder) / role
    args = _data_args(find_binary(), where, node.port, fsync, primary)
    proc = spawn([*args, "--replica-priority", "0"], cwd=where, log_path=where / "server.log")
    nodes = [Node(role=n.role, pid=proc.pid, port=n.port) if n.role == role else n
             for n in topo.nodes]
    topo = msgspec.structs.replace(topo, nodes=nodes)
    _write_private(_record_path(Path(topo.folder)), _encoder.encode(topo).decode())
    make_promotable(topo, role, sync_timeout_s)
    return topo


def make_promotable(topo: Topology, role: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until the replica ``role`` has the primary's data (its link up), then give it
    Redis' default ``replica-priority`` so a Sentinel may promote it;
    ``EmbeddedServerError`` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not _in_sync(topo, role):
        if time.monotonic() > deadline:
            raise EmbeddedServerError(
                f"the {role} server did not get in sync with its primary within "
                f"{timeout_s:g} s; it stays at replica-priority 0 (no Sentinel promotes it)")
        time.sleep(POLL_S * 5)
    client = _client(topo.node(role).port, topo.password)
    try:
        client.config_set("replica-priority", PROMOTABLE_PRIORITY)
    finally:
        client.close()


def current_primary_port(topo: Topology) -> int | None:
    """The primary's port as the first Sentinel that answers names it (None: none)."""
    for node in topo.sentinels:
        client = _client(node.port, topo.password)
        try:
            host_port = client.sentinel_get_master_addr_by_name(topo.service)
            if isinstance(host_port, tuple | list):
                return int(host_port[1])
        except (redis.RedisError, OSError, TypeError, IndexError):
            continue
        finally:
            client.close()
    return None


def stop(folder: Path) -> None:
    """Stop every server of the recorded topology of ``folder``; the data stays."""
    topo = recorded(folder)
    if topo is None:
        return
    for node in topo.nodes:
        if _alive(folder, node):
            terminate(node.pid, signal.SIGTERM, KILL_TIMEOUT_S)
    _record_path(folder).unlink(missing_ok=True)
