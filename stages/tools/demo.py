"""`devsched demo`: the whole pipeline under a mixed load, then a consistency check.

It seeds devices of several sizes and users with varied quotas (some tight, one
suspended), starts every stage as worker processes, and runs several producers
(one Client each) with concurrent sessions for a few seconds: allocate and
release shortly after (by allocation or device id, sometimes twice), ask for
specs no device has or past the per-device quota, and take short allocations
that are left to expire. Then it waits for every expiry and for the
write-behind to drain, compares PostgreSQL with Redis, and prints a summary
whose last line is one JSON object. The billing service and the webhook are a loopback
receiver (stages/tools/receiver.py) that goes down for a while in the middle of the load;
the summary shows what it received (each closed allocation once, by allocation id) and
how many ledger rows were exported.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from redis.asyncio import Redis

from pipeline.clock import SystemClock
from pipeline.commands import migrate_database
from pipeline.connections import pg_pool, redis_client
from pipeline.durability import check_redis
from pipeline.progress import Progress
from pipeline.runner import spawn_run, stop_run
from schemas.keys import GROUP_BILL, GROUP_EVENTS, GROUP_NOTIFY, GROUP_PERSIST, Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec, Released
from stages.app import APP
from stages.settings import Settings
from stages.state import mark_state
from stages.tools.admin import (
    add_devices,
    delete_keys,
    empty_tables,
    set_quotas,
    stats,
    write_behind_drained,
)
from stages.tools.audit import audit
from stages.tools.client import Client
from stages.tools.receiver import Receiver

SIZES = ((2, 4096), (2, 4096), (4, 8192), (4, 8192), (8, 16384), (16, 32768))
SHORT_SECONDS = 2
"""Length of the allocations the demo leaves to expire."""
DRAIN_TIMEOUT_S = 60.0
DEMO_TOKEN, DEMO_SECRET = "demo-token", "demo-secret"
OUTAGE_S = 2.0
"""How long the demo's receiver is down in the middle of the load."""
PROGRESS_EVERY_S = 0.25
"""How often the demo's progress line is redrawn (on a terminal)."""


@dataclass
class DemoOptions:
    seconds: float = 8.0
    devices: int = 60
    users: int = 40
    producers: int = 4
    concurrency: int = 8
    reset: bool = False
    workers: int = 1


@dataclass
class Tally:
    requests: int = 0
    allocated: int = 0
    released: int = 0
    already_released: int = 0
    short_allocations: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def record(self, reply: Allocated | Released | Failed, started: float) -> None:
        self.requests += 1
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        if isinstance(reply, Failed):
            if reply.reason == "timed_out":
                self.lost += 1
            else:
                self.rejected[reply.reason] += 1
        elif isinstance(reply, Released):
            if reply.already_released:
                self.already_released += 1
            else:
                self.released += 1
        else:
            self.allocated += 1


def demo_devices(n: int, rng: random.Random) -> list[DeviceSpec]:
    out = []
    for i in range(n):
        cpu, mem = SIZES[i % len(SIZES)]
        out.append(DeviceSpec(
            id=f"phone-{i + 1:03d}", name=f"Cloud phone {i + 1}", model=rng.choice(["p40", "k30"]),
            host=f"node-{i % 4 + 1}", adb_host=f"10.0.0.{i % 4 + 1}", adb_port=5555 + i,
            cpu_cores=cpu, memory_mb=mem, storage_mb=32768,
        ))
    return out


def demo_quotas(n: int) -> list[QuotaSpec]:
    quotas = []
    for i in range(n):
        uid = f"user-{i + 1:03d}"
        if i == 0:
            quotas.append(QuotaSpec(user_id=uid, status="suspended"))
        elif i % 5 == 1:
            quotas.append(QuotaSpec(user_id=uid, max_devices=1))
        elif i % 7 == 2:
            quotas.append(QuotaSpec(user_id=uid, max_devices=4, total_cpu_cores=6))
        else:
            quotas.append(QuotaSpec(user_id=uid, max_devices=3))
    return quotas


