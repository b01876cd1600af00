"""bill: meters every closed allocation into the billing ledger, exactly once.

Each ``released`` or ``expired`` change becomes one ledger row keyed by the
allocation id (``ON CONFLICT DO NOTHING``), written for the whole batch in one
statement (in key order, as persist writes) and acked after commit: a redelivered
change finds its row and adds nothing. Duration is the allocation's exact length in
whole seconds; ``end_reason`` says why it ended (released, expired, or the event that
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
    duration_seconds, cpu_cores, memory_mb, end_reason)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
    $6::timestamptz[], $7::int[], $8::int[], $9::int[], $10::text[]) ORDER BY 1
ON CONFLICT (allocation_id) DO NOTHING
"""


async def write_ledger(pg: asyncpg.Pool, rows: Sequence[AllocationChange]) -> None:
    """The ledger rows of these closed allocations, each written once (a row already
    there is kept as it is); a PostgreSQL outage raises Transient."""
    if not rows:
        return
    async with pg_batch(pg, transaction=False) as conn:
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
