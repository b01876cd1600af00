"""The runtime's commands, for any application: up, down, env, migrate, worker, run.

An application's command line registers them with :func:`add_runtime_commands`
next to its own. With REDIS_URL / DATABASE_URL unset, every command uses the
embedded servers in the data dir: it reuses the running ones, or starts them and
leaves them running for the next command (`down` stops them, the embedded Redis
saving its data for the next `up`); `run` stops what it started when it exits. `up --sentinel` starts Redis as a primary,
a replica and three Sentinels instead (``pipeline.embedded.sentinel``, under
``<data_dir>/sentinel``) and prints the ``redis+sentinel://`` REDIS_URL that names them;
`env` prints that URL too while one of its Sentinels runs (and REDIS_URL is unset);
`down` stops that topology too.

`up`, `run` and `worker` check the Redis server first (``pipeline.durability``): one
that may evict keys is refused with a message that says how to fix it, and exit
status ``EX_CONFIG`` (78), which the supervisor does not restart. `up` and `run` then
hand the application its chance to bring the live state back (``Application.recover``,
e.g. from the database after Redis came back empty, or to mark a fresh one); one it
cannot bring back (``RecoveryError``) is printed, exit status 1.

Under `run` with a metrics port, this process serves the metrics of all its worker
processes, summed, on that one port (``pipeline.metrics``); the workers bind none.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pipeline import metrics
from pipeline.app import Application, RecoveryError, S
from pipeline.durability import EX_CONFIG, UnsafeRedisError, check_redis_of
from pipeline.embedded import ensure_servers, running_servers, stop_servers
from pipeline.embedded.sentinel import DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS
from pipeline.embedded.sentinel import live as live_topology
from pipeline.embedded.sentinel import start as start_topology
from pipeline.embedded.sentinel import stop as stop_topology
from pipeline.migrate import migrate
from pipeline.runner import child_env, supervise, worker_commands
from pipeline.service import freeze_startup_heap, serve
from pipeline.settings import RuntimeSettings


def run_coroutine(coro: Coroutine[Any, Any, Any], settings: RuntimeSettings | None = None) -> Any:
    """Run ``coro`` to its end on the configured event loop (uvloop unless told otherwise)."""
    loop = settings.event_loop if settings else os.environ.get("DEVSCHED_EVENT_LOOP", "uvloop")
    if loop == "uvloop":
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:  # pragma: no cover - platforms without uvloop
            pass
    return asyncio.run(coro)


def resolved_settings(app: Application[Any, S]) -> tuple[S, bool]:
    """The application's settings with both URLs filled in; True when servers were started now."""
    settings = app.settings()
    # also with both URLs set: one may be an embedded server's, as `env` exported it
    urls, started = ensure_servers(settings)
    return settings.with_urls(urls.redis_url, urls.database_url), started


async def migrate_database(app: Application[Any, Any], database_url: str) -> list[str]:
    """Apply the application's migrations; the names applied now (none without any)."""
    if app.migrations is None:
        return []
    return await migrate(database_url, app.migrations())


def add_runtime_commands(sub: Any, app: Application[Any, Any]) -> None:
    """Register the runtime's commands on ``sub`` (an argparse subparsers object)."""
    names = app.stage_names

    s = sub.add_parser("worker", help="serve one or more stages in this process (Procfile)")
    s.add_argument("stages", nargs="+", choices=names)
    s.add_argument("--nice", type=int, default=0,
                   help="lower this process's CPU priority by N (for stages off the request path)")
    s.set_defaults(fn=lambda args: cmd_worker(app, args))

    s = sub.add_parser("run", help="serve every stage, in worker processes, until SIGTERM")
    s.add_argument("--workers", type=int, default=1, help="processes per stage")
    s.add_argument("--in-process", action="store_true", help="all stages in one process")
    s.add_argument("--split", action="store_true",
                   help="one process per stage (default: the stages of one process group, "
                        "e.g. the request path, share a process)")
    s.add_argument("stages", nargs="*", help=f"subset of {', '.join(names)}")
    s.set_defaults(fn=lambda args: cmd_run(app, args))

    sub.add_parser("migrate", help="apply SQL migrations").set_defaults(
        fn=lambda args: cmd_migrate(app))
    s = sub.add_parser("env", help="print the URLs of the servers in use")
    s.add_argument("--start", action="store_true", help="start embedded servers if needed")
    s.set_defaults(fn=lambda args: cmd_env(app, start=args.start))
    s = sub.add_parser("up", help="start embedded servers, leave them running, migrate, and "
                                  "bring the live state back if Redis lost it")
    s.add_argument("--sentinel", action="store_true",
                   help="Redis as a primary, a replica and three Sentinels on loopback "
                        "(prints the redis+sentinel:// REDIS_URL to export)")
    s.add_argument("--down-after-ms", type=int, default=DOWN_AFTER_MS,
                   help="with --sentinel: a primary silent this long is judged down")
    s.add_argument("--failover-timeout-ms", type=int, default=FAILOVER_TIMEOUT_MS,
                   help="with --sentinel: the Sentinels' failover-timeout")
    s.set_defaults(fn=lambda args: cmd_up(
        app, sentinel=args.sentinel, down_after_ms=args.down_after_ms,
        failover_timeout_ms=args.failover_timeout_ms))
    sub.add_parser("down", help="stop embedded servers (Redis saves its data first)").set_defaults(
        fn=lambda args: cmd_down(app))