async def session(client: Client, users: list[str], tally: Tally, until: float,
                  rng: random.Random) -> None:
    while time.monotonic() < until:
        user = rng.choice(users)
        roll = rng.random()
        t0 = time.perf_counter()
        if roll < 0.04:
            reply = await client.allocate(user, min_memory_mb=60_000)  # no device has it
            tally.record(reply, t0)
        elif roll < 0.07:
            reply = await client.allocate(user, min_cpu_cores=32)  # past the per-device quota
            tally.record(reply, t0)
        elif roll < 0.10:
            short = await client.allocate(user, tenant_id="demo",
                                          duration_seconds=SHORT_SECONDS)
            tally.record(short, t0)
            tally.short_allocations += isinstance(short, Allocated)
        else:
            got = await client.allocate(user, tenant_id="demo", min_cpu_cores=rng.choice((0, 2, 4)))
            tally.record(got, t0)
            if isinstance(got, Allocated):
                await asyncio.sleep(rng.uniform(0.0, 0.2))
                t1 = time.perf_counter()
                if rng.random() < 0.2:
                    rel = await client.release(device_id=got.device.id, user_id=user)
                else:
                    rel = await client.release(allocation_id=got.allocation_id, user_id=user)
                tally.record(rel, t1)
                if rng.random() < 0.05:
                    t2 = time.perf_counter()
                    tally.record(await client.release(allocation_id=got.allocation_id), t2)
        await asyncio.sleep(rng.uniform(0.0, 0.02))


async def workers_ready(redis: Redis, keys: Keys) -> bool:
    """True once every stage's group has a consumer reading."""
    wanted = {keys.requests: ["quota"], keys.admitted: ["select"], keys.ticks: ["timers"],
              keys.changes: [GROUP_PERSIST, GROUP_BILL, GROUP_NOTIFY],
              keys.events: [GROUP_EVENTS]}
    for stream, groups in wanted.items():
        try:
            info = {g["name"].decode(): g for g in await redis.xinfo_groups(stream)}
        except Exception:  # noqa: BLE001 - stream not created yet
            return False
        if any(name not in info or int(info[name]["consumers"]) == 0 for name in groups):
            return False
    return True


async def wait_for(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.1)
    return False


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def reset_state(redis: Redis, settings: Settings) -> None:
    """Start from nothing: no keys, empty tables, a fresh state marked (stages/state.py)."""
    await delete_keys(redis, settings.prefix)
    pg = await pg_pool(settings)
    await empty_tables(pg)
    await pg.close()
    await mark_state(redis, Keys(settings.prefix), by="demo", now_ms=SystemClock().now_ms())


