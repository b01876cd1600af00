"""The `devsched` command.

With REDIS_URL / DATABASE_URL unset, every command uses the embedded servers
in DEVSCHED_DATA_DIR: it reuses the running ones, or starts them and leaves
them running for the next command (`devsched down` stops them). `demo` and
`run` stop what they started when they exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Any

import msgspec

from pipeline.clock import SystemClock
from pipeline.embedded import ensure_servers, running_servers, stop_servers
from pipeline.logs import configure_logging
from pipeline.settings import Settings

STAGE_NAMES = ("quota", "select", "persist", "bill", "notify", "timers")
REQUEST_PATH = ("quota", "select")
BEHIND_NICE = 5
"""Niceness `devsched run` gives the processes of the stages behind the reply."""


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    if os.environ.get("DEVSCHED_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:  # pragma: no cover - platforms without uvloop
            pass
    return asyncio.run(coro)


def resolved_settings() -> tuple[Settings, bool]:
    """Settings with both URLs filled in; True when servers were started now."""
    settings = Settings.from_env()
    if settings.redis_url and settings.database_url:
        return settings, False
    urls, started = ensure_servers(settings)
    return settings.with_urls(urls.redis_url, urls.database_url), started


# --- commands -----------------------------------------------------------------


def cmd_env(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    urls = running_servers(settings)
    if urls is None and not args.start:
        print("# embedded servers are not running; `devsched up` starts them", file=sys.stderr)
        return 1
    if urls is None:
        settings, _ = resolved_settings()
        redis_url, database_url = settings.redis_url, settings.database_url
    else:
        redis_url, database_url = urls.redis_url, urls.database_url
    print(f"export REDIS_URL='{redis_url}'")
    print(f"export DATABASE_URL='{database_url}'")
    print(f"export DEVSCHED_PREFIX='{settings.prefix}'")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    settings, _ = resolved_settings()
    import sql
    from pipeline.migrate import migrate

    _run(migrate(settings.database_url, sql.migrations()))
    print(f"REDIS_URL={settings.redis_url}")
    print(f"DATABASE_URL={settings.database_url}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stop_servers(Settings.from_env())
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    import sql
    from pipeline.migrate import migrate

    settings, _ = resolved_settings()
    applied = _run(migrate(settings.database_url, sql.migrations()))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from stages.service import serve

    settings, _ = resolved_settings()
    if args.nice:
        os.nice(args.nice)
    _run(serve(args.stages, settings))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import sql
    from pipeline.migrate import migrate
    from pipeline.runner import child_env, supervise, worker_command
    from stages.service import serve

    settings, started = resolved_settings()
    try:
        _run(migrate(settings.database_url, sql.migrations()))
        stages = args.stages or list(STAGE_NAMES)
        if args.in_process:
            _run(serve(stages, settings))
            return 0
        os.environ.update(child_env(settings))
        if args.split:
            groups = [[s] for s in stages]
        else:
            # on a few cores fewer processes wait less for the CPU: the request path in
            # one process, the consumers behind the changes stream in another
            groups = [g for g in ([s for s in stages if s in REQUEST_PATH],
                                  [s for s in stages if s not in REQUEST_PATH]) if g]
        # the stages behind the reply yield the CPU to the request path when both want it
        commands = [worker_command(*g, nice=0 if set(g) & set(REQUEST_PATH) else BEHIND_NICE)
                    for g in groups for _ in range(args.workers)]
        return supervise(commands)
    finally:
        if started:
            stop_servers(settings)


def cmd_demo(args: argparse.Namespace) -> int:
    from stages.demo import DemoOptions, run_demo

    options = DemoOptions(seconds=args.seconds, devices=args.devices, users=args.users,
                          producers=args.producers, concurrency=args.concurrency,
                          reset=args.reset, workers=args.workers)
    settings, started = resolved_settings()
    try:
        summary = run_demo(settings, options, external=not started and bool(Settings.from_env().redis_url))
    finally:
        if started and not args.keep_servers:
            stop_servers(settings)
    return 0 if summary.get("lost") == 0 and summary.get("consistent") else 1


def _with_redis(fn: Callable[[Any, Settings], Coroutine[Any, Any, int]]) -> int:
    from pipeline.connections import redis_client

    settings, _ = resolved_settings()

    async def go() -> int:
        redis = redis_client(settings)
        try:
            return await fn(redis, settings)
        finally:
            await redis.aclose()

    result: int = _run(go())
    return result


def cmd_devices_add(args: argparse.Namespace) -> int:
    from schemas.keys import Keys
    from schemas.messages import DeviceSpec
    from stages.admin import add_devices

    specs = []
    for i in range(args.count):
        device_id = args.id if args.count == 1 and args.id else f"{args.id or 'dev'}-{i + 1:04d}"
        specs.append(DeviceSpec(
            id=device_id, name=device_id, pool=args.pool, model=args.model, host=args.host,
            adb_host=args.adb_host, adb_port=args.adb_port + (i if args.count > 1 else 0),
            cpu_cores=args.cpu, memory_mb=args.memory, storage_mb=args.storage,
        ))
    specs = [msgspec.convert(msgspec.to_builtins(s), DeviceSpec) for s in specs]

    async def go(redis: Any, settings: Settings) -> int:
        await add_devices(redis, Keys(settings.prefix), SystemClock(), specs)
        print(f"added {len(specs)} device(s): {specs[0].id}{' ...' if len(specs) > 1 else ''}")
        return 0

    return _with_redis(go)


def cmd_devices_list(args: argparse.Namespace) -> int:
    from schemas.keys import Keys
    from stages.admin import list_devices

    async def go(redis: Any, settings: Settings) -> int:
        rows = await list_devices(redis, Keys(settings.prefix), pool=args.pool,
                                  status=args.status, offset=args.offset, limit=args.limit)
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0

    return _with_redis(go)


def cmd_quota_set(args: argparse.Namespace) -> int:
    from schemas.keys import Keys
    from schemas.messages import QuotaSpec
    from stages.admin import set_quotas

    spec = msgspec.convert({
        "user_id": args.user, "status": args.status, "expires_at_ms": args.expires_at_ms,
        "max_devices": args.max_devices, "max_cpu_per_device": args.max_cpu_per_device,
        "max_memory_mb_per_device": args.max_memory_mb_per_device,
        "total_cpu_cores": args.total_cpu, "total_memory_gb": args.total_memory_gb,
        "total_storage_gb": args.total_storage_gb,
    }, QuotaSpec)

    async def go(redis: Any, settings: Settings) -> int:
        await set_quotas(redis, Keys(settings.prefix), SystemClock(), [spec])
        print(json.dumps(msgspec.to_builtins(spec)))
        return 0

    return _with_redis(go)


def cmd_allocate(args: argparse.Namespace) -> int:
    from stages.producer import Client

    settings, _ = resolved_settings()

    async def go() -> int:
        async with Client(settings, timeout_s=args.timeout) as client:
            reply = await client.allocate(
                args.user, tenant_id=args.tenant, duration_minutes=args.minutes,
                min_cpu_cores=args.cpu, min_memory_mb=args.memory, pool=args.pool,
                model=args.model, request_id=args.request_id,
            )
        print(msgspec.json.encode(reply).decode())
        return 0 if type(reply).__name__ == "Allocated" else 2

    result: int = _run(go())
    return result


def cmd_release(args: argparse.Namespace) -> int:
    from stages.producer import Client

    settings, _ = resolved_settings()

    async def go() -> int:
        async with Client(settings, timeout_s=args.timeout) as client:
            reply = await client.release(allocation_id=args.allocation, device_id=args.device,
                                         user_id=args.user, request_id=args.request_id)
        print(msgspec.json.encode(reply).decode())
        return 0 if type(reply).__name__ == "Released" else 2

    result: int = _run(go())
    return result


def cmd_stats(args: argparse.Namespace) -> int:
    from schemas.keys import Keys
    from stages.admin import stats

    async def go(redis: Any, settings: Settings) -> int:
        print(json.dumps(asdict(await stats(redis, Keys(settings.prefix)))))
        return 0

    return _with_redis(go)


def cmd_audit(args: argparse.Namespace) -> int:
    from pipeline.connections import pg_pool, redis_client
    from schemas.keys import Keys
    from stages.admin import audit

    settings, _ = resolved_settings()

    async def go() -> int:
        redis = redis_client(settings)
        pg = await pg_pool(settings)
        try:
            report = await audit(redis, Keys(settings.prefix), pg)
        finally:
            await pg.close()
            await redis.aclose()
        print(json.dumps(report))
        return 0 if report["consistent"] else 1

    result: int = _run(go())
    return result


def cmd_schema(args: argparse.Namespace) -> int:
    from schemas.jsonschema import public_schema

    text = json.dumps(public_schema(), indent=2, sort_keys=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.run import cli as bench_cli

    return bench_cli(args.rest)


# --- parser -------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="devsched", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="the whole pipeline with a demo load; prints a JSON summary")
    s.add_argument("--seconds", type=float, default=8.0)
    s.add_argument("--devices", type=int, default=60)
    s.add_argument("--users", type=int, default=40)
    s.add_argument("--producers", type=int, default=4)
    s.add_argument("--concurrency", type=int, default=8, help="sessions per producer")
    s.add_argument("--workers", type=int, default=1, help="processes per stage")
    s.add_argument("--reset", action="store_true", help="empty the tables (always on embedded)")
    s.add_argument("--keep-servers", action="store_true")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("worker", help="run one or more stages in this process (Procfile)")
    s.add_argument("stages", nargs="+", choices=STAGE_NAMES)
    s.add_argument("--nice", type=int, default=0,
                   help="lower this process's CPU priority by N (for stages off the request path)")
    s.set_defaults(fn=cmd_worker)

    s = sub.add_parser("run", help="run every stage, one process per worker, until SIGTERM")
    s.add_argument("--workers", type=int, default=1, help="processes per stage")
    s.add_argument("--in-process", action="store_true", help="all stages in one process")
    s.add_argument("--split", action="store_true",
                   help="one process per stage (default: request path and write-behind "
                        "in one process each)")
    s.add_argument("stages", nargs="*", help=f"subset of {', '.join(STAGE_NAMES)}")
    s.set_defaults(fn=cmd_run)

    sub.add_parser("migrate", help="apply SQL migrations").set_defaults(fn=cmd_migrate)
    s = sub.add_parser("env", help="print the URLs of the servers in use")
    s.add_argument("--start", action="store_true", help="start embedded servers if needed")
    s.set_defaults(fn=cmd_env)
    sub.add_parser("up", help="start embedded servers and leave them running").set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop embedded servers").set_defaults(fn=cmd_down)

    dev = sub.add_parser("devices", help="add or list devices").add_subparsers(dest="sub", required=True)
    s = dev.add_parser("add")
    s.add_argument("--id", default=None, help="device id (or id prefix with --count)")
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--cpu", type=int, default=2)
    s.add_argument("--memory", type=int, default=4096, help="MB")
    s.add_argument("--storage", type=int, default=32768, help="MB")
    s.add_argument("--pool", default="default")
    s.add_argument("--model", default="generic")
    s.add_argument("--host", default="node-1")
    s.add_argument("--adb-host", default="127.0.0.1")
    s.add_argument("--adb-port", type=int, default=5555)
    s.set_defaults(fn=cmd_devices_add)
    s = dev.add_parser("list")
    s.add_argument("--pool")
    s.add_argument("--status")
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(fn=cmd_devices_list)

    q = sub.add_parser("quota", help="set a user's quota").add_subparsers(dest="sub", required=True)
    s = q.add_parser("set")
    s.add_argument("user")
    s.add_argument("--status", default="active", choices=["active", "suspended", "expired", "overdue"])
    s.add_argument("--expires-at-ms", type=int, default=None)
    s.add_argument("--max-devices", type=int, default=10)
    s.add_argument("--max-cpu-per-device", type=int, default=16)
    s.add_argument("--max-memory-mb-per-device", type=int, default=65536)
    s.add_argument("--total-cpu", type=int, default=160)
    s.add_argument("--total-memory-gb", type=int, default=640)
    s.add_argument("--total-storage-gb", type=int, default=10240)
    s.set_defaults(fn=cmd_quota_set)

    s = sub.add_parser("allocate", help="ask for a device (needs running stages)")
    s.add_argument("user")
    s.add_argument("--tenant")
    s.add_argument("--minutes", type=int, default=60)
    s.add_argument("--cpu", type=int, default=0)
    s.add_argument("--memory", type=int, default=0)
    s.add_argument("--pool")
    s.add_argument("--model")
    s.add_argument("--request-id")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(fn=cmd_allocate)

    s = sub.add_parser("release", help="give a device back (needs running stages)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--allocation")
    g.add_argument("--device")
    s.add_argument("--user")
    s.add_argument("--request-id")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(fn=cmd_release)

    sub.add_parser("stats", help="allocation statistics").set_defaults(fn=cmd_stats)
    sub.add_parser("audit", help="compare Redis with PostgreSQL").set_defaults(fn=cmd_audit)
    s = sub.add_parser("schema", help="print the JSON Schema of the public streams")
    s.add_argument("--out")
    s.set_defaults(fn=cmd_schema)
    s = sub.add_parser("bench", help="benchmarks (see benchmarks/run.py --help)", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark runner parses its own options
        from benchmarks.run import cli as bench_cli

        return bench_cli(argv[1:])
    args = parser().parse_args(argv)
    configure_logging(level=logging.INFO if args.verbose else logging.WARNING,
                      fmt=os.environ.get("DEVSCHED_LOG_FORMAT") or "text")
    try:
        code: int = args.fn(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
