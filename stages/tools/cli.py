"""The `devsched` command: the runtime's commands and the scheduler's own.

The runtime gives the server and worker commands (up, down, env, migrate, worker,
run; see ``pipeline.commands``) for :data:`stages.app.APP`; this module adds the
scheduler's: demo, devices, quota, allocate, release, stats, audit, rebuild, schema.
Every command that touches Redis checks the server first (``pipeline.durability``):
one that may evict keys is refused with exit status 78 and a message saying how to
fix it.
Commands that other installed packages offer (the `devsched.commands` entry point
group, e.g. `bench` from the benchmarks) take the rest of the command line
themselves.

With REDIS_URL / DATABASE_URL unset, every command uses the embedded servers in
DEVSCHED_DATA_DIR: it reuses the running ones, or starts them and leaves them
running for the next command (`devsched down` stops them). `demo` and `run` stop
what they started when they exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from importlib.metadata import entry_points
from typing import Any

import msgspec

from pipeline.clock import SystemClock
from pipeline.commands import add_runtime_commands, refused, resolved_settings, run_coroutine
from pipeline.durability import UnsafeRedisError, check_redis, check_redis_of
from pipeline.embedded import stop_servers
from pipeline.logs import configure_logging
from stages.app import APP
from stages.settings import Settings
from stages.state import StateMissing, state_epoch

PLUGIN_GROUP = "devsched.commands"
"""Entry point group of commands other packages add (each: ``main(argv) -> int``)."""


def plugin_commands() -> dict[str, Callable[[], Callable[[list[str]], int]]]:
    """Name -> loader of each command installed packages add."""
    return {ep.name: ep.load for ep in entry_points(group=PLUGIN_GROUP)}


def cmd_demo(args: argparse.Namespace) -> int:
    from stages.tools.demo import DemoOptions, run_demo

    options = DemoOptions(seconds=args.seconds, devices=args.devices, users=args.users,
                          producers=args.producers, concurrency=args.concurrency,
                          reset=args.reset, workers=args.workers)
    settings, started = resolved_settings(APP)
    try:
        summary = run_demo(settings, options, external=not started and bool(Settings.from_env().redis_url))
    finally:
        if started and not args.keep_servers:
            stop_servers(settings)
    return 0 if summary.get("lost") == 0 and summary.get("consistent") else 1


def _with_redis(fn: Callable[[Any, Settings], Coroutine[Any, Any, int]]) -> int:
    from pipeline.connections import redis_client

    settings, _ = resolved_settings(APP)

    async def go() -> int:
        redis = redis_client(settings)
        try:
            await check_redis(redis)
            return await fn(redis, settings)
        except StateMissing as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            await redis.aclose()

    result: int = run_coroutine(go())
    return result


def cmd_devices_add(args: argparse.Namespace) -> int:
    from pipeline.connections import pg_pool
    from schemas.keys import Keys
    from schemas.messages import DeviceSpec
    from stages.tools.admin import add_devices, held_in_database

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
        keys = Keys(settings.prefix)
        if await state_epoch(redis, keys) is None:
            raise StateMissing(keys, "the change is refused")
        pg = await pg_pool(settings)
        try:
            lost = await held_in_database(redis, keys, pg, [s.id for s in specs])
        finally:
            await pg.close()
        if lost:
            print("error: PostgreSQL shows active allocations on devices that Redis does not: "
                  + ", ".join(f"{d} (allocation {a})" for d, a in sorted(lost.items()))
                  + "; adding them would make them free while a user holds them. Run "
                  "`devsched audit`; `devsched rebuild --force` (workers stopped) makes "
                  "Redis follow PostgreSQL", file=sys.stderr)
            return 1
        await add_devices(redis, keys, SystemClock(), specs)
        print(f"added {len(specs)} device(s): {specs[0].id}{' ...' if len(specs) > 1 else ''}")
        return 0

    return _with_redis(go)


def cmd_devices_list(args: argparse.Namespace) -> int:
    from schemas.keys import Keys
    from stages.tools.admin import list_devices

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
    from stages.tools.admin import set_quotas

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
    from stages.tools.client import Client

    settings, _ = resolved_settings(APP)

    async def go() -> int:
        await check_redis_of(settings)
        async with Client(settings, timeout_s=args.timeout) as client:
            reply = await client.allocate(
                args.user, tenant_id=args.tenant, duration_minutes=args.minutes,
                min_cpu_cores=args.cpu, min_memory_mb=args.memory, pool=args.pool,
                model=args.model, request_id=args.request_id,
            )
        print(msgspec.json.encode(reply).decode())
        return 0 if type(reply).__name__ == "Allocated" else 2

    result: int = run_coroutine(go())
    return result


def cmd_release(args: argparse.Namespace) -> int:
    from stages.tools.client import Client

    settings, _ = resolved_settings(APP)

    async def go() -> int:
        await check_redis_of(settings)
        async with Client(settings, timeout_s=args.timeout) as client:
            reply = await client.release(allocation_id=args.allocation, device_id=args.device,
                                         user_id=args.user, request_id=args.request_id)
        print(msgspec.json.encode(reply).decode())
        return 0 if type(reply).__name__ == "Released" else 2

    result: int = run_coroutine(go())
    return result


def cmd_stats(args: argparse.Namespace) -> int:
    from schemas.keys import Keys
    from stages.tools.admin import stats

    async def go(redis: Any, settings: Settings) -> int:
        print(json.dumps(asdict(await stats(redis, Keys(settings.prefix)))))
        return 0

    return _with_redis(go)


def cmd_audit(args: argparse.Namespace) -> int:
    from pipeline.connections import pg_pool, redis_client
    from schemas.keys import Keys
    from stages.tools.audit import audit

    settings, _ = resolved_settings(APP)

    async def go() -> int:
        redis = redis_client(settings)
        pg = await pg_pool(settings)
        try:
            await check_redis(redis)
            report = await audit(redis, Keys(settings.prefix), pg)
        finally:
            await pg.close()
            await redis.aclose()
        print(json.dumps(report, default=str))
        return 0 if report["consistent"] else 1

    result: int = run_coroutine(go())
    return result


def cmd_rebuild(args: argparse.Namespace) -> int:
    from pipeline.connections import pg_pool, redis_client
    from schemas.keys import Keys
    from stages.tools.rebuild import BacklogPending, StateNotEmpty, rebuild

    settings, _ = resolved_settings(APP)

    async def go() -> int:
        redis = redis_client(settings)
        pg = await pg_pool(settings)
        try:
            await check_redis(redis)
            report = await rebuild(redis, Keys(settings.prefix), pg, settings, SystemClock(),
                                   force=args.force,
                                   progress=lambda line: print(f"rebuild: {line}", flush=True))
        except (StateNotEmpty, BacklogPending) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            await pg.close()
            await redis.aclose()
        print(json.dumps(asdict(report)))
        return 0

    result: int = run_coroutine(go())
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

    add_runtime_commands(sub, APP)

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
    sub.add_parser("audit", help="compare the live state in Redis with PostgreSQL; JSON "
                                 "report, exit 1 on a difference").set_defaults(fn=cmd_audit)
    s = sub.add_parser("rebuild", help="load the live state from PostgreSQL into a Redis "
                                       "that lost it")
    s.add_argument("--force", action="store_true",
                   help="replace the live state Redis holds (the write-behind must have "
                        "caught up)")
    s.set_defaults(fn=cmd_rebuild)
    s = sub.add_parser("schema", help="print the JSON Schema of the public streams")
    s.add_argument("--out")
    s.set_defaults(fn=cmd_schema)
    for name in sorted(plugin_commands()):
        sub.add_parser(name, help=f"(from an installed package; `devsched {name} --help`)",
                       add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plugins = plugin_commands()
    if argv[:1] and argv[0] in plugins:  # such a command parses its own options
        return plugins[argv[0]]()(argv[1:])
    args = parser().parse_args(argv)
    configure_logging(level=logging.INFO if args.verbose else logging.WARNING,
                      fmt=Settings.from_env().log_format)
    try:
        code: int = args.fn(args)
    except KeyboardInterrupt:
        return 130
    except UnsafeRedisError as exc:
        return refused(exc)
    return code


if __name__ == "__main__":
    sys.exit(main())
