"""bill: meters every closed allocation into the billing ledger, exactly once.

Each ``released`` or ``expired`` change becomes one ledger row keyed by the
allocation id (``ON CONFLICT DO NOTHING``), written for the whole batch in one
statement (in key order, as persist writes) and acked after commit: a redelivered
change finds its row and adds nothing. Duration is the allocation's exact length in
whole seconds, less what interim rows of the allocation (periodic metering,
stages/schedules.py) already billed; ``end_reason`` says why it ended (released, expired, or the event that
ended it: device_failed, user_suspended, ...). The export stage (stages/export.py) sends each row to the billing service and
sets ``exported_at`` once the service accepted it.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from pipeline.worker import Entry
from schemas.keys import GROUP_BILL
from schemas.messages import AllocationChange
from stages.changes import decode_changes, pg_batch, ts
from stages.context import StageContext

INSERT_LEDGER = """
INSERT INTO billing_ledger (allocation_id, user_id, tenant_id, device_id, started_at, ended_at,
    duration_seconds, cpu_cores, memory_mb, end_reason, covered_from, covered_to, covered_to_s)
SELECT u.id, u.uid, u.tid, u.dev, u.st, u.en, greatest(u.dur - coalesce(i.s, 0), 0), u.cpu,
       u.mem, u.reason, u.st + make_interval(secs => least(coalesce(i.s, 0), u.dur)), u.en, u.dur
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
    $6::timestamptz[], $7::int[], $8::int[], $9::int[], $10::text[])
    AS u(id, uid, tid, dev, st, en, dur, cpu, mem, reason)
LEFT JOIN LATERAL (SELECT sum(duration_seconds)::int AS s FROM billing_ledger l
                   WHERE l.allocation_id = u.id AND l.kind = 'interim') i ON TRUE
ORDER BY 1
ON CONFLICT DO NOTHING
"""
"""The final row bills what the allocation's interim rows (stages/schedules.py) have not:
its exact length minus their sum (never below 0: an interim row can only cover past the
end when the clocks of two workers disagree), covering from the end of the last one."""
LEDGER_SHARED = "SELECT pg_advisory_xact_lock_shared($1)"
"""Final rows take the ledger lock shared, interim metering exclusive
(stages.schedules.LEDGER_LOCK): a final row sees every committed interim row of its
allocation, and an interim row is not written once the final row is."""


async def write_ledger(pg: asyncpg.Pool, rows: Sequence[AllocationChange]) -> None:
    """The ledger rows of these closed allocations, each written once (a row already
    there is kept as it is); a PostgreSQL outage raises Transient."""
    from stages.schedules import LEDGER_LOCK

    if not rows:
        return
    async with pg_batch(pg) as conn:
        await conn.execute(LEDGER_SHARED, LEDGER_LOCK)
        await conn.execute(
            INSERT_LEDGER,
            [r.allocation_id for r in rows], [r.user_id for r in rows],
            [r.tenant_id for r in rows], [r.device_id for r in rows],
            [ts(r.allocated_at_ms) for r in rows], [ts(r.released_at_ms) for r in rows],
            [r.duration_seconds or 0 for r in rows], [r.cpu_cores for r in rows],
            [r.memory_mb for r in rows], [r.reason or r.status for r in rows],
        )


class BillStage:
    group = GROUP_BILL

    def __init__(self, ctx: StageContext) -> None:
        assert ctx.pg is not None, "bill needs PostgreSQL"
        self.ctx = ctx
        self.pg = ctx.pg
        self.batching = ctx.write_behind
        self.streams = [ctx.keys.changes]

    async def handle(self, entries: Sequence[Entry]) -> None:
        closed = {
            c.allocation_id: c
            for c in decode_changes(entries)
            if isinstance(c, AllocationChange) and c.status != "allocated"
        }
        await write_ledger(self.pg, list(closed.values()))
        await self.ctx.redis.xack(self.streams[0], self.group, *[e.id for e in entries])
