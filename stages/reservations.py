"""Reservations on the timers' ticks: the three tracked jobs that move bookings along.

A reservation (a ``reserve`` request, booked by select.lua with bookings.lua) is
``booked`` until its start. Each tick the jobs registry (stages.jobs) runs:

- ``activate_reservations``: each booked reservation whose start came becomes an
  allocation held for its user on its device until its end (``reservation.active`` is
  notified with the device and its ADB endpoint); it must be claimed within
  DEVSCHED_RESERVATION_GRACE_S (a ``claim_reservation`` request, or a renewal of that
  allocation);
- ``cancel_no_shows``: each active reservation not claimed by then ends ``no_show``, its
  allocation released (reason ``no_show``) and the device freed;
- ``complete_reservations``: each active reservation whose allocation ended (expired at
  the end by the expire job, released, ended by an event) ends ``completed``; the
  allocation is billed once, as any allocation.

Each job is one or more calls of reservations.lua, each atomic: a reservation leaves the
schedule that chose it in the same step that handles it, so a retried or repeated run
changes nothing twice. Each returns how many reservations it handled.
"""

from __future__ import annotations

from schemas.rows import ReservationsCall, ReservationsKeys
from stages.context import StageContext
from stages.scripts import RESERVATIONS

STEP_LIMIT = 500
"""Reservations one script call handles at most (a full call is followed by another)."""


async def _run(ctx: StageContext, op: str) -> int:
    s = ctx.settings
    total = 0
    while True:
        handled, seen = await RESERVATIONS(
            ctx.redis, ReservationsKeys(changes=ctx.keys.changes),
            ReservationsCall(prefix=s.prefix, now_ms=ctx.clock.now_ms(), op=op,
                             limit=STEP_LIMIT, grace_ms=s.reservation_grace_s * 1000,
                             released_ttl_s=s.released_ttl_s))
        total += int(handled)
        if int(seen) < STEP_LIMIT:
            return total


async def activate_reservations(ctx: StageContext) -> int:
    """Turn every booked reservation whose start came into an allocation held for its user."""
    return await _run(ctx, "activate")


async def cancel_no_shows(ctx: StageContext) -> int:
    """End every active reservation not claimed within the grace period as ``no_show``."""
    return await _run(ctx, "no_show")


async def complete_reservations(ctx: StageContext) -> int:
    """End every active reservation whose allocation ended as ``completed``."""
    return await _run(ctx, "complete")
