"""The ledger's final row is written once however many writers race for it.

bill and export both write a closed allocation's final row (export when it gets there
first, stages/export.py), and several bill workers may hold the same change (a
reclaimed entry). The final row conflicts on two unique indexes (one final row per
allocation, and the entry id, the billing service's dedupe key), so the statement must
take a conflict on either as "already written": with only the first as its conflict
target, concurrent writers of overlapping batches failed with a unique violation on the
entry id now and then (the batch was then retried one entry at a time: nothing lost,
but a failed write; seen in the demo). Here six writers write overlapping random
batches of the same rows at once, forty times: no write may fail, and each allocation
has one row.
"""

from __future__ import annotations

import asyncio
import random
import uuid

from pipeline.connections import pg_pool
from schemas.messages import AllocationChange
from stages.bill import write_ledger
from stages.settings import Settings

ROUNDS, WRITERS, ROWS, PER_BATCH = 40, 6, 50, 30


def closed(aid: str) -> AllocationChange:
    return AllocationChange(
        allocation_id=aid, device_id="d1", user_id="u1", request_id="r1", status="released",
        allocated_at_ms=1_700_000_000_000, expires_at_ms=1_700_000_600_000,
        released_at_ms=1_700_000_060_000, duration_minutes=10, duration_seconds=60,
        cpu_cores=2, memory_mb=2048, storage_mb=1024, pool="default", version=2,
        at_ms=1_700_000_060_000, reason="released")


async def test_concurrent_writers_of_the_same_final_rows_write_each_once_without_an_error(
    settings: Settings,
) -> None:
    pg = await pg_pool(settings, min_size=WRITERS, max_size=WRITERS)
    rng = random.Random(7)
    failures: list[BaseException] = []
    drawn: set[str] = set()
    try:
        async with pg.acquire() as conn:
            await conn.execute("TRUNCATE billing_ledger")
        for _ in range(ROUNDS):
            rows = [closed(str(uuid.uuid4())) for _ in range(ROWS)]
            batches = [rng.sample(rows, PER_BATCH) for _ in range(WRITERS)]
            drawn |= {r.allocation_id for b in batches for r in b}
            done = await asyncio.gather(*[write_ledger(pg, b) for b in batches],
                                        return_exceptions=True)
            failures += [d for d in done if isinstance(d, BaseException)]
        async with pg.acquire() as conn:
            counts = await conn.fetch(
                "SELECT allocation_id::text AS id, count(*) AS n FROM billing_ledger GROUP BY 1")
    finally:
        await pg.close()
    assert not failures, failures[:3]
    assert all(r["n"] == 1 for r in counts)
    assert {r["id"] for r in counts} == drawn
