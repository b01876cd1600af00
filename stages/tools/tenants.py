"""Tenant registry commands: ``devsched tenants set|delete|list``.

A tenant has a plan; the plan names its interval tier (DEVSCHED_PLAN_INTERVALS), and the
tenant is in one batch of each kind's schedule of that tier (stages/schedules.py). These
commands change the registry through the same atomic schedules.lua call that applies the
``tenant.*`` events of other systems, so a plan change moves the tenant between batches in
one step. ``list`` reads the registry in one call: each tenant's plan, interval, override
and batch per kind.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from redis.asyncio import Redis

from schemas.rows import TenantOp
from stages.schedules import KINDS, apply_tenants, as_list, dump, label, pairs, plan_tiers
from stages.settings import Settings


class UnknownPlan(ValueError):
    """The plan is not in DEVSCHED_PLAN_INTERVALS."""


async def set_tenant(redis: Redis, settings: Settings, now_ms: int, tenant_id: str,
                     plan: str) -> dict[str, Any]:
    """Create the tenant on ``plan`` or change its plan; returns its row (``status``:
    created, plan_changed, unchanged)."""
    tiers = plan_tiers(settings)
    if plan not in tiers:
        raise UnknownPlan(f"unknown plan {plan!r} (plans: {', '.join(tiers)})")
    [(_, status)] = await apply_tenants(redis, settings, now_ms,
                                        [TenantOp(action="set", tenant_id=tenant_id, plan=plan)])
    row = await tenant_row(redis, settings, now_ms, tenant_id)
    return {"status": status, **(row or {})}


async def delete_tenant(redis: Redis, settings: Settings, now_ms: int,
                        tenant_id: str) -> str:
    """Remove the tenant from the registry, its batches and the retry queue; ``deleted``
    or ``not_found``."""
    [(_, status)] = await apply_tenants(redis, settings, now_ms,
                                        [TenantOp(action="delete", tenant_id=tenant_id)])
    return status


def tenant_rows(state: dict[str, Any], settings: Settings, now_ms: int) -> list[dict[str, Any]]:
    """Each registered tenant: plan, tier, interval in force, override, batch per kind."""
    tiers = plan_tiers(settings)
    rows = []
    for t in as_list(state.get("tenants")):
        h = pairs(t.get("hash"))
        until = int(h["override_until_ms"]) if h.get("override_until_ms") else None
        every = int(h["override_ms"]) if h.get("override_ms") else None
        active = every is not None and until is not None and until > now_ms
        interval = every if active and every else tiers.get(t["plan"])
        rows.append({
            "tenant_id": t["id"], "plan": t["plan"],
            "tier": label(tiers[t["plan"]]) if t["plan"] in tiers else None,
            "interval_ms": interval, "override_ms": every if active else None,
            "override_until_ms": until if active else None,
            "batches": {kind: h.get(f"b:{kind}") for kind in KINDS},
        })
    rows.sort(key=lambda r: str(r["tenant_id"]))
    return rows


async def tenant_row(redis: Redis, settings: Settings, now_ms: int,
                     tenant_id: str) -> dict[str, Any] | None:
    rows = tenant_rows(await dump(redis, settings, now_ms), settings, now_ms)
    return next((r for r in rows if r["tenant_id"] == tenant_id), None)


async def list_tenants(redis: Redis, settings: Settings, now_ms: int) -> list[dict[str, Any]]:
    return tenant_rows(await dump(redis, settings, now_ms), settings, now_ms)


COLUMNS = ["tenant_id", "plan", "tier", "interval_ms", "override_until_ms"]


def cmd_tenants(args: argparse.Namespace) -> int:
    """devsched tenants set|delete|list."""
    from pipeline.clock import SystemClock
    from pipeline.commands import resolved_settings, run_coroutine
    from pipeline.connections import redis_client
    from pipeline.durability import check_redis
    from stages.app import APP

    settings, _ = resolved_settings(APP)
    now = SystemClock().now_ms()

    async def go() -> int:
        redis = redis_client(settings)
        try:
            await check_redis(redis)
            shown: Any
            if args.sub == "set":
                shown = await set_tenant(redis, settings, now, args.tenant, args.plan)
            elif args.sub == "delete":
                status = await delete_tenant(redis, settings, now, args.tenant)
                shown = {"tenant_id": args.tenant, "status": status}
                if status != "deleted":
                    print(json.dumps(shown) if args.json else f"error: no tenant {args.tenant!r}",
                          file=sys.stdout if args.json else sys.stderr)
                    return 1
            else:
                rows = await list_tenants(redis, settings, now)
                shown = {"tenants": rows}
        except (UnknownPlan, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            await redis.aclose()
        if args.json:
            print(json.dumps(shown))
        elif args.sub == "list":
            print_table(shown["tenants"], COLUMNS + [f"b:{k}" for k in KINDS],
                        lambda r, c: r["batches"].get(c[2:]) if c.startswith("b:") else r.get(c))
        else:
            for key, value in shown.items():
                print(f"{key}: {value}")
        return 0

    result: int = run_coroutine(go(), settings)
    return result


def print_table(rows: list[dict[str, Any]], columns: list[str],
                get: Any = lambda r, c: r.get(c)) -> None:
    """Rows as an aligned table (``-`` for none)."""
    cells = [[("-" if get(r, c) is None else str(get(r, c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def add_parser(sub: Any) -> None:
    """`devsched tenants ...`: registered by stages.tools.cli."""
    tenants = sub.add_parser("tenants", help="the tenant registry: set a plan, delete, list"
                             ).add_subparsers(dest="sub", required=True)
    s = tenants.add_parser("set", help="create a tenant on a plan, or change its plan (it "
                                       "moves to the schedules of the plan's tier)")
    s.add_argument("tenant")
    s.add_argument("--plan", required=True, help="a plan of DEVSCHED_PLAN_INTERVALS")
    s = tenants.add_parser("delete", help="remove a tenant from its schedules")
    s.add_argument("tenant")
    s = tenants.add_parser("list", help="every tenant: plan, tier, interval, batches")
    for p in tenants.choices.values():
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(fn=cmd_tenants)
