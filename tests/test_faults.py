"""The fault suite (`pytest -m faults`): faults under a steady load, nothing lost or doubled.

Servers of their own (`devsched up` in a data dir of the test, Redis with
``DEVSCHED_REDIS_FSYNC=always``: with the default ``everysec`` a kill -9 may lose the
last second of writes, as the README documents; here nothing answered may be lost),
and `devsched run --split` as a child: one process per stage, supervised. A load
generator in this process offers allocate/release cycles at a steady rate (open loop:
a cycle starts on schedule whatever the others do), writing raw requests to the
requests stream and reading every reply on its own reply stream, so that a second
reply to one request would be seen. Faults, in turn, each with load before and after:

- ``kill -9`` of each worker kind (quota, select, persist, bill, notify, timers), which
  the supervisor restarts; what the killed worker held is reclaimed;
- PostgreSQL stopped for ``PG_DOWN_S`` seconds, then started again by `devsched up`
  (same port: the running write-behind reconnects by itself);
- redis-server ``kill -9``, then `devsched up` starts it again from its append-only file;
- Redis emptied (FLUSHALL), then `devsched rebuild`; requests in flight at that moment
  are lost with Redis, so they time out (counted), and so is an allocation the
  write-behind had not copied yet (its interval ends at the loss).

After the load, once every allocation has ended (the short ones left active by the
Redis loss expire) and the write-behind has drained:

- every request got exactly one reply or a counted client time-out (``time-outs``: no
  reply within the load's time-out; ``lost``: no reply at all by the end, which only
  the requests in flight when Redis was emptied may be; ``doubled``: two replies or
  more, never);
- no device was held by two allocations at any moment, from the replies' times (an
  allocation whose release reply is missing ends when PostgreSQL says it ended, or
  at the Redis loss when PostgreSQL never had it);
- the ledger has exactly one row per closed allocation, none for anything else;
- `devsched audit` finds Redis and PostgreSQL consistent.

A table of faults, requests, replies, time-outs, lost and doubled is printed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from pipeline.connections import REDIS_DOWN, redis_client, stream_items, text
from pipeline.embedded import postgres
from pipeline.embedded.layout import Layout
from pipeline.embedded.process import wait_gone
from pipeline.embedded.registry import read_state
from schemas.keys import Keys
from schemas.messages import (
    Allocated,
    AllocateRequest,
    DeviceSpec,
    QuotaSpec,
    Released,
    ReleaseRequest,
    Reply,
    encoder,
    reply_decoder,
)
from stages.app import APP
from stages.settings import Settings
from stages.tools.admin import add_devices, set_quotas, write_behind_drained
from stages.tools.audit import audit
from stages.tools.receiver import Receiver
from tests.conftest import wait_until

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parent.parent
STAGES = tuple(APP.stage_names)
"""Every worker kind `devsched run --split` starts (one process each)."""
RATE = 25.0
"""Cycles started per second (each: allocate, hold, release)."""
HOLD_S = 0.2
"""How long a cycle holds its device before releasing it."""
DURATION_S = 20
"""Each allocation's duration: one whose release was lost with Redis expires then."""
TIMEOUT_S = 20.0
"""The load generator's time-out per request (a counted time-out after it)."""
LOAD_BETWEEN_S = 2.0
"""Load before each fault and after it has been dealt with."""
PG_DOWN_S = 15.0
FINAL_TIMEOUT_S = 120.0
"""How long the end may take to settle (every allocation over, the write-behind drained)."""
DEVICES = 60
USERS = 10


@dataclass
class Sent:
    """One request of the load: its phase, and every reply that came for it."""

    phase: str
    kind: str
    sent: bool = False
    timed_out: bool = False
    """No reply within TIMEOUT_S (the load's own time-out, counted)."""
    replies: list[Reply] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Alloc:
    """An allocation the load was given, and how it ended as far as the replies say."""

    phase: str
    allocation_id: str
    device_id: str
    start_ms: int
    end_ms: int | None = None


