"""Sentinel URLs, replies held until a replica has the batch, and the reconcile after a
failover.

- ``redis+sentinel://`` URLs parse as the README documents, and a bad one is refused
  with what is wrong.
- With ``DEVSCHED_REPLICAS_TO_ACK=1`` on the local topology (a primary, a replica,
  three Sentinels): a batch is answered once the replica has it; with the replica
  killed its replies are held (in the held stream, not on the reply stream: nobody is
  told); once the replica is back, the select worker's sweep delivers them, exactly
  once however often it runs.
- A promoted replica that lacks an allocation PostgreSQL has, its device since given
  to someone else, and one that lacks an allocation whose device nobody took: the
  audit reports both, `rebuild --reconcile` closes the first in PostgreSQL (end
  reason ``failover``, nothing billed) and brings the second back into Redis, and the
  audit then finds both sides equal. "Lacks" is made as a replica lacks it: every
  key of the live state is put back (DUMP/RESTORE) as it was before the allocation.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis as sync_redis
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import parse_sentinel_url, redis_client, text
from pipeline.embedded import EmbeddedServerError, sentinel
from pipeline.worker import Entry
from schemas.keys import GROUP_QUOTA, GROUP_SELECT, Keys
from schemas.messages import (
    Allocated,
    AllocateRequest,
    DeviceSpec,
    QuotaSpec,
    encoder,
    reply_decoder,
)
from stages.app import serve
from stages.context import StageContext
from stages.quota import QuotaStage
from stages.select import SelectStage
from stages.settings import Settings
from stages.state import mark_state
from stages.tools.admin import add_devices, set_quotas, write_behind_drained
from stages.tools.audit import audit
from stages.tools.client import Client
from stages.tools.reconcile import reconcile
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, wait_until


def test_sentinel_url_names_sentinels_service_db_and_passwords() -> None:
    url = parse_sentinel_url(
        "redis+sentinel://:p%40ss@10.0.0.1:26379,10.0.0.2:26380,h3/mymaster/2"
        "?sentinel_password=s3")
    assert url is not None
    assert url.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("h3", 26379))
    assert (url.service, url.db, url.username, url.password, url.sentinel_password) == (
        "mymaster", 2, None, "p@ss", "s3")
    plain = parse_sentinel_url("redis+sentinel://h:1/svc")
    assert plain is not None and (plain.db, plain.password) == (0, None)
    assert parse_sentinel_url("redis://127.0.0.1:6379/0") is None
    with pytest.raises(ValueError, match="service"):
        parse_sentinel_url("redis+sentinel://h:1")
    with pytest.raises(ValueError, match="Sentinel address"):
        parse_sentinel_url("redis+sentinel://h:port/svc")


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sentinel.Topology]:
    folder = tmp_path_factory.mktemp("topo") / "sentinel"
    topo = sentinel.start(folder, down_after_ms=60_000)  # no failover in these tests
    yield topo
    sentinel.stop(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _replica_in_sync(topo: sentinel.Topology) -> bool:
    client = sync_redis.Redis.from_url(topo.server_url("replica"), socket_timeout=1)
    try:
        return bool(client.info("replication").get("master_link_status") == "up")
    except (sync_redis.RedisError, OSError):
        return False
    finally:
        client.close()


class Steps:
    """quota then select, one batch at a time, on the topology's primary."""

    def __init__(self, redis: Redis, ctx: StageContext) -> None:
        self.redis, self.keys = redis, ctx.keys
        self.quota, self.select = QuotaStage(ctx), SelectStage(ctx)
        self.reply_to = self.keys.reply("replication")

    async def read(self, stream: str, group: str) -> list[Entry]:
        reply = await self.redis.xreadgroup(group, "test", {stream: ">"}, count=100)
        return [Entry(stream, text(eid), dict(fields)) for _s, items in reply
                for eid, fields in items]

    async def allocate(self, rid: str) -> None:
        await self.redis.xadd(self.keys.requests, {"d": encoder.encode(AllocateRequest(
            request_id=rid, user_id="u1", reply_to=self.reply_to, duration_seconds=600))})
        await self.quota.handle(await self.read(self.keys.requests, GROUP_QUOTA))
        await self.select.handle(await self.read(self.keys.admitted, GROUP_SELECT))

    async def replies(self) -> list[str]:
        return [reply_decoder.decode(fields[b"d"]).request_id
                for _id, fields in await self.redis.xrange(self.reply_to)]


