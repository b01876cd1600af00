"""The `devsched` command: the runtime's commands and the scheduler's own.

The runtime gives the server and worker commands (up, down, env, migrate, worker,
run; see ``pipeline.commands``) for :data:`stages.app.APP`; this module adds the
scheduler's: demo, devices (add, list, import, export), allocations, pools, queue, quota
(set, import), allocate, release, renew, events, jobs, stats, strategy, audit, rebuild,
status (stages/tools/status.py), dead (stages/tools/dead.py), reserve, reservations
(stages/tools/reservations.py), tenants, schedules, trace and simulate
(stages/tools/simulate.py), schema.
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
from collections.abc import Awaitable, Callable, Coroutine
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


def _with_servers(fn: Callable[[Any, Any, Settings], Coroutine[Any, Any, int]],
                  pg: bool) -> int:
    """Run ``fn(redis, pg pool or None, settings)`` with the servers (trace, simulate)."""
    from pipeline.connections import pg_pool, redis_client

    settings, _ = resolved_settings(APP)

    async def go() -> int:
        redis = redis_client(settings)
        pool = await pg_pool(settings) if pg else None
        try:
            await check_redis(redis)
            return await fn(redis, pool, settings)
        finally:
            if pool is not None:
                await pool.close()
            await redis.aclose()

    result: int = run_coroutine(go())
    return result


def cmd_devices_add(args: argparse.Namespace) -> int:
    from schemas.messages import DeviceSpec

    specs = []
    for i in range(args.count):
        device_id = args.id if args.count == 1 and args.id else f"{args.id or 'dev'}-{i + 1:04d}"
        specs.append(DeviceSpec(
            id=device_id, name=device_id, pool=args.pool, model=args.model, host=args.host,
            adb_host=args.adb_host, adb_port=args.adb_port + (i if args.count > 1 else 0),
            cpu_cores=args.cpu, memory_mb=args.memory, storage_mb=args.storage,
        ))
    specs = [msgspec.convert(msgspec.to_builtins(s), DeviceSpec) for s in specs]
    return _apply_devices(specs, lambda: print(
        f"added {len(specs)} device(s): {specs[0].id}{' ...' if len(specs) > 1 else ''}"))


def _apply_devices(specs: list[Any], done: Callable[[], None]) -> int:
    """Add or update ``specs`` in one round trip, unless Redis has no live state or
    PostgreSQL shows one of them held by an allocation Redis lost (exit 1)."""
    from pipeline.connections import pg_pool
    from schemas.keys import Keys
    from stages.tools.admin import add_devices, held_in_database

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
        if specs:
            await add_devices(redis, keys, SystemClock(), specs)
        done()
        return 0

    return _with_redis(go)


def cmd_bulk(args: argparse.Namespace) -> int:
    """devsched devices import|export, quota import (stages.tools.bulk)."""
    from schemas.keys import Keys
    from schemas.messages import DeviceSpec, QuotaSpec
    from stages.tools.admin import set_quotas
    from stages.tools.bulk import (
        BadRecords,
        device_specs,
        format_of_name,
        read_file,
        write_records,
    )

    if args.sub == "export":
        fmt = args.format or format_of_name(args.file)
        exported: list[DeviceSpec] = []

        async def export(redis: Any, settings: Settings) -> int:
            exported.extend(await device_specs(redis, Keys(settings.prefix)))
            return 0

        code = _with_redis(export)
        if code:
            return code
        if args.file == "-":
            write_records(sys.stdout, exported, fmt)
        else:
            with open(args.file, "w", newline="") as out:
                write_records(out, exported, fmt)
            print(json.dumps({"exported": len(exported), "format": fmt, "file": args.file}))
        return 0
    try:
        if args.command == "devices":
            devices, fmt = read_file(args.file, DeviceSpec)
        else:
            quotas, fmt = read_file(args.file, QuotaSpec)
    except BadRecords as exc:
        print(f"error: nothing imported; bad records:\n{exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    def report(count: int) -> None:
        print(json.dumps({"imported": count, "format": fmt}))

    if args.command == "devices":
        return _apply_devices(devices, lambda: report(len(devices)))

    async def apply_quotas(redis: Any, settings: Settings) -> int:
        if quotas:
            await set_quotas(redis, Keys(settings.prefix), SystemClock(), quotas)
        report(len(quotas))
        return 0

    return _with_redis(apply_quotas)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as an aligned text table: numbers right-aligned, None as "-"."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2%}" if value <= 1 else f"{value:g}"
        return str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(isinstance(row[c], int | float) and not isinstance(row[c], bool)
                                  for row in rows) for c in columns]
    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    print(line([c.upper() for c in columns]))
    for r in cells:
        print(line(r))


def _print_page(kind: str, rows: list[Any], next_cursor: str | None, columns: list[str],
                as_json: bool, **extra: Any) -> None:
    listed = [asdict(r) for r in rows]
    if as_json:
        print(json.dumps({kind: listed, "next_cursor": next_cursor, **extra}))
        return
    print_table(listed, columns)
    if next_cursor is not None:
        print(f"(more: --cursor {next_cursor})")


def cmd_devices_list(args: argparse.Namespace) -> int:
    from schemas.keys import Keys
    from stages.tools.admin import list_devices

    async def go(redis: Any, settings: Settings) -> int:
        page = await list_devices(redis, Keys(settings.prefix), pool=args.pool,
                                  status=args.status, model=args.model, min_cpu=args.min_cpu,
                                  min_memory=args.min_memory, cursor=args.cursor,
                                  limit=args.limit)
        _print_page("devices", page.devices, page.next_cursor,
                    ["id", "pool", "model", "host", "status", "cpu_cores", "memory_mb",
                     "storage_mb", "adb_host", "adb_port", "allocation_id"], args.json)
        return 0

    return _with_redis(go)


def cmd_allocations_list(args: argparse.Namespace) -> int:
    from pipeline.connections import pg_pool, redis_client
    from schemas.keys import Keys
    from stages.tools.admin import ACTIVE, list_allocations

    settings, _ = resolved_settings(APP)

    async def go() -> int:
        redis = redis_client(settings)
        pg = await pg_pool(settings) if args.status != ACTIVE else None
        try:
            await check_redis(redis)
            page = await list_allocations(redis, Keys(settings.prefix), pg, user=args.user,
                                          status=args.status, cursor=args.cursor,
                                          limit=args.limit)
        finally:
            if pg is not None:
                await pg.close()
            await redis.aclose()
        _print_page("allocations", page.allocations, page.next_cursor,
                    ["allocation_id", "user_id", "device_id", "pool", "status",
                     "allocated_at_ms", "expires_at_ms", "released_at_ms", "duration_seconds",
                     "cpu_cores", "memory_mb", "end_reason"], args.json, source=page.source)
        if not args.json:
            print(f"(from {page.source})")
        return 0

    result: int = run_coroutine(go())
    return result


def cmd_pools(args: argparse.Namespace) -> int:
    from schemas.keys import Keys
    from stages.tools.admin import pools

    async def go(redis: Any, settings: Settings) -> int:
        rows = [asdict(p) for p in await pools(redis, Keys(settings.prefix))]
        if args.json:
            print(json.dumps({"pools": rows}))
        else:
            print_table(rows, ["pool", "devices", "free", "allocated", "maintenance", "down",
                               "share_used", "strategy"])
        return 0

    return _with_redis(go)


def cmd_queue(args: argparse.Namespace) -> int:
    from pipeline.clock import SystemClock
    from schemas.keys import Keys
    from stages.tools.admin import queue

    async def go(redis: Any, settings: Settings) -> int:
        rows = [asdict(w) for w in await queue(redis, Keys(settings.prefix), SystemClock(),
                                                pool=args.pool)]
        if args.json:
            print(json.dumps({"waiters": rows}))
        else:
            print_table(rows, ["position", "request_id", "user_id", "pool", "model",
                               "min_cpu_cores", "min_memory_mb", "priority", "waited_ms",
                               "wait_until_ms"])
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


def _ask(args: argparse.Namespace, call: Callable[[Any], Awaitable[Any]],
         ok: Callable[[Any], bool]) -> int:
    """Send one request through a producer client (``call(client)``), print its typed
    reply as JSON; exit 0 when ``ok(reply)``, else 2."""
    from stages.tools.client import Client

    settings, _ = resolved_settings(APP)

    async def go() -> int:
        await check_redis_of(settings)
        async with Client(settings, timeout_s=args.timeout) as client:
            reply = await call(client)
        print(msgspec.json.encode(reply).decode())
        return 0 if ok(reply) else 2

    result: int = run_coroutine(go())
    return result


def cmd_allocate(args: argparse.Namespace) -> int:
    if args.count > 1:
        return _ask(args, lambda client: client.allocate_many(
            args.user, args.count, best_effort=args.best_effort, tenant_id=args.tenant,
            duration_minutes=args.minutes, min_cpu_cores=args.cpu, min_memory_mb=args.memory,
            pool=args.pool, model=args.model, request_id=args.request_id),
            lambda batch: bool(getattr(batch, "success_count", 0)))
    return _ask(args, lambda client: client.allocate(
        args.user, tenant_id=args.tenant, duration_minutes=args.minutes,
        min_cpu_cores=args.cpu, min_memory_mb=args.memory, pool=args.pool, model=args.model,
        request_id=args.request_id, replace_on_failure=args.replace_on_failure,
        wait_seconds=args.wait_seconds, priority=args.priority),
        lambda reply: type(reply).__name__ == "Allocated")


def cmd_release(args: argparse.Namespace) -> int:
    if args.allocations:
        return _ask(args, lambda client: client.release_many(
            [i for i in args.allocations.split(",") if i], user_id=args.user,
            request_id=args.request_id),
            lambda batch: getattr(batch, "failed_count", 1) == 0)
    return _ask(args, lambda client: client.release(
        allocation_id=args.allocation, device_id=args.device, user_id=args.user,
        request_id=args.request_id), lambda reply: type(reply).__name__ == "Released")


def cmd_renew(args: argparse.Namespace) -> int:
    return _ask(args, lambda client: client.renew(
        args.allocation, args.user, extend_minutes=args.minutes, extend_seconds=args.seconds,
        request_id=args.request_id), lambda reply: type(reply).__name__ == "Renewed")


def cmd_stats(args: argparse.Namespace) -> int:
    from schemas.keys import Keys
    from stages.tools.admin import stats

    async def go(redis: Any, settings: Settings) -> int:
        print(json.dumps(asdict(await stats(redis, Keys(settings.prefix)))))
        return 0

    return _with_redis(go)


def cmd_strategy(args: argparse.Namespace) -> int:
    """``devsched strategy``: the strategy in force, globally and per pool;
    ``devsched strategy set NAME [--pool P]`` puts one in force."""
    from schemas.keys import Keys
    from stages.tools.admin import UnknownStrategy, set_strategy, strategies

    async def go(redis: Any, settings: Settings) -> int:
        keys = Keys(settings.prefix)
        if getattr(args, "sub", None) == "set":
            try:
                await set_strategy(redis, keys, args.name, args.pool)
            except UnknownStrategy as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        in_force = await strategies(redis, keys)
        if args.json:
            print(json.dumps(asdict(in_force)))
            return 0
        print(f"global: {in_force.strategy}")
        for pool, name in in_force.pools.items():
            own = "" if pool in in_force.pool_overrides else " (global)"
            print(f"pool {pool}: {name}{own}")
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
    if args.reconcile:  # after a failover: repair what Redis lacks (stages/tools/reconcile.py)
        from stages.tools.reconcile import run_reconcile
        return int(run_coroutine(run_reconcile(settings, SystemClock())))

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


def cmd_events_send(args: argparse.Namespace) -> int:
    """Publish one event on ``<prefix>:events``, validated first. ``event_id`` (a new
    uuid) and ``occurred_at_ms`` (now) are filled in when the JSON leaves them out."""
    import uuid

    import orjson

    from schemas.events import event_decoder
    from schemas.keys import Keys

    try:
        fields = orjson.loads(args.json)
    except orjson.JSONDecodeError as exc:
        print(f"invalid event: --json is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(fields, dict):
        print("invalid event: --json must be a JSON object", file=sys.stderr)
        return 2
    if fields.setdefault("type", args.type) != args.type:
        print(f"invalid event: type {fields['type']!r} in --json, {args.type!r} given",
              file=sys.stderr)
        return 2
    fields.setdefault("event_id", uuid.uuid4().hex)
    fields.setdefault("occurred_at_ms", SystemClock().now_ms())
    payload = orjson.dumps(fields)
    try:
        event_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        print(f"invalid event: {exc}", file=sys.stderr)
        return 2

    async def go(redis: Any, settings: Settings) -> int:
        entry_id = await redis.xadd(Keys(settings.prefix).events, {"d": payload})
        print(json.dumps({"entry_id": entry_id.decode() if isinstance(entry_id, bytes)
                          else entry_id, "event": fields}))
        return 0

    return _with_redis(go)


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as a readable table: a header, then one line per row, columns aligned."""
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


