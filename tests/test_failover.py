"""Failover under load (`pytest -m faults`): kill -9 the primary, Sentinel promotes the replica.

Servers of their own: `devsched up --sentinel` (a primary, a replica and three
Sentinels on loopback, judging the primary down after ``DOWN_AFTER_MS``; the
PostgreSQL of the test's data dir), and `devsched run --split` as a child, every
worker, like the load generator here, given the ``redis+sentinel://`` URL. The load
(open loop, as in tests/test_faults.py) offers allocate/release cycles; after
``LOAD_BEFORE_S`` the primary gets SIGKILL, the Sentinels promote the replica, every
client finds it by itself, the old primary is started again (as a supervisor would) and
rejoins as the new primary's replica, and the load runs on for ``LOAD_AFTER_S``.

The replica lags for real at the moment of the kill. At the load's pace replication
keeps up within milliseconds, so a plain kill loses nothing in either mode and the test
could not tell them apart. So, ``LOAD_BEFORE_S`` in, the replica gets SIGSTOP, and a
``FILLER_BYTES`` value (a key under the test's prefix, far more than the loopback
socket buffers hold in both directions) is written to the primary: the primary's copy
of the replication stream to the replica cannot drain into the kernel, so every change
after the filler, the load's answered allocations and releases of the next ``LAG_S``
included, sits in the primary's own output buffer. Then the primary gets SIGKILL (its
output buffer dies with it; what the kernel held still reaches the replica, which drops
the filler's partial command) and the replica SIGCONT. The Sentinels promote it
although it was stopped: a Sentinel only passes over a replica that is judged down, has
not answered a PING or an INFO within 5 s, has a ``replica-priority`` of 0, or was cut
from its primary for over ten ``down-after`` periods more than the primary has been
down; stopped for ``LAG_S`` (< 5 s) and continued at the kill, by the time the
Sentinels agree the primary is down (``DOWN_AFTER_MS`` later) it answers again, and its
link to the primary broke only at the kill. (``min-replicas-to-write`` is not set: the
primary keeps taking writes while its replica is stopped, as a production primary with
that default would.) ``replica-lazy-flush`` plays no part: it only decides how a replica
frees its old data set on a full resync (the old primary's, when it rejoins). (With
``DEVSCHED_REPLICAS_TO_ACK=1`` and one replica, nothing is answered between the
promotion and that rejoin: no replica could acknowledge it; the replies are held, not
lost, and go out once it is back.) Then, once every
allocation has ended and the write-behind has drained, the test reports (printed):

- requests sent, replies, client time-outs (no reply within ``TIMEOUT_S``; a request
  the old primary took but never replicated is lost with it), doubled replies and,
  of those, conflicting ones. With ``DEVSCHED_REPLICAS_TO_ACK=0`` a request the replica
  got but not its answer is done again by the promoted replica: its producer hears
  twice, maybe differently. With 1 a producer may hear the same answer twice (the old
  primary delivered a held reply, and its removal from the held stream never reached
  the replica, whose sweep delivers it again; the client keeps the first reply of a
  request and drops the rest), never two different ones: conflicting is 0;
- answered-but-missing: allocations the load was told about (an ``allocated`` reply)
  that the promoted primary does not know (neither active nor closed), those it knows
  on another device (lost, then done again from the request), and releases it was
  told about that the promoted primary undid; with ``DEVSCHED_REPLICAS_TO_ACK=1``
  both must be 0 (an answer goes out only once the replica has the batch);
- devices held twice: two allocations that exist after the failover whose intervals
  on one device overlap (from the replies, PostgreSQL for the ends), and the audit's
  own check that no two active allocations share a device: 0 in every mode;
- the time without service: the longest stretch, from the kill on, without a reply;
- the audit after the drain, then `devsched rebuild --reconcile` when it found
  differences (the promoted replica lacks a change PostgreSQL already has), and the
  audit after it, which must find Redis and PostgreSQL consistent.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from pipeline.clock import SystemClock
from pipeline.connections import redis_client
from pipeline.embedded import sentinel
from pipeline.embedded.process import log_tail
from schemas.keys import Keys
from schemas.messages import (
    DeviceSpec,
    QuotaSpec,
    encoder,
)
from stages.app import APP
from stages.settings import Settings
from stages.tools.admin import add_devices, set_quotas
from stages.tools.audit import audit
from tests.conftest import wait_until
from tests.test_faults import (
    STAGES,
    Alloc,
    Load,
    _cli,
    _start_run,
    _workers,
    overlaps,
    settle,
)

pytestmark = pytest.mark.faults

RATE = 25.0
"""Cycles started per second (each: allocate, hold, release)."""
HOLD_S = 0.2
DURATION_S = 6
"""Each allocation's duration: one whose release was lost expires then."""
TIMEOUT_S = 8.0
"""The load's time-out per request (counted)."""
LOAD_BEFORE_S = 3.0
LAG_S = 1.5
"""How long the replica is stopped, under load, before the primary is killed."""
FILLER_BYTES = 64 << 20
"""The value written while the replica is stopped: more than the socket buffers of
the replication link (here at most 4 MB to send, 32 MB to receive) can take."""
LOAD_AFTER_S = 5.0
DOWN_AFTER_MS = 1_000
FAILOVER_TIMEOUT_MS = 3_000
FINAL_TIMEOUT_S = 60.0
DEVICES = 40
USERS = 10