def cmd_env(app: Application[Any, Any], *, start: bool) -> int:
    settings = app.settings()
    if not settings.redis_url:
        topo = live_topology(sentinel_folder(settings))
        if topo is not None:  # `up --sentinel` runs: its URL, as `up` printed it
            os.environ["REDIS_URL"] = topo.url
            settings = app.settings()
    urls = running_servers(settings)
    if urls is None and not start:
        print("# embedded servers are not running; `up` starts them", file=sys.stderr)
        return 1
    if urls is None:
        settings, _ = resolved_settings(app)
        redis_url, database_url = settings.redis_url, settings.database_url
    else:
        redis_url, database_url = urls.redis_url, urls.database_url
    print(f"export REDIS_URL='{redis_url}'")
    print(f"export DATABASE_URL='{database_url}'")
    print(f"export DEVSCHED_PREFIX='{settings.prefix}'")
    return 0


def refused(exc: UnsafeRedisError) -> int:
    """Say why the Redis server is refused; the exit status for it."""
    print(f"error: {exc}", file=sys.stderr)
    return EX_CONFIG


def sentinel_folder(settings: RuntimeSettings) -> Path:
    """Where `up --sentinel` keeps its topology (``pipeline.embedded.sentinel``)."""
    return settings.data_dir / "sentinel"


def cmd_up(app: Application[Any, Any], *, sentinel: bool = False,
           down_after_ms: int = DOWN_AFTER_MS, failover_timeout_ms: int = FAILOVER_TIMEOUT_MS,
           ) -> int:
    if sentinel:
        base = app.settings()
        topo = start_topology(sentinel_folder(base), fsync=base.redis_fsync,
                              down_after_ms=down_after_ms,
                              failover_timeout_ms=failover_timeout_ms)
        os.environ["REDIS_URL"] = topo.url  # the application's settings read it
    settings, _ = resolved_settings(app)

    async def go() -> None:
        await check_redis_of(settings)
        await migrate_database(app, settings.database_url)
        if app.recover is not None:
            await app.recover(settings)

    try:
        run_coroutine(go(), settings)
    except UnsafeRedisError as exc:
        return refused(exc)
    except RecoveryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"REDIS_URL={settings.redis_url}")
    print(f"DATABASE_URL={settings.database_url}")
    return 0


def cmd_down(app: Application[Any, Any]) -> int:
    stop_servers(app.settings())
    stop_topology(sentinel_folder(app.settings()))
    return 0


def cmd_migrate(app: Application[Any, Any]) -> int:
    settings, _ = resolved_settings(app)
    applied = run_coroutine(migrate_database(app, settings.database_url), settings)
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def cmd_worker(app: Application[Any, Any], args: argparse.Namespace) -> int:
    settings, _ = resolved_settings(app)
    if args.nice:
        os.nice(args.nice)
    try:
        run_coroutine(serve(app, args.stages, settings, on_ready=freeze_startup_heap), settings)
    except UnsafeRedisError as exc:
        return refused(exc)
    return 0


def cmd_run(app: Application[Any, Any], args: argparse.Namespace) -> int:
    settings, started = resolved_settings(app)
    try:
        run_coroutine(check_redis_of(settings), settings)
        run_coroutine(migrate_database(app, settings.database_url), settings)
        if app.recover is not None:
            run_coroutine(app.recover(settings), settings)
        names = app.running_stages(args.stages or app.stage_names, settings)
        if args.in_process:
            run_coroutine(serve(app, names, settings, on_ready=freeze_startup_heap), settings)
            return 0
        os.environ.update(child_env(settings))
        exited = None
        if settings.metrics_port:
            # one port for every process: the children share a folder, this process serves it
            folder = metrics.multiprocess_dir(settings.data_dir)
            os.environ[metrics.MULTIPROC_ENV] = str(folder)
            metrics.serve_multiprocess(settings.metrics_port, folder)
            exited = functools.partial(metrics.process_exited, folder)
        return supervise(worker_commands(app, names, workers=args.workers, split=args.split),
                         exited=exited)
    except UnsafeRedisError as exc:
        return refused(exc)
    except RecoveryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if started:
            stop_servers(settings)