JOB_COLUMNS = ["name", "enabled", "interval_s", "status", "last_status", "last_run",
               "next_run", "retries", "max_retries", "timeout_s"]
HISTORY_COLUMNS = ["started_at", "status", "duration_ms", "processed_count", "attempt",
                   "manual", "error"]
RUN_COLUMNS = ["operation", "executed_at", "status", "processed_count", "error",
               "execution_time_ms"]


def cmd_jobs(args: argparse.Namespace) -> int:
    """devsched jobs list|show|history|run|pause|resume|set-interval."""
    from pipeline.connections import pg_pool, redis_client
    from stages.tools.jobs import UnknownJob, control, history, job_state, list_jobs, run_job

    settings, _ = resolved_settings(APP)

    async def go() -> int:
        redis = redis_client(settings)
        pg = None
        try:
            await check_redis(redis)
            if args.sub in ("history", "pause", "resume", "set-interval"):
                pg = await pg_pool(settings)
            shown: Any
            if args.sub == "list":
                shown, columns = await list_jobs(redis, settings), JOB_COLUMNS
            elif args.sub == "show":
                shown, columns = await job_state(redis, settings, args.name), None
            elif args.sub == "history":
                assert pg is not None
                shown = await history(pg, args.name, args.page)
                columns = HISTORY_COLUMNS
            elif args.sub == "run":
                result = await run_job(redis, settings, args.name, timeout_s=args.timeout)
                if result is None:
                    print(f"error: no answer within {args.timeout} s (is the timers stage "
                          "running?)", file=sys.stderr)
                    return 1
                shown = {c: getattr(result, c) for c in RUN_COLUMNS}
                columns = None
            else:
                action = {"pause": "pause", "resume": "resume",
                          "set-interval": "set_interval"}[args.sub]
                shown = await control(redis, pg, settings, SystemClock(), args.name, action,
                                      getattr(args, "seconds", None))
                columns = None
        except UnknownJob as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            if pg is not None:
                await pg.close()
            await redis.aclose()
        if args.json:
            print(json.dumps(shown))
        elif columns is not None:
            _print_table(shown, columns)
        else:
            width = max(len(k) for k in shown)
            for key, value in shown.items():
                print(f"{key.ljust(width)}  {'-' if value is None else value}")
        if args.sub == "run":
            return 0 if shown["status"] == "succeeded" else 1
        return 0

    result: int = run_coroutine(go())
    return result