class Load:
    """The open-loop load: raw requests in, every reply read and counted (when each came,
    and how each allocation ended by its release reply)."""

    rate, hold_s, duration_s, timeout_s = RATE, HOLD_S, DURATION_S, TIMEOUT_S
    """Cycles per second, how long one holds its device, its allocation's duration, the
    time-out per request (a subclass sets its own)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self.reply_to = keys.reply("faults")
        self.requests: dict[str, Sent] = {}
        self.allocations: dict[str, Alloc] = {}
        self.phase = "start"
        self.stopping = False
        self.reading = True
        self.n = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.answered_at: list[float] = []
        self.released: dict[str, str] = {}
        """Allocation id -> how its release reply said it ended: ``released``, or
        ``expired`` when the release came after its time ran out (already_released)."""

    async def read_replies(self) -> None:
        last = "0-0"
        while self.reading:
            try:
                got = await self.redis.execute_command(  # type: ignore[no-untyped-call]
                    "XREAD", "COUNT", 500, "BLOCK", 200, "STREAMS", self.reply_to, last)
            except REDIS_DOWN:
                await asyncio.sleep(0.2)
                continue
            for _stream, items in stream_items(got):
                for entry_id, fields in items:
                    last = text(entry_id)
                    pairs = fields if isinstance(fields, dict) else dict(
                        zip(fields[::2], fields[1::2]))
                    reply = reply_decoder.decode(pairs[b"d"])
                    sent = self.requests.get(reply.request_id)
                    if sent is not None:
                        sent.replies.append(reply)
                        sent.done.set()

    async def send(self, rid: str, kind: str, payload: bytes) -> Reply | None:
        """One request; its first reply, or None (not sent, or timed out)."""
        sent = self.requests[rid] = Sent(self.phase, kind)
        try:
            await self.redis.xadd(self.keys.requests, {"d": payload})
        except REDIS_DOWN:
            return None  # never reached Redis: not a request of the system's
        sent.sent = True
        try:
            await asyncio.wait_for(sent.done.wait(), self.timeout_s)
        except TimeoutError:
            sent.timed_out = True
            return None
        self.answered_at.append(time.monotonic())
        return sent.replies[0]

    async def cycle(self, n: int) -> None:
        user = f"u{n % USERS}"
        got = await self.send(f"a{n}", "allocate", encoder.encode(AllocateRequest(
            request_id=f"a{n}", user_id=user, reply_to=self.reply_to,
            duration_seconds=self.duration_s)))
        if not isinstance(got, Allocated):
            return
        self.allocations[got.allocation_id] = Alloc(self.phase, got.allocation_id,
                                                    got.device.id, got.allocated_at_ms)
        await asyncio.sleep(self.hold_s)
        done = await self.send(f"r{n}", "release", encoder.encode(ReleaseRequest(
            request_id=f"r{n}", allocation_id=got.allocation_id, user_id=user,
            reply_to=self.reply_to)))
        if isinstance(done, Released):
            self.allocations[got.allocation_id].end_ms = done.released_at_ms
            self.released[got.allocation_id] = done.status

    async def run(self) -> None:
        started = time.monotonic()
        while not self.stopping:
            self.n += 1
            task = asyncio.create_task(self.cycle(self.n))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            await asyncio.sleep(max(0.0, started + self.n / self.rate - time.monotonic()))

    async def finish(self) -> None:
        self.stopping = True
        while self.tasks:
            await asyncio.gather(*list(self.tasks))


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stages.tools.cli", *args], env=env,
                          capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)


def _start_run(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`devsched run --split` as a child, its output in ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "stages.tools.cli", "run", "--split"],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


async def settle(redis: Redis, keys: Keys, timeout: float, log_path: Path) -> None:
    """Wait until every allocation is over (those whose release Redis lost expire) and
    the write-behind has drained; past ``timeout`` fail with what is left: the expiry
    set, each group's state on the changes and ticks streams, the run's last lines."""
    async def settled() -> bool:
        return (int(await redis.zcard(keys.expiry)) == 0
                and await write_behind_drained(redis, keys))
    try:
        await wait_until(settled, timeout)
    except AssertionError:
        left = await redis.zrange(keys.expiry, 0, 4, withscores=True)
        groups = {}
        for stream in (keys.changes, keys.ticks):
            last = await redis.xrevrange(stream, count=1)
            groups[stream] = {"last": text(last[0][0]) if last else None, "groups": [
                {text(k): text(v) if isinstance(v, bytes) else v for k, v in g.items()}
                for g in await redis.xinfo_groups(stream)]}
        lines = log_path.read_text(errors="replace").splitlines()[-60:]
        raise AssertionError(
            f"not settled in {timeout:.0f} s: expiry {await redis.zcard(keys.expiry)} "
            f"(first {left}, now {int(time.time() * 1000)}), streams {groups}; "
            "the run's last lines:\n" + "\n".join(lines)) from None


def _workers(run_pid: int) -> dict[str, int]:
    """Stage name -> pid of the worker processes `devsched run --split` supervises."""
    found: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == run_pid and b"worker" in args:
            found[args[-2].decode() if args[-1] == b"" else args[-1].decode()] = int(proc.name)
    return found


async def _restarted(run_pid: int, stage: str, old: int) -> bool:
    pid = _workers(run_pid).get(stage)
    return pid is not None and pid != old


def _pg_ended(rows: dict[str, asyncpg.Record], aid: str) -> int | None:
    row = rows.get(aid)
    return None if row is None or row["released_ms"] is None else int(row["released_ms"])


def overlaps(allocs: list[Alloc]) -> list[tuple[Alloc, Alloc]]:
    """Pairs of allocations of one device whose intervals [start, end) overlap. An empty
    interval (end = start) holds the device for no time and overlaps nothing: that is how
    `rebuild --reconcile` closes an allocation lost with a failed primary whose device
    was given again since (stages/tools/reconcile.py), e.g. one the old primary made on
    a device whose release the promoted replica never got."""
    by_device: dict[str, list[Alloc]] = {}
    for a in allocs:
        if a.end_ms == a.start_ms:
            continue
        by_device.setdefault(a.device_id, []).append(a)
    found = []
    for items in by_device.values():
        items.sort(key=lambda a: a.start_ms)
        for before, after in itertools.pairwise(items):
            assert before.end_ms is not None
            if after.start_ms < before.end_ms:
                found.append((before, after))
    return found


async def test_faults_under_load_lose_and_double_nothing(
    settings: Settings, tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    # the HTTP sinks on (a real loopback receiver), so that every stage runs and is killed
    receiver = Receiver(token="faults-token", secret="faults-secret")
    await receiver.start()
    env.update(DEVSCHED_DATA_DIR=str(data), DEVSCHED_REDIS_FSYNC="always",
               DEVSCHED_PREFIX="faults", DEVSCHED_CLAIM_IDLE_MS="2000",
               DEVSCHED_CLAIM_EVERY_MS="500", DEVSCHED_LOG_FORMAT="text",
               DEVSCHED_BILLING_URL=receiver.url, DEVSCHED_BILLING_TOKEN="faults-token",
               DEVSCHED_WEBHOOK_URL=receiver.webhook_url, DEVSCHED_WEBHOOK_SECRET="faults-secret",
               DEVSCHED_BILLING_BACKFILL_EVERY_S="2", DEVSCHED_BILLING_BACKFILL_GRACE_S="2",
               DEVSCHED_HTTP_BREAKER_OPEN_MS="1000", DEVSCHED_HTTP_BACKOFF_MAX_MS="2000")
    up = await asyncio.to_thread(_cli, env, "up")
    assert up.returncode == 0, up.stderr
    urls = dict(line.split("=", 1) for line in up.stdout.splitlines() if "_URL=" in line)
    own = replace(settings, redis_url=urls["REDIS_URL"], database_url=urls["DATABASE_URL"],
                  prefix="faults")
    keys, layout = Keys(own.prefix), Layout.of(data)
    redis = redis_client(own)
    run: subprocess.Popen[bytes] | None = None
    table: list[tuple[str, Counter[str]]] = []
    flushed_at_ms: int | None = None
    try:
        from pipeline.clock import SystemClock
        clock = SystemClock()
        await add_devices(redis, keys, clock, [DeviceSpec(id=f"d{i:02d}") for i in range(DEVICES)])
        await set_quotas(redis, keys, clock, [QuotaSpec(user_id=f"u{i}", max_devices=DEVICES)
                                              for i in range(USERS)])
        run = await asyncio.to_thread(_start_run, env, tmp_path / "run.log")
        run_pid = run.pid
        await wait_until(lambda: asyncio.sleep(0, set(_workers(run_pid)) == set(STAGES)))

        load = Load(redis, keys)
        reader = asyncio.create_task(load.read_replies())
        generator = asyncio.create_task(load.run())

        async def phase(name: str) -> None:
            load.phase = name
            await asyncio.sleep(LOAD_BETWEEN_S)

        await phase("steady")
        for stage in STAGES:
            await phase(f"kill -9 {stage}")
            old = _workers(run_pid)[stage]
            os.kill(old, signal.SIGKILL)
            await wait_until(lambda s=stage, o=old: _restarted(run_pid, s, o))  # type: ignore[misc]
            await asyncio.sleep(LOAD_BETWEEN_S)

        await phase(f"postgres down {PG_DOWN_S:.0f} s")
        pg_record = read_state(layout).postgres
        assert pg_record is not None
        await asyncio.to_thread(postgres.stop, layout, pg_record)
        await asyncio.sleep(PG_DOWN_S)
        restarted = await asyncio.to_thread(_cli, env, "up")
        assert restarted.returncode == 0, restarted.stderr
        assert urls["DATABASE_URL"] in restarted.stdout  # the same port
        await asyncio.sleep(LOAD_BETWEEN_S)

        await phase("redis kill -9, up")
        redis_record = read_state(layout).redis
        assert redis_record is not None
        os.kill(redis_record.pid, signal.SIGKILL)
        assert await asyncio.to_thread(wait_gone, redis_record.pid, 10.0)
        back = await asyncio.to_thread(_cli, env, "up")
        assert back.returncode == 0, back.stderr
        assert "rebuilding" not in back.stdout  # its append-only file had it all
        await asyncio.sleep(LOAD_BETWEEN_S)

        await phase("redis emptied, rebuild")
        flushed_at_ms = clock.now_ms()
        await redis.flushall()
        rebuilt = await asyncio.to_thread(_cli, env, "rebuild")
        assert rebuilt.returncode == 0, rebuilt.stderr + rebuilt.stdout
        await asyncio.sleep(LOAD_BETWEEN_S)
        load.phase = "after"
        await asyncio.sleep(LOAD_BETWEEN_S)

        await load.finish()
        generator.cancel()
        assert run.poll() is None  # the supervisor itself never died

        # the end: every allocation over (those Redis lost the release of expire), all
        # of it in PostgreSQL
        await settle(redis, keys, FINAL_TIMEOUT_S, tmp_path / "run.log")

        async def exported_all() -> bool:  # the billing export caught up (backfill included)
            conn = await asyncpg.connect(own.database_url)
            try:
                return int(await conn.fetchval(
                    "SELECT count(*) FROM billing_ledger WHERE exported_at IS NULL")) == 0
            finally:
                await conn.close()
        await wait_until(exported_all, FINAL_TIMEOUT_S)
        load.reading = False  # a reply still missing now never comes: that request is lost
        await asyncio.wait_for(reader, 10)

        pg = await asyncpg.create_pool(own.database_url, min_size=1, max_size=2)
        assert pg is not None
        try:
            async with pg.acquire() as conn:
                rows = {r["id"]: r for r in await conn.fetch(
                    "SELECT id::text AS id, status, round(extract(epoch FROM released_at) "
                    "* 1000)::bigint AS released_ms FROM device_allocations")}
                ledger = Counter(r["allocation_id"] for r in await conn.fetch(
                    "SELECT allocation_id::text AS allocation_id FROM billing_ledger"))
            report = await audit(redis, keys, pg)
        finally:
            await pg.close()

        # how each allocation ended: its release reply, else PostgreSQL, else the loss
        unknown, cut_by_loss = [], 0
        for a in load.allocations.values():
            if a.end_ms is None:
                a.end_ms = _pg_ended(rows, a.allocation_id)
            if a.end_ms is None and a.allocation_id not in rows and flushed_at_ms is not None \
                    and a.start_ms <= flushed_at_ms:
                a.end_ms = flushed_at_ms  # lost with Redis before PostgreSQL had it
                cut_by_loss += 1
            if a.end_ms is None:
                unknown.append(a)
        assert not unknown, unknown[:5]
        doubled_devices = overlaps(list(load.allocations.values()))

        phases: dict[str, Counter[str]] = {}
        for sent in load.requests.values():
            tally = phases.setdefault(sent.phase, Counter())
            if not sent.sent:
                tally["unsent"] += 1
                continue
            tally["requests"] += 1
            if sent.timed_out:
                tally["time-outs"] += 1
            if not sent.replies:
                tally["lost"] += 1  # no reply at all, even by the end
            elif len(sent.replies) == 1 and not sent.timed_out:
                tally["replies"] += 1
            if len(sent.replies) > 1:
                tally["doubled"] += 1
        for before, after in doubled_devices:
            phases.setdefault(after.phase, Counter())["overlaps"] += 1
        table = list(phases.items())
        columns = ("requests", "replies", "time-outs", "lost", "doubled", "overlaps", "unsent")
        lines = [f"{'fault':<24}" + "".join(f"{c:>10}" for c in columns)]
        for name, tally in table:
            lines.append(f"{name:<24}" + "".join(f"{tally[c]:>10}" for c in columns))
        total = sum((t for _n, t in table), Counter())
        lines.append(f"{'total':<24}" + "".join(f"{total[c]:>10}" for c in columns))
        print("\nfault suite (DEVSCHED_REDIS_FSYNC=always, " f"{RATE:.0f} cycles/s):\n"
              + "\n".join(lines) + f"\nallocations {len(load.allocations)} ({cut_by_loss} "
              f"lost with Redis before the write-behind copied them), rows in PostgreSQL "
              f"{len(rows)}, ledger rows {sum(ledger.values())} (one per closed allocation), "
              f"audit consistent {report['consistent']}", flush=True)

        assert total["doubled"] == 0 and not doubled_devices, (lines, doubled_devices[:3])
        assert total["requests"] == total["replies"] + total["time-outs"]
        # time-outs, and requests never answered, only where Redis itself lost the requests
        # in flight (emptied); every other fault only delays answers
        assert all(t["time-outs"] == t["lost"] == 0 for n, t in table
                   if n != "redis emptied, rebuild"), lines
        closed = {aid for aid, r in rows.items() if r["status"] != "allocated"}
        assert closed == set(rows)  # every allocation is over
        assert set(ledger) == closed and max(ledger.values()) == 1
        # every closed allocation reached the billing service (its dedupe view: once each)
        assert set(receiver.received.usage) == set(ledger), \
            (len(receiver.received.usage), len(ledger))
        print(f"billing export: {len(receiver.received.usage)} entries received for "
              f"{len(ledger)} ledger rows ({receiver.received.duplicates['usage']} sent again "
              f"and deduplicated), {len(receiver.received.notifications)} notifications by "
              "webhook", flush=True)
        assert report["consistent"], json.dumps(report["differences"][:5], default=str)
    finally:
        if run is not None and run.poll() is None:
            run.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(run.wait, 60)
            except subprocess.TimeoutExpired:
                run.kill()
        await redis.aclose()
        await receiver.stop()
        await asyncio.to_thread(_cli, env, "down")
        del table
