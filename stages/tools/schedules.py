"""Schedule control and validation: ``devsched schedules list|show|pause|resume|trigger|
override|rebalance|failed|retry|validate``.

Everything is read from or changed through schedules.lua (stages/schedules.py), so a
change is atomic and the running timers workers see it at their next tick. ``trigger``
runs every batch of one schedule now in this process, under the same claim the timers
take (a batch another worker is running answers ``busy``), with its execution record.
``validate`` checks the state: every tenant mapped exactly once per kind, in the schedule
of its interval, no orphan batches or items, counts accurate, intervals valid. It reads
the state in one atomic call and looks for stray keys with SCAN (so on a busy system a
change between the two can show as a fault: run it again).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from pipeline.connections import text
from schemas.keys import Keys
from stages.context import StageContext
from stages.schedules import (
    KINDS,
    as_list,
    claim_batches,
    control,
    dump,
    label,
    pairs,
    parse_duration,
    plan_tiers,
    retry_views,
    run_batch,
    run_retries,
    schedule_views,
    set_override,
)
from stages.settings import Settings

FAULTS_SHOWN = 100
"""Faults listed in the validation report (all are counted)."""


class NotFound(LookupError):
    """No such schedule, tenant or retry item."""


def until_ms(raw: str, now_ms: int) -> int:
    """``--until``: an ISO-8601 time (UTC unless it says otherwise) or a duration from now
    (``7d``)."""
    try:
        return now_ms + parse_duration(raw)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise ValueError(f"--until: not a time or a duration: {raw!r}") from exc
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return int(at.timestamp() * 1000)


async def overview(redis: Redis, settings: Settings, now_ms: int) -> dict[str, Any]:
    """``schedules list``: every schedule with its health and batches (with their
    tenants), the retry queue and its alert."""
    state = await dump(redis, settings, now_ms)
    waiting, failed = retry_views(state)
    return {"schedules": schedule_views(state, settings), "tenants": state["tenant_count"],
            "retry_queue": len(waiting), "failed": len(failed),
            "retry_alert": len(waiting) + len(failed) > settings.schedule_retry_alert}


async def show(redis: Redis, settings: Settings, now_ms: int, schedule: str) -> dict[str, Any]:
    state = await dump(redis, settings, now_ms)
    for view in schedule_views(state, settings):
        if view["schedule"] == schedule:
            return view
    raise NotFound(f"no schedule {schedule!r}")


async def set_paused(redis: Redis, settings: Settings, now_ms: int, schedule: str,
                     paused: bool) -> dict[str, Any]:
    [status] = await control(redis, settings, now_ms, "pause" if paused else "resume", schedule)
    if text(status) != "ok":
        raise NotFound(f"no schedule {schedule!r}")
    return await show(redis, settings, now_ms, schedule)


async def trigger(ctx: StageContext, schedule: str) -> dict[str, Any]:
    """Run every batch of ``schedule`` now; one result per batch."""
    views = schedule_views(await dump(ctx.redis, ctx.settings, ctx.clock.now_ms(),
                                      members=False), ctx.settings)
    if schedule not in {v["schedule"] for v in views}:
        raise NotFound(f"no schedule {schedule!r}")
    started = ctx.clock.now_ms()
    runs = await claim_batches(ctx, schedule)
    claimed = {r.batch for r in runs}
    batches = []
    for run in runs:
        outcome = await run_batch(ctx, run, manual=True)
        batches.append({"batch": run.batch, "status": outcome.status,
                        "tenants": outcome.tenants, "processed_count": outcome.processed,
                        "failed": [{"tenant_id": t, "error": e} for t, e in outcome.failed],
                        "execution_time_ms": outcome.duration_ms})
    view = next(v for v in views if v["schedule"] == schedule)
    for b in view["batches"]:
        if b["batch"] not in claimed:
            batches.append({"batch": b["batch"], "status": "busy", "tenants": b["size"],
                            "processed_count": 0, "failed": [], "execution_time_ms": 0})
    status = "succeeded" if all(b["status"] == "succeeded" for b in batches) else "failed"
    return {"schedule": schedule, "operation": "trigger",
            "executed_at": datetime.fromtimestamp(started / 1000, UTC).isoformat(),
            "status": status, "processed_count": sum(b["processed_count"] for b in batches),
            "tenants": sum(b["tenants"] for b in batches),
            "execution_time_ms": ctx.clock.now_ms() - started, "batches": batches}


async def rebalance(redis: Redis, settings: Settings, now_ms: int,
                    schedule: str | None) -> dict[str, Any]:
    out = await control(redis, settings, now_ms, "rebalance", schedule)
    rows = [{"schedule": text(s), "moved": int(m), "batches_before": int(b),
             "batches_after": int(a)} for s, m, b, a in out]
    return {"schedules": rows, "moved": sum(r["moved"] for r in rows)}


async def failures(redis: Redis, settings: Settings, now_ms: int) -> dict[str, Any]:
    waiting, failed = retry_views(await dump(redis, settings, now_ms, members=False))
    return {"failed": failed, "retrying": waiting}


async def retry(ctx: StageContext, tenant_id: str, kind: str) -> dict[str, Any]:
    """Put the tenant's failed (or waiting) run of ``kind`` back and run it now."""
    item = f"{kind}|{tenant_id}"
    [status] = await control(ctx.redis, ctx.settings, ctx.clock.now_ms(), "requeue", item=item)
    if text(status) != "ok":
        raise NotFound(f"no failed or waiting {kind} run of tenant {tenant_id!r}")
    done = await run_retries(ctx, item)
    outcome = done[0][1] if done else "busy"
    return {"tenant_id": tenant_id, "kind": kind, "outcome": outcome}