def cmd_status(args: argparse.Namespace) -> int:
    from stages.tools.status import run

    return _with_redis(lambda redis, settings: run(
        redis, settings, SystemClock(), as_json=args.json, watch=args.watch,
        interval_s=args.interval))


def cmd_dead(args: argparse.Namespace) -> int:
    from stages.tools.dead import run

    return _with_redis(lambda redis, settings: run(args, redis, settings))


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

    dev = sub.add_parser("devices", help="add, list, import or export devices").add_subparsers(dest="sub", required=True)
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
    s = dev.add_parser("import", help="add or update the devices of a CSV or JSON-lines file, "
                                      "all or none (a bad line is named, nothing changes)")
    s.add_argument("file", help="a .csv or .jsonl file (by extension, else by content); - "
                                "for standard input")
    s.set_defaults(fn=cmd_bulk)
    s = dev.add_parser("export", help="every device, in the format `devices import` reads")
    s.add_argument("file", nargs="?", default="-", help="where to (default: standard output)")
    s.add_argument("--format", choices=["csv", "jsonl"],
                   help="default: by the file's extension, else jsonl")
    s.set_defaults(fn=cmd_bulk)
    s = dev.add_parser("list", help="one page of devices in id order, filtered; a table, "
                                    "or JSON with --json")
    s.add_argument("--pool")
    s.add_argument("--status", help="available, allocated, maintenance, failed, stopped, error")
    s.add_argument("--model")
    s.add_argument("--min-cpu", type=int, default=0)
    s.add_argument("--min-memory", type=int, default=0, help="MB")
    s.add_argument("--cursor", help="the next_cursor of the previous page")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_devices_list)

    al = sub.add_parser("allocations", help="list allocations").add_subparsers(
        dest="sub", required=True)
    s = al.add_parser("list", help="one page of allocations: active ones from Redis, the "
                                   "history from PostgreSQL")
    s.add_argument("--user")
    s.add_argument("--status", default="allocated",
                   choices=["allocated", "released", "expired", "all"],
                   help="allocated (default): the active ones, from Redis; released, expired "
                        "or all: from PostgreSQL, newest first")
    s.add_argument("--cursor", help="the next_cursor of the previous page")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_allocations_list)

    s = sub.add_parser("pools", help="utilisation per pool: devices, free, allocated, in "
                                     "maintenance, down, share used, strategy")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_pools)

    s = sub.add_parser("queue", help="the allocate requests waiting for a device, in serving "
                                     "order: position, priority, waited time; a table, or "
                                     "JSON with --json")
    s.add_argument("--pool", help="only the requests asking for this pool")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_queue)

    q = sub.add_parser("quota", help="set a user's quota, or import many").add_subparsers(dest="sub", required=True)
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
    s = q.add_parser("import", help="set the quotas of a CSV or JSON-lines file, all or "
                                    "none (a bad line is named, nothing changes)")
    s.add_argument("file", help="a .csv or .jsonl file (by extension, else by content); - "
                                "for standard input")
    s.set_defaults(fn=cmd_bulk)

    s = sub.add_parser("allocate", help="ask for a device (needs running stages)")
    s.add_argument("user")
    s.add_argument("--tenant")
    s.add_argument("--minutes", type=int, default=60)
    s.add_argument("--cpu", type=int, default=0)
    s.add_argument("--memory", type=int, default=0)
    s.add_argument("--pool")
    s.add_argument("--model")
    s.add_argument("--count", type=int, default=1,
                   help="devices in one request (2..100: an allocated_batch reply)")
    s.add_argument("--best-effort", action="store_true",
                   help="with --count: take what fits (default: all or nothing)")
    s.add_argument("--request-id")
    s.add_argument("--replace-on-failure", action="store_true",
                   help="move the allocation to an equivalent free device when its device "
                        "fails, is deleted, goes to maintenance or stops")
    s.add_argument("--wait-seconds", type=int,
                   help="with no fitting device free, wait up to this long in the queue "
                        "(1..3600; a queued notice, then the final reply)")
    s.add_argument("--priority", type=int, default=0, help="0..9, higher served first")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(fn=cmd_allocate)

    s = sub.add_parser("release", help="give a device back (needs running stages)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--allocation")
    g.add_argument("--device")
    g.add_argument("--allocations", help="several allocation ids, comma separated (a "
                                         "released_batch reply)")
    s.add_argument("--user")
    s.add_argument("--request-id")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(fn=cmd_release)

    s = sub.add_parser("renew", help="extend an active allocation (needs running stages)")
    s.add_argument("allocation")
    s.add_argument("--user", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--minutes", type=int)
    g.add_argument("--seconds", type=int)
    s.add_argument("--request-id")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(fn=cmd_renew)

    from schemas.events import EVENT_TYPES

    ev = sub.add_parser("events", help="send an event from another system").add_subparsers(
        dest="sub", required=True)
    s = ev.add_parser("send", help="validate one event and add it to <prefix>:events")
    s.add_argument("type", choices=EVENT_TYPES)
    s.add_argument("--json", default="{}",
                   help="the event's fields, a JSON object (docs/wire-format.md); event_id "
                        "and occurred_at_ms are filled in when left out")
    s.set_defaults(fn=cmd_events_send)

    sub.add_parser("stats", help="allocation statistics").set_defaults(fn=cmd_stats)

    from stages.tools.admin import STRATEGIES

    st = sub.add_parser("strategy", help="show the allocation strategy in force (global and "
                                         "per pool), or set one")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_strategy)
    st_sub = st.add_subparsers(dest="sub", required=False)
    s = st_sub.add_parser("set", help="put a strategy in force (the select workers use it "
                                      "from their next batch)")
    s.add_argument("name", choices=STRATEGIES)
    s.add_argument("--pool", help="only for requests that name this pool")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_strategy)
    sub.add_parser("audit", help="compare the live state in Redis with PostgreSQL; JSON "
                                 "report, exit 1 on a difference").set_defaults(fn=cmd_audit)
    s = sub.add_parser("rebuild", help="load the live state from PostgreSQL into a Redis "
                                       "that lost it")
    s.add_argument("--force", action="store_true",
                   help="replace the live state Redis holds (the write-behind must have "
                        "caught up)")
    s.add_argument("--reconcile", action="store_true",
                   help="after a failover: repair from PostgreSQL what the promoted replica "
                        "lacks (closes allocations lost with the old primary whose device was "
                        "given again, then rebuilds); the write-behind must have caught up")
    s.set_defaults(fn=cmd_rebuild)
    jobs = sub.add_parser("jobs", help="the tracked timer jobs: list, inspect, run, pause, "
                                       "resume, set the interval").add_subparsers(
        dest="sub", required=True)
    job_commands: list[tuple[str, str]] = [
        ("list", "every job with its state and next run"),
        ("show", "one job"),
        ("history", "a job's runs, newest first"),
        ("run", "run a job now (through the timers stage); prints its answer"),
        ("pause", "stop running a job on schedule"),
        ("resume", "run a paused job on schedule again"),
        ("set-interval", "change a job's interval (workers follow at their next tick)"),
    ]
    for name, what in job_commands:
        s = jobs.add_parser(name, help=what)
        if name != "list":
            s.add_argument("name")
        if name == "history":
            s.add_argument("--page", type=int, default=1, help="page number, from 1 (20 a page)")
        if name == "set-interval":
            s.add_argument("seconds", type=float)
        if name == "run":
            s.add_argument("--timeout", type=float, default=30.0)
        s.add_argument("--json", action="store_true", help="print JSON")
        s.set_defaults(fn=cmd_jobs)

    from stages.tools.receiver import add_parser as add_receiver
    add_receiver(sub)
    s = sub.add_parser("status", help="streams, groups, dead letters, write-behind, pools, "
                                      "timers, servers; exit 1 when unhealthy")
    s.add_argument("--json", action="store_true", help="one JSON object (a line per round)")
    s.add_argument("--watch", action="store_true", help="again every --interval s until ^C")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between rounds")
    s.set_defaults(fn=cmd_status)
    from stages.tools.dead import add_commands as add_dead_commands

    add_dead_commands(sub, cmd_dead)
    from stages.tools.reservations import add_reservation_commands

    add_reservation_commands(sub)  # reserve, reservations list|cancel|claim
    from stages.tools.schedules import add_parser as add_schedules
    from stages.tools.tenants import add_parser as add_tenants
    add_tenants(sub)
    add_schedules(sub)

    from stages.tools.simulate import add_commands as add_simulate_commands

    add_simulate_commands(sub, _with_servers)
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