async def demo(settings: Settings, options: DemoOptions) -> dict[str, object]:
    rng = random.Random(7)
    keys = Keys(settings.prefix)
    clock = SystemClock()
    redis = redis_client(settings)
    await check_redis(redis)
    await migrate_database(APP, settings.database_url)
    await reset_state(redis, settings)
    await add_devices(redis, keys, clock, demo_devices(options.devices, rng))
    quotas = demo_quotas(options.users)
    await set_quotas(redis, keys, clock, quotas)
    users = [q.user_id for q in quotas]
    receiver = Receiver(token=DEMO_TOKEN, secret=DEMO_SECRET)
    await receiver.start()
    say(f"seeded {options.devices} devices and {len(users)} users; receiver at {receiver.url}; "
        "starting the stages")
    workers = spawn_run(
        APP, settings, options.workers, DEVSCHED_CLAIM_IDLE_MS="5000",
        DEVSCHED_BILLING_URL=receiver.url, DEVSCHED_BILLING_TOKEN=DEMO_TOKEN,
        DEVSCHED_WEBHOOK_URL=receiver.webhook_url, DEVSCHED_WEBHOOK_SECRET=DEMO_SECRET,
        DEVSCHED_HTTP_BREAKER_OPEN_MS="1000", DEVSCHED_HTTP_BACKOFF_MAX_MS="2000")
    tally = Tally()
    try:
        clients = [Client(settings, timeout_s=10) for _ in range(options.producers)]
        for c in clients:
            await c.start()
        if not await wait_for(lambda: workers_ready(redis, keys), 30):
            raise SystemExit("the stage workers did not start within 30 s")
        say(f"driving load: {options.producers} producers x {options.concurrency} sessions "
            f"for {options.seconds:.0f} s")
        started = time.monotonic()
        until = started + options.seconds

        async def outage() -> None:
            await asyncio.sleep(options.seconds / 3)
            say(f"receiver down for {OUTAGE_S:.0f} s")
            await receiver.down()
            await asyncio.sleep(OUTAGE_S)
            await receiver.up()

        bar = Progress("demo", unit="requests")
        shown = asyncio.create_task(show_progress(bar, tally))
        await asyncio.gather(outage(), *[
            session(c, users, tally, until, random.Random(rng.random()))
            for c in clients for _ in range(options.concurrency)
        ])
        load_seconds = time.monotonic() - started
        shown.cancel()
        bar.update(tally.requests, _tally_text(tally))
        bar.done()
        for c in clients:
            await c.close()
        say("load done; waiting for expiries and the write-behind to drain")

        async def no_active() -> bool:
            return int(await redis.zcard(keys.expiry)) == 0

        await wait_for(no_active, SHORT_SECONDS + 10)
        drained = await wait_for(lambda: write_behind_drained(redis, keys), DRAIN_TIMEOUT_S)
        pg = await pg_pool(settings)

        async def exported() -> bool:
            left = await pg.fetchval("SELECT count(*) FROM billing_ledger WHERE exported_at IS NULL")
            return int(left) == 0 and int(await redis.zcard(keys.sink_retry("export"))) == 0

        say("waiting for the billing export to drain")
        drained = await wait_for(exported, DRAIN_TIMEOUT_S) and drained
        await pg.close()
    finally:
        await asyncio.to_thread(stop_run, workers, 30)
        await receiver.stop()
    pg = await pg_pool(settings)
    report = await audit(redis, keys, pg)
    async with pg.acquire() as conn:
        ledger = await conn.fetchval("SELECT count(*) FROM billing_ledger")
        exported_rows = await conn.fetchval(
            "SELECT count(*) FROM billing_ledger WHERE exported_at IS NOT NULL")
    await pg.close()
    s = await stats(redis, keys)
    await redis.aclose()
    summary: dict[str, object] = {
        "requests": tally.requests,
        "allocated": tally.allocated,
        "released": tally.released,
        "already_released": tally.already_released,
        "expired": s.expired_total,
        "rejected": dict(sorted(tally.rejected.items())),
        "lost": tally.lost,
        "latency_ms": {"p50": percentile(tally.latencies_ms, 0.50),
                       "p99": percentile(tally.latencies_ms, 0.99),
                       "max": round(max(tally.latencies_ms, default=0.0), 2)},
        "requests_per_s": round(tally.requests / load_seconds, 1),
        "pg_allocations": report["pg_allocations"],
        "redis_allocations": report["redis_allocations"],
        "redis_active": report["redis_active"],
        "billing_rows": ledger,
        "billing_exported": exported_rows,
        "receiver": {"usage_entries": len(receiver.received.usage),
                     "usage_duplicates": receiver.received.duplicates["usage"],
                     "notifications": len(receiver.received.notifications),
                     "rejected": dict(receiver.received.rejected),
                     "attempts": dict(receiver.received.attempts)},
        "breakers": s.breakers,
        "drained": drained,
        "consistent": bool(report["consistent"]) and drained
        and ledger == tally.released + s.expired_total
        and exported_rows == ledger == len(receiver.received.usage),
    }
    return summary


def _tally_text(tally: Tally) -> str:
    return (f"{tally.allocated:,} allocated, {tally.released:,} released, "
            f"{sum(tally.rejected.values()):,} rejected, {tally.lost} lost")


async def show_progress(bar: Progress, tally: Tally) -> None:
    """Redraw the demo's counts while the load runs (on a terminal only)."""
    if not bar.enabled:
        return
    while True:
        bar.update(tally.requests, _tally_text(tally))
        await asyncio.sleep(PROGRESS_EVERY_S)


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(settings: Settings, options: DemoOptions, *, external: bool) -> dict[str, object]:
    if external and not options.reset:
        raise SystemExit("demo empties the devsched tables; on servers given by URL pass --reset")
    try:
        import uvloop

        summary = uvloop.run(demo(settings, options))
    except ImportError:  # pragma: no cover
        summary = asyncio.run(demo(settings, options))
    say("summary")
    for key, value in summary.items():
        print(f"  {key:>18}: {value}")
    print(json.dumps(summary), flush=True)
    return summary