async def test_replies_wait_for_the_replica_and_go_out_once(
    topology: sentinel.Topology, settings: Settings, clock: ManualClock,
) -> None:
    own = replace(settings, redis_url=topology.url, replicas_to_ack=1, replicas_timeout_ms=200)
    keys = Keys(own.prefix)
    redis = redis_client(own)
    try:
        await mark_state(redis, keys, by="test", now_ms=clock.now_ms())
        await add_devices(redis, keys, clock, [DeviceSpec(id=f"d{i}") for i in range(3)])
        await set_quotas(redis, keys, clock, [QuotaSpec(user_id="u1")])
        for stream, group in ((keys.requests, GROUP_QUOTA), (keys.admitted, GROUP_SELECT)):
            await redis.xgroup_create(stream, group, id="0", mkstream=True)
        steps = Steps(redis, StageContext(redis=redis, settings=own, clock=clock))

        await steps.allocate("r1")  # the replica acknowledges: answered at once
        assert await steps.replies() == ["r1"]
        assert await redis.xlen(keys.replies_held) == 0

        sentinel.kill(topology, "replica")
        await steps.allocate("r2")  # decided and acked, but nobody is told yet
        assert await steps.replies() == ["r1"]
        held = await redis.xrange(keys.replies_held)
        assert len(held) == 1
        assert reply_decoder.decode(held[0][1][b"d"]).request_id == "r2"
        assert isinstance(reply_decoder.decode(held[0][1][b"d"]), Allocated)
        assert await redis.xlen(keys.admitted) == 2
        assert (await redis.xinfo_groups(keys.admitted))[0]["pending"] == 0
        await steps.select.periodic()  # no replica: the sweep delivers nothing
        assert await steps.replies() == ["r1"]

        topo = await asyncio.to_thread(sentinel.restart, topology, "replica")
        await wait_until(lambda: asyncio.sleep(0, _replica_in_sync(topo)))
        await steps.select.periodic()
        await steps.select.periodic()  # a second sweep finds nothing left to send
        assert await steps.replies() == ["r1", "r2"]
        assert await redis.xlen(keys.replies_held) == 0
    finally:
        await steps.select.channel.close()
        await redis.aclose()


def _priority(topo: sentinel.Topology, role: str) -> int:
    client = sync_redis.Redis.from_url(topo.server_url(role), socket_timeout=1)
    try:
        return int(client.config_get("replica-priority")["replica-priority"])
    finally:
        client.close()


def test_a_restarted_server_is_not_promotable_until_it_has_the_primarys_data(
    topology: sentinel.Topology,
) -> None:
    """A restarted server holds its own old data set until its first sync: no Sentinel
    may promote it before (replica-priority 0), and it gets the default once in sync. The
    primary is stopped here so that the sync cannot happen."""
    topo = sentinel.recorded(Path(topology.folder))
    assert topo is not None
    sentinel.kill(topo, "replica")
    primary = topo.node("primary").pid
    os.kill(primary, signal.SIGSTOP)
    try:
        with pytest.raises(EmbeddedServerError, match="stays at replica-priority 0"):
            sentinel.restart(topo, "replica", sync_timeout_s=1.0)
        topo = sentinel.recorded(Path(topology.folder))
        assert topo is not None
        assert _priority(topo, "replica") == 0
    finally:
        os.kill(primary, signal.SIGCONT)
    sentinel.make_promotable(topo, "replica")
    assert _replica_in_sync(topo)
    assert _priority(topo, "replica") == sentinel.PROMOTABLE_PRIORITY


# --- reconcile ---------------------------------------------------------------------