class FailoverLoad(Load):
    """The load of tests/test_faults.py with this test's timings."""

    rate, hold_s, duration_s, timeout_s = RATE, HOLD_S, DURATION_S, TIMEOUT_S


def _longest_gap(times: list[float], since: float) -> float:
    """The longest time from ``since`` on without a reply."""
    after = sorted(t for t in times if t >= since)
    points = [since, *after]
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


ROLE_EVENTS = ("+sdown", "-sdown", "+odown", "-odown", "+switch-master", "+promoted-slave",
               "+failover-end", "+convert-to-slave", "+slave ", "MASTER MODE enabled",
               "Connecting to MASTER", "REPLICAOF")
"""Lines of the servers' and Sentinels' logs that say who was primary when."""


def what_happened(tmp_path: Path) -> str:
    """For a failing assertion: every role change and down judgement the servers and the
    Sentinels logged (who was primary when), then the last lines of the run's log."""
    events = [f"{log.parent.name}: {line}"
              for log in sorted((tmp_path / "data" / "sentinel").glob("*/server.log"))
              for line in log.read_text(errors="replace").splitlines()
              if any(event in line for event in ROLE_EVENTS)]
    return "\n".join(["role changes:", *events[-60:], "run log:", log_tail(tmp_path / "run.log", 40)])


def require(ok: bool, detail: str, tmp_path: Path) -> None:
    """Fail with ``detail`` and :func:`what_happened` unless ``ok`` (pytest.fail: an
    assertion's message would be cut short)."""
    if not ok:
        pytest.fail(f"{detail}\n{what_happened(tmp_path)}", pytrace=False)


