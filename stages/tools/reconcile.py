"""`devsched rebuild --reconcile`: repair Redis from PostgreSQL after a failover.

Redis replicates asynchronously, so a promoted replica can lack changes the old
primary had made, and PostgreSQL can already have some of them: persist read them
from the old primary's changes stream before the replica got them. `devsched audit`
reports each such change (an allocation PostgreSQL holds active that Redis does not
know, a device whose holder differs, a user's usage). This command repairs them, in
this order, once the write-behind has drained (every change the promoted primary has
is in PostgreSQL; otherwise :class:`~stages.tools.rebuild.BacklogPending`):

1. An allocation PostgreSQL holds active but the promoted primary does not know at
   all (no record of it, active or closed) was lost with the old primary. When its
   device has been given to another allocation since (PostgreSQL has one that
   started later on that device), the device is that one's now: the lost one is
   closed in PostgreSQL at its own start (``status`` released, ``end_reason``
   ``failover``, 0 s billed, version moved on), so no device is held by two
   allocations in the history either. Otherwise it is kept, and step 2 brings it
   back into Redis.
2. Redis is rebuilt from PostgreSQL (``stages.tools.rebuild.rebuild`` with force):
   devices, quotas, usage recomputed from the active allocations, the expiry
   schedule and the stored answers; afterwards the audit finds both sides equal.

With ``DEVSCHED_REPLICAS_TO_ACK`` >= 1 an allocation closed in step 1 was never
answered (its answer waits for the replica that never got it); with 0 its user may
have been told, which is the price of asynchronous replication the README states.
When the audit finds nothing to repair, nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis

from pipeline.clock import Clock
from schemas.keys import Keys
from stages.settings import Settings
from stages.tools.audit import audit
from stages.tools.rebuild import BacklogPending, Progress, RebuildReport, persist_behind, rebuild

ACTIVE_SQL = "SELECT id::text AS id FROM device_allocations WHERE status = 'allocated'"
CLOSE_LOST_SQL = """
UPDATE device_allocations AS a
SET status = 'released', released_at = a.allocated_at, duration_seconds = 0,
    end_reason = 'failover', version = a.version + 1
WHERE a.id = ANY($1::uuid[]) AND a.status = 'allocated'
  AND EXISTS (SELECT 1 FROM device_allocations b
              WHERE b.device_id = a.device_id AND b.id <> a.id
                AND b.allocated_at >= a.allocated_at)
RETURNING a.id::text AS id
"""
"""Close the lost allocations whose device was given to another one since."""


@dataclass
class ReconcileReport:
    """What `devsched rebuild --reconcile` found and did."""

    differences: int = 0
    """Differences the audit found before (0: nothing was repaired)."""
    lost: list[str] = field(default_factory=list)
    """Allocations PostgreSQL held active that Redis did not know."""
    closed: list[str] = field(default_factory=list)
    """Of those, the ones closed in PostgreSQL (their device was given again)."""
    rebuilt: RebuildReport | None = None
    consistent: bool = False
    """What the audit says after the repair."""


async def lost_allocations(redis: Redis, keys: Keys, pg: asyncpg.Pool) -> list[str]:
    """Allocations PostgreSQL holds active of which Redis has no record at all."""
    async with pg.acquire() as conn:
        active = [r["id"] for r in await conn.fetch(ACTIVE_SQL)]
    lost: list[str] = []
    for i in range(0, len(active), 500):
        chunk = active[i:i + 500]
        async with redis.pipeline(transaction=False) as pipe:
            for aid in chunk:
                pipe.exists(keys.allocation(aid))
            found = await pipe.execute()
        lost += [aid for aid, there in zip(chunk, found, strict=True) if not there]
    return lost


async def reconcile(
    redis: Redis, keys: Keys, pg: asyncpg.Pool, settings: Settings, clock: Clock, *,
    progress: Progress | None = None,
) -> ReconcileReport:
    """Repair what the promoted primary lacks from PostgreSQL (see the module docstring)."""
    say = progress or (lambda _line: None)
    report = ReconcileReport()
    before = await audit(redis, keys, pg)
    report.differences = int(before["difference_count"])
    if before["consistent"]:
        report.consistent = True
        say("audit: Redis and PostgreSQL agree; nothing to repair")
        return report
    if await persist_behind(redis, keys):
        raise BacklogPending(
            "changes on the changes stream are not yet in PostgreSQL; reconciling now "
            "would lose them. Let the write-behind catch up and try again")
    report.lost = await lost_allocations(redis, keys, pg)
    if report.lost:
        async with pg.acquire() as conn:
            report.closed = [r["id"] for r in await conn.fetch(CLOSE_LOST_SQL, report.lost)]
    say(f"{report.differences} differences; {len(report.lost)} allocations PostgreSQL has "
        f"and Redis lost, {len(report.closed)} of them closed (their device was given "
        "again)")
    report.rebuilt = await rebuild(redis, keys, pg, settings, clock, force=True,
                                   progress=progress)
    after = await audit(redis, keys, pg)
    report.consistent = bool(after["consistent"])
    say(f"audit after: consistent {report.consistent}")
    return report


async def run_reconcile(settings: Settings, clock: Clock) -> int:
    """`devsched rebuild --reconcile`: prints the progress and the JSON report; exit status
    0 when Redis and PostgreSQL agree afterwards, 1 when they still differ or the
    write-behind has not caught up."""
    import json
    import sys
    from dataclasses import asdict

    from pipeline.connections import pg_pool, redis_client
    from pipeline.durability import check_redis

    redis = redis_client(settings)
    pg = await pg_pool(settings)
    try:
        await check_redis(redis)
        report = await reconcile(redis, Keys(settings.prefix), pg, settings, clock,
                                 progress=lambda line: print(f"reconcile: {line}", flush=True))
    except BacklogPending as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await pg.close()
        await redis.aclose()
    print(json.dumps(asdict(report)))
    return 0 if report.consistent else 1