async def _snapshot(redis: Redis, keys: Keys) -> dict[bytes, bytes]:
    """DUMP of every key of the live state (``{pool}`` and ``{u:...}`` keys, the users set)."""
    found = [k async for k in redis.scan_iter(match=f"{keys.prefix}:{{*", count=1000)]
    found.append(keys.users.encode())
    dumps: dict[bytes, bytes] = {}
    for key in found:
        dumped = await redis.dump(key)
        if dumped is not None:
            dumps[key] = dumped
    return dumps


async def _as_replica_had_it(redis: Redis, keys: Keys, snapshot: dict[bytes, bytes]) -> None:
    """Put the live state back as the snapshot had it (what a replica that never got the
    later changes holds), the streams left as they are."""
    now = await _snapshot(redis, keys)
    if now:
        await redis.delete(*now)
    for key, dumped in snapshot.items():
        await redis.restore(key, 0, dumped, replace=True)


async def _run_pipeline(settings: Settings, clock: ManualClock) -> RunningPipeline:
    stop = asyncio.Event()
    names = ["quota", "select", "persist", "bill", "notify", "timers", "events"]
    return RunningPipeline(asyncio.create_task(
        serve(names, settings, clock, stop=stop, install_signals=False)), stop)


@pytest_asyncio.fixture
async def lost_farm(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    pg: asyncpg.Pool, clock: ManualClock,
) -> AsyncIterator[dict[str, Any]]:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1"), DeviceSpec(id="d2", cpu_cores=8)],
               quotas=[QuotaSpec(user_id="alice"), QuotaSpec(user_id="bob")])
    await wait_until(lambda: write_behind_drained(redis, keys))
    before = await _snapshot(redis, keys)
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        lost = await client.allocate("alice", request_id="lost-d1")
        kept = await client.allocate("alice", request_id="lost-d2", min_cpu_cores=8)
    assert isinstance(lost, Allocated) and isinstance(kept, Allocated)
    assert (lost.device.id, kept.device.id) == ("d1", "d2")
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    await _as_replica_had_it(redis, keys, before)  # the failover: both allocations gone
    again = await _run_pipeline(settings, clock)
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        taken = await client.allocate("bob", request_id="after-failover")  # d1 again
    assert isinstance(taken, Allocated) and taken.device.id == "d1"
    await wait_until(lambda: write_behind_drained(redis, keys))
    yield {"lost": lost, "kept": kept, "taken": taken, "pipeline": again}
    await again.close()


async def test_reconcile_repairs_what_the_promoted_replica_lacks(
    lost_farm: dict[str, Any], settings: Settings, redis: Redis, keys: Keys,
    pg: asyncpg.Pool, clock: ManualClock,
) -> None:
    lost, kept, taken = lost_farm["lost"], lost_farm["kept"], lost_farm["taken"]
    report = await audit(redis, keys, pg)
    assert not report["consistent"]
    found = {(d["id"], d["field"]) for d in report["differences"]}
    assert (lost.allocation_id, "present") in found and (kept.allocation_id, "present") in found
    assert ("d1", "active_allocations") in found  # PostgreSQL: two on d1

    fixed = await reconcile(redis, keys, pg, settings, clock)
    assert sorted(fixed.lost) == sorted([lost.allocation_id, kept.allocation_id])
    assert fixed.closed == [lost.allocation_id] and fixed.consistent
    async with pg.acquire() as conn:
        rows = {r["id"]: r for r in await conn.fetch(
            "SELECT id::text AS id, status, end_reason, duration_seconds "
            "FROM device_allocations")}
    assert (rows[lost.allocation_id]["status"], rows[lost.allocation_id]["end_reason"],
            rows[lost.allocation_id]["duration_seconds"]) == ("released", "failover", 0)
    assert rows[kept.allocation_id]["status"] == "allocated"
    assert rows[taken.allocation_id]["status"] == "allocated"
    # Redis has the kept one back (device held, in alice's usage), bob keeps d1
    assert (await redis.hget(keys.device("d2"), "alloc")) == kept.allocation_id.encode()
    assert (await redis.hget(keys.device("d1"), "alloc")) == taken.allocation_id.encode()
    assert (await audit(redis, keys, pg))["consistent"]
    # nothing left to repair: a second run writes nothing
    assert (await reconcile(redis, keys, pg, settings, clock)).differences == 0