@pytest.mark.parametrize("replicas_to_ack", [1, 0])
async def test_primary_killed_under_load_sentinel_promotes_replica(
    settings: Settings, tmp_path: Path, replicas_to_ack: int,
) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(DEVSCHED_DATA_DIR=str(data), DEVSCHED_REDIS_FSYNC="everysec",
               DEVSCHED_PREFIX="failover", DEVSCHED_CLAIM_IDLE_MS="2000",
               DEVSCHED_CLAIM_EVERY_MS="500", DEVSCHED_LOG_FORMAT="text",
               DEVSCHED_REPLICAS_TO_ACK=str(replicas_to_ack))
    up = await asyncio.to_thread(_cli, env, "up", "--sentinel", "--down-after-ms",
                                 str(DOWN_AFTER_MS), "--failover-timeout-ms",
                                 str(FAILOVER_TIMEOUT_MS))
    assert up.returncode == 0, up.stderr
    urls = dict(line.split("=", 1) for line in up.stdout.splitlines() if "_URL=" in line)
    assert urls["REDIS_URL"].startswith("redis+sentinel://")
    # `devsched env` (REDIS_URL unset) names the same Sentinels while they run
    exported = await asyncio.to_thread(_cli, env, "env")
    assert f"export REDIS_URL='{urls['REDIS_URL']}'" in exported.stdout.splitlines()
    env.update(REDIS_URL=urls["REDIS_URL"], DATABASE_URL=urls["DATABASE_URL"])
    topo = sentinel.recorded(data / "sentinel")
    assert topo is not None
    own = replace(settings, redis_url=urls["REDIS_URL"], database_url=urls["DATABASE_URL"],
                  prefix="failover")
    keys = Keys(own.prefix)
    redis = redis_client(own)
    run: subprocess.Popen[bytes] | None = None
    try:
        clock = SystemClock()
        await add_devices(redis, keys, clock, [DeviceSpec(id=f"d{i:02d}")
                                               for i in range(DEVICES)])
        await set_quotas(redis, keys, clock, [QuotaSpec(user_id=f"u{i}", max_devices=DEVICES)
                                              for i in range(USERS)])
        run = await asyncio.to_thread(_start_run, env, tmp_path / "run.log")
        run_pid = run.pid
        # the HTTP sinks' stages are off here (no URLs): every other stage has its worker
        running = set(APP.running_stages(STAGES, own))
        assert running == set(STAGES) - {"export", "webhook"}
        await wait_until(lambda: asyncio.sleep(0, set(_workers(run_pid)) == running))

        load = FailoverLoad(redis, keys)
        reader = asyncio.create_task(load.read_replies())
        generator = asyncio.create_task(load.run())
        load.phase = "before"
        await asyncio.sleep(LOAD_BEFORE_S)

        # the replica lags: stopped, and the stream to it blocked behind the filler
        load.phase = "lag"
        filler = f"{keys.prefix}:failover_filler"
        replica_pid = topo.node("replica").pid
        os.kill(replica_pid, signal.SIGSTOP)
        try:
            await redis.set(filler, b"x" * FILLER_BYTES)
            await asyncio.sleep(LAG_S)
            load.phase = "failover"
            killed_at = time.monotonic()
            sentinel.kill(topo, "primary")
        finally:
            os.kill(replica_pid, signal.SIGCONT)
        await wait_until(lambda: asyncio.sleep(0, sentinel.current_primary_port(topo)
                                               == topo.node("replica").port))
        promoted_after = time.monotonic() - killed_at
        # the old primary comes back (a supervisor restarts it) as a replica of the new
        # one: until then the promoted primary has no replica to acknowledge a batch
        topo = await asyncio.to_thread(sentinel.restart, topo, "primary")
        await asyncio.sleep(LOAD_AFTER_S)
        await load.finish()
        generator.cancel()
        assert run.poll() is None  # the supervisor never died

        await settle(redis, keys, FINAL_TIMEOUT_S, tmp_path / "run.log")
        await redis.delete(filler)  # should the promoted replica have got all of it
        load.reading = False
        await asyncio.wait_for(reader, 10)

        # what the promoted primary knows of what the load was told
        missing: list[Alloc] = []
        moved: list[Alloc] = []
        for a in load.allocations.values():
            device = await redis.hget(keys.allocation(a.allocation_id), "device_id")
            if device is None:
                missing.append(a)
            elif device.decode() != a.device_id:
                moved.append(a)  # lost, then redone from its request on another device
        undone = []
        late = 0
        for aid, told in load.released.items():
            # undone: the release reply said how it ended (released; or expired, when the
            # release came after its time ran out, as one held behind the failover may),
            # and the promoted primary has it otherwise: still active, or expired since
            late += told == "expired"
            status = await redis.hget(keys.allocation(aid), "status")
            if status is not None and status.decode() != told:
                undone.append(aid)

        pg = await asyncpg.create_pool(own.database_url, min_size=1, max_size=2)
        assert pg is not None
        try:
            first = await audit(redis, keys, pg)
            reconciled = None
            if not first["consistent"]:
                fixed = await asyncio.to_thread(_cli, env, "rebuild", "--reconcile")
                assert fixed.returncode == 0, fixed.stderr + fixed.stdout
                reconciled = fixed.stdout.strip().splitlines()[-1]
                # a lost allocation reconcile kept is active again: it expires (its
                # time is up), and the write-behind records that
                await settle(redis, keys, FINAL_TIMEOUT_S, tmp_path / "run.log")
            final = await audit(redis, keys, pg)
            async with pg.acquire() as conn:
                rows = {r["id"]: r for r in await conn.fetch(
                    "SELECT id::text AS id, device_id, round(extract(epoch FROM allocated_at)"
                    " * 1000)::bigint AS start_ms, round(extract(epoch FROM released_at) "
                    "* 1000)::bigint AS end_ms FROM device_allocations")}
        finally:
            await pg.close()

        # devices held twice, among the allocations that exist after the failover: the
        # load's (ended by their release reply, else by PostgreSQL) and PostgreSQL's own
        lost = {a.allocation_id for a in missing + moved}
        existing: dict[str, Alloc] = {}
        for aid, row in rows.items():
            existing[aid] = Alloc("pg", aid, row["device_id"], int(row["start_ms"]),
                                  None if row["end_ms"] is None else int(row["end_ms"]))
        for a in load.allocations.values():
            if a.allocation_id in lost:
                continue
            known = existing.get(a.allocation_id)
            end = a.end_ms if a.end_ms is not None else (known.end_ms if known else None)
            existing[a.allocation_id] = replace(a, end_ms=end)
        open_ended = [a for a in existing.values() if a.end_ms is None]
        require(not open_ended, f"open after the reconcile: {open_ended[:5]}\nfirst audit: "
                f"{first['differences'][:10]}\nreconcile: {reconciled}", tmp_path)
        held_twice = overlaps(list(existing.values()))
        shared = [d for d in final["differences"] if d["field"] == "active_allocations"]

        tally: Counter[str] = Counter()
        for sent in load.requests.values():
            if not sent.sent:
                tally["unsent"] += 1
                continue
            tally["requests"] += 1
            tally["replies"] += bool(sent.replies)
            tally["time-outs"] += sent.timed_out
            tally["doubled"] += len(sent.replies) > 1
            tally["conflicting"] += len({encoder.encode(r) for r in sent.replies}) > 1
        gap = _longest_gap(load.answered_at, killed_at)
        lagged = Counter(a.phase for a in load.allocations.values())
        print(f"\nfailover (DEVSCHED_REPLICAS_TO_ACK={replicas_to_ack}, {RATE:.0f} cycles/s, "
              f"down-after {DOWN_AFTER_MS} ms, replica stopped {LAG_S} s before the kill "
              f"behind a {FILLER_BYTES >> 20} MB write): requests {tally['requests']}, replies "
              f"{tally['replies']}, client time-outs {tally['time-outs']}, unsent "
              f"{tally['unsent']}, doubled replies {tally['doubled']} (conflicting "
              f"{tally['conflicting']}); allocations answered "
              f"{len(load.allocations)} ({lagged['lag']} while the replica lagged), answered but missing afterwards {len(missing)}, "
              f"answered with another device afterwards {len(moved)}, "
              f"releases answered but undone {len(undone)} ({late} answered as expired "
              f"already); devices held twice "
              f"{len(held_twice)}; replica promoted after {promoted_after:.1f} s, time "
              f"without service {gap:.1f} s; audit after drain consistent "
              f"{first['consistent']} ({len(first['differences'])} differences), "
              f"reconcile {reconciled or 'not needed'}, audit after "
              f"{final['consistent']}", flush=True)

        require(not held_twice and not shared, f"held twice {held_twice[:3]}, shared "
                f"{shared[:3]}", tmp_path)
        assert tally["requests"] == tally["replies"] + tally["time-outs"] - sum(
            1 for s in load.requests.values() if s.timed_out and s.replies)
        if replicas_to_ack >= 1:
            require(not missing and not moved and not undone, f"missing {missing[:3]}, moved "
                    f"{moved[:3]}, undone {undone[:3]}", tmp_path)
            assert tally["conflicting"] == 0
        elif lagged["lag"]:
            # answered while the replica lagged: behind the filler, never replicated
            assert missing or moved or undone
        require(final["consistent"], f"audit after: {final['differences'][:5]}", tmp_path)
    finally:
        if run is not None and run.poll() is None:
            run.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(run.wait, 60)
            except subprocess.TimeoutExpired:
                run.kill()
        await redis.aclose()
        await asyncio.to_thread(_cli, env, "down")