# --- validation ---------------------------------------------------------------------


async def validate(redis: Redis, settings: Settings, now_ms: int) -> dict[str, Any]:
    """Check the schedules' state; the report's ``valid`` is True when nothing is wrong."""
    state = await dump(redis, settings, now_ms)
    tiers = plan_tiers(settings)
    cap = settings.schedule_batch_capacity
    faults: list[dict[str, Any]] = []

    def fault(name: str, detail: str, **where: Any) -> None:
        faults.append({"fault": name, **where, "detail": detail})

    tenants = {t["id"]: t for t in as_list(state.get("tenants"))}
    tenant_hash = {tid: pairs(t.get("hash")) for tid, t in tenants.items()}
    where_is: dict[tuple[str, str], list[str]] = {}
    known_batches: set[str] = set()
    schedule_interval: dict[str, int] = {}
    due = dict(zip(as_list(state.get("due"))[::2], as_list(state.get("due"))[1::2],
                   strict=True))
    sched_ids = set()
    for sched in as_list(state.get("schedules")):
        sid = sched["id"]
        sched_ids.add(sid)
        h = pairs(sched.get("hash"))
        kind = h.get("kind", "")
        sched_interval = int(h.get("interval_ms") or 0)
        schedule_interval[sid] = sched_interval
        if kind not in KINDS:
            fault("invalid_schedule", f"unknown kind {kind!r}", schedule=sid)
        if sched_interval <= 0 or sid != f"{kind}:{label(sched_interval)}":
            fault("invalid_interval", f"interval_ms {sched_interval} does not match the id",
                  schedule=sid)
        if h.get("fixed") == "1" and sched_interval not in tiers.values():
            fault("invalid_interval", f"tier schedule of {sched_interval} ms, no plan has it",
                  schedule=sid)
        total = 0
        for b in as_list(sched.get("batches")):
            ref = b["ref"]
            known_batches.add(ref)
            bh = pairs(b.get("hash"))
            members = as_list(b.get("members"))
            total += len(members)
            if not bh:
                fault("orphan_item", "a batch number listed without its batch",
                      schedule=sid, batch=ref)
                continue
            size = int(bh.get("size") or 0)
            if size != len(members):
                fault("count_mismatch", f"batch size {size}, {len(members)} tenants in it",
                      schedule=sid, batch=ref)
            if len(members) > cap:
                fault("over_capacity", f"{len(members)} tenants, capacity {cap}",
                      schedule=sid, batch=ref)
            if not members:
                fault("orphan_batch", "an empty batch", schedule=sid, batch=ref)
            if ref not in due:
                fault("not_scheduled", "the batch has no next run", schedule=sid, batch=ref)
            for tid in members:
                where_is.setdefault((kind, tid), []).append(ref)
                if tid not in tenants:
                    fault("orphan_item", "a tenant in a batch but not in the registry",
                          schedule=sid, batch=ref, tenant_id=tid)
        counted = int(h.get("tenants") or 0)
        if counted != total:
            fault("count_mismatch", f"schedule counts {counted} tenants, its batches hold "
                  f"{total}", schedule=sid)
    for ref in due:
        if ref not in known_batches:
            fault("orphan_item", "a next run of a batch that is not listed", batch=ref)
    for tid, t in tenants.items():
        h = tenant_hash[tid]
        plan = t["plan"]
        if plan not in tiers:
            fault("unknown_plan", f"plan {plan!r} is not in DEVSCHED_PLAN_INTERVALS",
                  tenant_id=tid)
        every = int(h["override_ms"]) if h.get("override_ms") else None
        until = int(h["override_until_ms"]) if h.get("override_until_ms") else 0
        if every is not None and every <= 0:
            fault("invalid_interval", f"override of {every} ms", tenant_id=tid)
        interval: int | None = every if every and until > now_ms else tiers.get(plan)
        for kind in KINDS:
            refs = where_is.get((kind, tid), [])
            if not refs:
                fault("unmapped", f"in no {kind} batch", tenant_id=tid, kind=kind)
            elif len(refs) > 1:
                fault("multiple", f"in {len(refs)} {kind} batches: {', '.join(sorted(refs))}",
                      tenant_id=tid, kind=kind)
            recorded = h.get(f"b:{kind}")
            if refs and recorded not in refs:
                fault("mapping_mismatch", f"the tenant names batch {recorded!r}, it is in "
                      f"{', '.join(sorted(refs))}", tenant_id=tid, kind=kind)
            if interval is not None and refs and any(
                    r.rpartition("#")[0] != f"{kind}:{label(interval)}" for r in refs):
                fault("wrong_schedule", f"runs every {label(interval)}, mapped to "
                      f"{', '.join(sorted(refs))}", tenant_id=tid, kind=kind)
    # stray keys: batches and tenants no listing reaches
    k = Keys(settings.prefix)
    base = k.sched("")
    async for raw in redis.scan_iter(match=base + "batch:*", count=1000):
        ref = text(raw)[len(base) + len("batch:"):]
        if ref not in known_batches:
            fault("orphan_batch", "a batch its schedule does not list", batch=ref)
    async for raw in redis.scan_iter(match=base + "members:*", count=1000):
        ref = text(raw)[len(base) + len("members:"):]
        if ref not in known_batches:
            fault("orphan_batch", "tenants of a batch its schedule does not list", batch=ref)
    async for raw in redis.scan_iter(match=base + "tenant:*", count=1000):
        tid = text(raw)[len(base) + len("tenant:"):]
        if tid not in tenants:
            fault("orphan_item", "a tenant's record without its registry entry", tenant_id=tid)
    async for raw in redis.scan_iter(match=base + "schedule:*", count=1000):
        sid = text(raw)[len(base) + len("schedule:"):]
        if sid not in sched_ids:
            fault("orphan_batch", "a schedule not in the list of schedules", schedule=sid)
    by_kind = Counter(f["fault"] for f in faults)
    return {"valid": not faults, "fault_count": len(faults), "faults_by_kind": dict(by_kind),
            "faults": faults[:FAULTS_SHOWN], "tenants": len(tenants),
            "schedules": len(sched_ids), "batches": len(known_batches)}


