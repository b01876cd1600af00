"""The reservation commands: `devsched reserve`, `devsched reservations list|cancel|claim`.

``reserve`` books a device (``--device``) or the best fitting device matching specs
(``--cpu``, ``--memory``, ``--pool``, ``--model``) over an interval: ``--start`` and
``--end`` each an ISO 8601 time (``2026-01-15T10:30:00Z``), milliseconds since the epoch,
or an offset from now (``+30s``, ``+5m``, ``+2h``, ``+1d``); or ``--start`` and a length
(``--duration 30m``). It goes through the streams like any request (a producer client)
and prints the typed reply as JSON (exit 0 when ``reserved``, else 2). ``cancel`` and
``claim`` send ``cancel_reservation`` and ``claim_reservation`` the same way.
``list`` reads PostgreSQL's ``reservations`` table (the write-behind: a change of the
last moments may not be there yet), newest start first, with each one's status (booked,
active, completed, cancelled, no_show); ``--json`` prints ``{"reservations": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from pipeline.clock import SystemClock
from pipeline.commands import resolved_settings, run_coroutine
from pipeline.durability import check_redis_of

LIST_LIMIT = 100
"""Reservations ``reservations list`` prints by default."""

_OFFSET = re.compile(r"^\+(\d+)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
COLUMNS = ["reservation_id", "user_id", "device_id", "status", "start_ms", "end_ms",
           "allocation_id", "reason"]


def duration_ms(text: str) -> int:
    """A length: ``30s``, ``5m``, ``2h``, ``1d`` or plain milliseconds."""
    m = _OFFSET.match("+" + text) if not text.startswith("+") else _OFFSET.match(text)
    if m:
        return int(m.group(1)) * _UNIT_MS[m.group(2)]
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"not a length: {text!r} (e.g. 30m, 2h)")


def time_ms(text: str, now_ms: int) -> int:
    """A point in time: an offset from now (``+5m``), ms since the epoch, or ISO 8601 (a
    time without a zone is UTC)."""
    if text.startswith("+"):
        return now_ms + duration_ms(text)
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (ISO 8601, ms since the epoch, or +30s/+5m/+2h/+1d)") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _send(args: argparse.Namespace, call: Callable[[Any], Awaitable[Any]], ok: str) -> int:
    """One request through a producer client; its typed reply printed as JSON; exit 0 when
    the reply is of type ``ok``, else 2."""
    from stages.app import APP
    from stages.tools.client import Client

    settings, _ = resolved_settings(APP)

    async def go() -> int:
        await check_redis_of(settings)
        async with Client(settings, timeout_s=args.timeout) as client:
            reply = await call(client)
        print(msgspec.json.encode(reply).decode())
        return 0 if type(reply).__name__ == ok else 2

    result: int = run_coroutine(go())
    return result


def cmd_reserve(args: argparse.Namespace) -> int:
    now = SystemClock().now_ms()
    try:
        start = time_ms(args.start, now)
        end = (time_ms(args.end, now) if args.end is not None
               else start + duration_ms(args.duration))
    except argparse.ArgumentTypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _send(args, lambda client: client.reserve(
        args.user, start, end, device_id=args.device, tenant_id=args.tenant,
        min_cpu_cores=args.cpu, min_memory_mb=args.memory, pool=args.pool, model=args.model,
        request_id=args.request_id), "Reserved")


def cmd_cancel(args: argparse.Namespace) -> int:
    return _send(args, lambda client: client.cancel_reservation(
        args.reservation, args.user, request_id=args.request_id), "ReservationCancelled")


def cmd_claim(args: argparse.Namespace) -> int:
    return _send(args, lambda client: client.claim_reservation(
        args.reservation, args.user, request_id=args.request_id), "Claimed")


LIST_SQL = """
SELECT id::text AS reservation_id, request_id, user_id, tenant_id, device_id, pool,
       round(extract(epoch FROM start_at) * 1000)::bigint AS start_ms,
       round(extract(epoch FROM end_at) * 1000)::bigint AS end_ms, status,
       allocation_id::text AS allocation_id, reason,
       round(extract(epoch FROM created_at) * 1000)::bigint AS created_at_ms,
       round(extract(epoch FROM claimed_at) * 1000)::bigint AS claimed_at_ms,
       round(extract(epoch FROM claim_by) * 1000)::bigint AS claim_by_ms,
       round(extract(epoch FROM ended_at) * 1000)::bigint AS ended_at_ms
FROM reservations
WHERE ($1::text IS NULL OR user_id = $1) AND ($2::text IS NULL OR status = $2)
  AND ($3::text IS NULL OR device_id = $3)
ORDER BY start_at DESC, id LIMIT $4
"""


async def list_reservations(pg: Any, *, user: str | None = None, status: str | None = None,
                            device: str | None = None, limit: int = LIST_LIMIT
                            ) -> list[dict[str, Any]]:
    """Reservations from PostgreSQL, newest start first, filtered."""
    async with pg.acquire() as conn:
        rows = await conn.fetch(LIST_SQL, user, status, device, limit)
    return [dict(r) for r in rows]


def cmd_list(args: argparse.Namespace) -> int:
    from pipeline.connections import pg_pool
    from stages.app import APP
    from stages.tools.cli import print_table

    settings, _ = resolved_settings(APP)

    async def go() -> int:
        pg = await pg_pool(settings)
        try:
            rows = await list_reservations(pg, user=args.user, status=args.status,
                                           device=args.device, limit=args.limit)
        finally:
            await pg.close()
        if args.json:
            print(json.dumps({"reservations": rows}))
        else:
            print_table(rows, COLUMNS)
        return 0

    result: int = run_coroutine(go())
    return result


STATUSES = ("booked", "active", "completed", "cancelled", "no_show")


def add_reservation_commands(sub: Any) -> None:
    """Register ``reserve`` and ``reservations list|cancel|claim`` on the devsched parser."""
    s = sub.add_parser("reserve", help="book a device over an interval (needs running stages)")
    s.add_argument("user")
    s.add_argument("--device", help="the device to book (else the best fit of the specs)")
    s.add_argument("--cpu", type=int, default=0)
    s.add_argument("--memory", type=int, default=0)
    s.add_argument("--pool")
    s.add_argument("--model")
    s.add_argument("--tenant")
    s.add_argument("--start", required=True,
                   help="ISO 8601, ms since the epoch, or an offset from now: +30s, +5m, +2h")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--end", help="as --start")
    g.add_argument("--duration", help="the length from the start: 30m, 2h, 1d, or ms")
    s.add_argument("--request-id")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(fn=cmd_reserve)

    rv = sub.add_parser("reservations", help="list, cancel or claim reservations").add_subparsers(
        dest="sub", required=True)
    s = rv.add_parser("list", help="reservations with their status, newest start first "
                                   "(from PostgreSQL)")
    s.add_argument("--user")
    s.add_argument("--status", choices=STATUSES)
    s.add_argument("--device")
    s.add_argument("--limit", type=int, default=LIST_LIMIT)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=cmd_list)
    for name, what, fn in (("cancel", "cancel a booked reservation or end an active one", cmd_cancel),
                           ("claim", "claim an active reservation's allocation", cmd_claim)):
        s = rv.add_parser(name, help=f"{what} (needs running stages)")
        s.add_argument("reservation")
        s.add_argument("--user", required=True)
        s.add_argument("--request-id")
        s.add_argument("--timeout", type=float, default=10.0)
        s.set_defaults(fn=fn)