# --- the command --------------------------------------------------------------------


def cmd_schedules(args: argparse.Namespace) -> int:
    """devsched schedules ..."""
    from pipeline.clock import SystemClock
    from pipeline.commands import resolved_settings, run_coroutine
    from pipeline.connections import pg_pool, redis_client
    from pipeline.durability import check_redis
    from stages.app import APP
    from stages.tools.tenants import print_table

    settings, _ = resolved_settings(APP)
    clock = SystemClock()

    async def go() -> int:
        redis = redis_client(settings)
        pg = None
        code = 0
        try:
            await check_redis(redis)
            now = clock.now_ms()
            shown: Any
            if args.sub == "list":
                shown = await overview(redis, settings, now)
            elif args.sub == "show":
                shown = await show(redis, settings, now, args.schedule)
            elif args.sub in ("pause", "resume"):
                shown = await set_paused(redis, settings, now, args.schedule, args.sub == "pause")
            elif args.sub in ("trigger", "retry"):
                pg = await pg_pool(settings)
                ctx = StageContext(redis=redis, settings=settings, clock=clock, pg=pg)
                if args.sub == "trigger":
                    shown = await trigger(ctx, args.schedule)
                    code = 0 if shown["status"] == "succeeded" else 1
                else:
                    shown = await retry(ctx, args.tenant, args.kind)
                    code = 0 if shown["outcome"] == "done" else 1
            elif args.sub == "override":
                _check_override_args(args)
                every = None if args.clear else parse_duration(args.every)
                until = None if args.clear else until_ms(args.until, now)
                if until is not None and until <= now:
                    raise ValueError("--until must be in the future")
                if not await set_override(redis, settings, now, args.tenant, every, until):
                    raise NotFound(f"no tenant {args.tenant!r}")
                shown = {"tenant_id": args.tenant, "override_ms": every,
                         "override_until_ms": until}
            elif args.sub == "rebalance":
                shown = await rebalance(redis, settings, now, args.schedule)
            elif args.sub == "failed":
                shown = await failures(redis, settings, now)
            else:
                shown = await validate(redis, settings, now)
                print(json.dumps(shown))
                return 0 if shown["valid"] else 1
        except NotFound as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            if pg is not None:
                await pg.close()
            await redis.aclose()
        if args.json:
            print(json.dumps(shown))
        elif args.sub == "list":
            print_table(shown["schedules"], ["schedule", "plans", "paused", "tenants",
                                             "batch_count", "fill", "health", "last_run_ms",
                                             "next_run_ms"])
            print(f"retry queue: {shown['retry_queue']}, failed: {shown['failed']}"
                  + (" (ALERT)" if shown["retry_alert"] else ""))
        elif args.sub == "failed":
            print_table(shown["failed"], ["kind", "tenant_id", "tries", "failed_at_ms", "error"])
            print(f"retrying: {len(shown['retrying'])}")
        else:
            for key, value in shown.items():
                print(f"{key}: {json.dumps(value) if isinstance(value, list | dict) else value}")
        return code

    result: int = run_coroutine(go(), settings)
    return result


def add_parser(sub: Any) -> None:
    """`devsched schedules ...`: registered by stages.tools.cli."""
    sc = sub.add_parser("schedules", help="the global interval schedules: health, control, "
                        "overrides, retries, validation").add_subparsers(dest="sub", required=True)
    sc.add_parser("list", help="every schedule: health, batches and their tenants, last and "
                  "next run; the retry queue")
    for name, what in (("show", "one schedule"), ("pause", "no scheduled runs"),
                       ("resume", "scheduled runs again"),
                       ("trigger", "run every batch of the schedule now")):
        s = sc.add_parser(name, help=what)
        s.add_argument("schedule", help="<kind>:<tier>, e.g. interim_metering:1h")
    s = sc.add_parser("override", help="a custom interval for a tenant until a time, then "
                      "its tier again")
    s.add_argument("tenant")
    s.add_argument("--every", help="the interval, e.g. 30m")
    s.add_argument("--until", help="an ISO-8601 time or a duration from now (7d)")
    s.add_argument("--clear", action="store_true", help="remove the override now")
    s = sc.add_parser("rebalance", help="consolidate under-used batches")
    s.add_argument("schedule", nargs="?")
    sc.add_parser("failed", help="permanently failed tenant runs (and those retrying)")
    s = sc.add_parser("retry", help="run a tenant's failed run again now")
    s.add_argument("tenant")
    s.add_argument("--kind", choices=KINDS, required=True)
    sc.add_parser("validate", help="check the schedules' state; exit 1 with a JSON report "
                  "of the faults")
    for p in sc.choices.values():
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(fn=cmd_schedules)


def _check_override_args(args: argparse.Namespace) -> None:
    if not args.clear and not (args.every and args.until):
        raise ValueError("override needs --every and --until (or --clear)")
