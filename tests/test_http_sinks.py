"""The HTTP sinks against a real receiver on loopback: the billing export survives an
outage without losing or doubling an allocation, the breaker stops a storm and probes,
the receiver checks the token and the signature, and the balance check refuses overdue
users and fails open or closed as told.

The whole pipeline runs in-process on real Redis and PostgreSQL with the test's clock;
back-offs, the breaker's open period and the retry queue's due times are on that clock,
so a "30 s" outage is 30 s of the clock, not of the test. One fault test
(`pytest -m faults`) takes the real clock instead: the receiver refuses connections
for 30 s of wall time under a steady allocate/release load, and afterwards every
closed allocation has arrived exactly once, with the token, `exported_at` set, none
dead-lettered. Rows closed while the export was off reach the service by the backfill.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import httpx
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from pipeline.clock import ManualClock, SystemClock
from pipeline.http_sink import CLOSED, OPEN, CircuitBreaker
from schemas.keys import GROUP_BILL, GROUP_EXPORT, GROUP_WEBHOOK, Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec, Released, Renewed
from schemas.runtime import dead_decoder
from stages.app import serve
from stages.settings import Settings
from stages.tools.admin import stats
from stages.tools.client import Client
from stages.tools.receiver import Receiver
from stages.webhook import SIGNATURE_HEADER, signature, verify
from tests.conftest import EVENT_TIMEOUT_S, seed, wait_until

TOKEN, SECRET = "tok-123", "sec-456"
STAGES = ["quota", "select", "persist", "bill", "notify", "timers", "events", "export",
          "webhook"]


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(token=TOKEN, secret=SECRET)
    await r.start()
    yield r
    await r.stop()


def sink_settings(settings: Settings, receiver: Receiver, **more: object) -> Settings:
    fields: dict[str, object] = {
        "billing_url": receiver.url, "billing_token": TOKEN, "webhook_url": receiver.webhook_url,
        "webhook_secret": SECRET, "http_attempts": 2, "http_backoff_ms": 5,
        "http_backoff_max_ms": 2_000, "http_breaker_failures": 3, "http_breaker_open_ms": 5_000,
        "http_timeout_s": 2.0, "http_retry_budget_s": 3_600, "billing_standing_ttl_s": 1}
    fields.update(more)
    return replace(settings, **fields)  # type: ignore[arg-type]


class Running:
    def __init__(self, settings: Settings, clock: ManualClock) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(
            serve(STAGES, settings, clock, stop=self.stop, install_signals=False))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, EVENT_TIMEOUT_S)


async def up(redis: Redis, keys: Keys, running: Running) -> None:
    wanted = [(keys.requests, "quota")]
    if running.settings.billing_url:  # a sink whose URL is unset is off: no group
        wanted.append((keys.changes, GROUP_EXPORT))
    if running.settings.webhook_url:
        wanted.append((keys.notifications, GROUP_WEBHOOK))

    async def consumers() -> bool:
        assert not running.task.done(), running.task
        for stream, group in wanted:
            try:
                if not await redis.xinfo_consumers(stream, group):
                    return False
            except Exception:  # noqa: BLE001 - no group yet
                return False
        return True
    await wait_until(consumers)


async def seeded(redis: Redis, keys: Keys, clock: ManualClock, users: list[str]) -> None:
    await seed(redis, keys, clock,
               devices=[DeviceSpec(id=f"d{i}", cpu_cores=2) for i in range(8)],
               quotas=[QuotaSpec(user_id=u, max_devices=8, total_cpu_cores=64) for u in users])


async def dead_of(redis: Redis, keys: Keys, stage: str) -> list[str]:
    letters = [dead_decoder.decode(f[b"d"]) for _, f in await redis.xrange(keys.dead)]
    return [d.error for d in letters if d.stage == stage]


async def exported(pg: asyncpg.Pool, ids: list[str]) -> int:
    return int(await pg.fetchval(
        "SELECT count(*) FROM billing_ledger WHERE allocation_id = ANY($1::uuid[]) "
        "AND exported_at IS NOT NULL", ids))


async def test_outage_of_30s_loses_and_doubles_nothing(
    settings: Settings, clock: ManualClock, redis: Redis, pg: asyncpg.Pool, receiver: Receiver,
) -> None:
    s = sink_settings(settings, receiver)
    keys = Keys(s.prefix)
    await seeded(redis, keys, clock, ["alice", "bob"])
    await receiver.down()
    running = Running(s, clock)
    await up(redis, keys, running)
    closed: list[str] = []
    async with Client(s, timeout_s=EVENT_TIMEOUT_S) as client:
        for round_ in range(6):  # load while the receiver is down: 24 allocations
            got = [await client.allocate(u) for u in ("alice", "bob", "alice", "bob")]
            for a in got:
                assert isinstance(a, Allocated), a
                rel = await client.release(allocation_id=a.allocation_id)
                assert isinstance(rel, Released), rel
                closed.append(a.allocation_id)
            if round_ == 2:
                clock.advance(10_000)  # the outage goes on, on the clock
    # nothing reached the receiver; everything is parked, nothing dead
    await wait_until(lambda: _parked_at_least(redis, keys, len(closed)))
    assert receiver.received.usage == {}
    clock.advance(30_000)
    await receiver.up()

    async def drained() -> bool:
        clock.advance(1_000)  # due times and the breaker's open period pass on the clock
        return (set(receiver.received.usage) == set(closed)
                and await exported(pg, closed) == len(closed)
                and await redis.zcard(keys.sink_retry(GROUP_EXPORT)) == 0)
    await wait_until(drained)
    await running.close()
    assert len(receiver.received.usage) == len(closed) == 24
    entry = receiver.received.usage[closed[0]]
    assert set(entry) == {"entry_id", "kind", "allocation_id", "user_id", "tenant_id",
                          "device_id", "started_at_ms", "ended_at_ms", "billed_seconds",
                          "reason", "covered_from_ms", "covered_to_ms"}
    assert entry["reason"] == "released" and entry["kind"] == "final"
    assert entry["entry_id"] == entry["allocation_id"] == closed[0]
    assert entry["covered_from_ms"] == entry["started_at_ms"]
    assert await dead_of(redis, keys, GROUP_EXPORT) == []
    # the webhook got the allocation and release notifications of all, signed
    events = [n for n in receiver.received.notifications.values()
              if n.get("allocation_id") in set(closed)]
    assert {n["event"] for n in events} >= {"device.allocated", "device.released"}
    assert all("webhook" in n["channels"] for n in events)
    assert receiver.received.rejected == {}


async def _parked_at_least(redis: Redis, keys: Keys, n: int) -> bool:
    return int(await redis.zcard(keys.sink_retry(GROUP_EXPORT))) >= n


async def test_breaker_opens_on_500s_probes_half_open_and_closes(
    settings: Settings, clock: ManualClock, redis: Redis, pg: asyncpg.Pool, receiver: Receiver,
) -> None:
    # a batch tries 3 times: the first batch alone opens the breaker (3 failures in a row)
    s = sink_settings(settings, receiver, http_attempts=3)
    keys = Keys(s.prefix)
    await seeded(redis, keys, clock, ["carol"])
    receiver.set_mode("fail")
    running = Running(s, clock)
    await up(redis, keys, running)
    closed: list[str] = []
    async with Client(s, timeout_s=EVENT_TIMEOUT_S) as client:
        for _ in range(10):
            a = await client.allocate("carol")
            assert isinstance(a, Allocated)
            assert isinstance(await client.release(allocation_id=a.allocation_id), Released)
            closed.append(a.allocation_id)
    await wait_until(lambda: _parked_at_least(redis, keys, len(closed)))
    # 3 failures in a row open it: no more requests however many batches came
    opened = receiver.received.attempts["usage"]
    assert opened == s.http_breaker_failures
    assert (await stats(redis, keys)).breakers[GROUP_EXPORT] == OPEN
    await asyncio.sleep(0.5)  # the retry loop runs; the clock stands still: nothing sent
    assert receiver.received.attempts["usage"] == opened
    # the open period passes: one probe, still 500: open again, one request more
    clock.advance(s.http_breaker_open_ms)
    await wait_until(lambda: _attempts(receiver, opened + 1))
    await asyncio.sleep(0.5)
    assert receiver.received.attempts["usage"] == opened + 1
    assert (await stats(redis, keys)).breakers[GROUP_EXPORT] == OPEN
    # the service recovers: the next probe succeeds, the breaker closes, all goes out
    receiver.set_mode("ok")

    async def drained() -> bool:
        clock.advance(1_000)
        return set(receiver.received.usage) == set(closed)
    await wait_until(drained)
    await wait_until(lambda: _breaker_is(redis, keys, CLOSED))
    await running.close()
    assert await exported(pg, closed) == len(closed)
    from prometheus_client import REGISTRY
    assert REGISTRY.get_sample_value("devsched_breaker_state", {"breaker": GROUP_EXPORT}) == 0.0


async def _attempts(receiver: Receiver, n: int) -> bool:
    return receiver.received.attempts["usage"] >= n


async def _breaker_is(redis: Redis, keys: Keys, state: str) -> bool:
    return (await stats(redis, keys)).breakers.get(GROUP_EXPORT) == state


def test_breaker_states_on_the_clock() -> None:
    clock = ManualClock()
    b = CircuitBreaker("unit", failures=2, open_ms=1_000, clock=clock)
    assert b.allow()
    b.failure()
    assert b.state == CLOSED and b.allow()
    b.failure()
    assert b.state == OPEN and not b.allow()
    clock.advance(1_000)
    assert b.allow() and b.state == "half_open"
    assert not b.allow()  # one probe at a time
    b.failure()
    assert b.state == OPEN and not b.allow()
    clock.advance(1_000)
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow()


async def test_receiver_refuses_a_bad_token_or_signature(receiver: Receiver) -> None:
    body = json.dumps({"entries": [{"allocation_id": "a1"}]}).encode()
    note = json.dumps({"notifications": [{"id": "1-0", "event": "x"}]}).encode()
    async with httpx.AsyncClient(base_url=receiver.url) as http:
        bad = await http.post("/usage", content=body, headers={"Authorization": "Bearer nope"})
        none = await http.post("/usage", content=body)
        good = await http.post("/usage", content=body,
                               headers={"Authorization": f"Bearer {TOKEN}"})
        forged = await http.post("/webhook", content=note,
                                 headers={SIGNATURE_HEADER: signature("other", note)})
        tampered = await http.post("/webhook", content=note + b" ",
                                   headers={SIGNATURE_HEADER: signature(SECRET, note)})
        signed = await http.post("/webhook", content=note,
                                 headers={SIGNATURE_HEADER: signature(SECRET, note)})
    assert (bad.status_code, none.status_code, good.status_code) == (401, 401, 200)
    assert (forged.status_code, tampered.status_code, signed.status_code) == (401, 401, 200)
    assert receiver.received.rejected == {"token": 2, "signature": 2}
    assert list(receiver.received.usage) == ["a1"] and list(receiver.received.notifications) == ["1-0"]


def test_webhook_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"notifications":[]}'
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert signature(SECRET, body) == expected
    assert verify(SECRET, body, expected)
    assert not verify(SECRET, body + b"\n", expected)
    assert not verify("other", body, expected)


async def test_webhook_bodies_verify_against_their_header(
    settings: Settings, clock: ManualClock, redis: Redis, pg: asyncpg.Pool, receiver: Receiver,
) -> None:
    s = sink_settings(settings, receiver)
    keys = Keys(s.prefix)
    await seeded(redis, keys, clock, ["dave"])
    running = Running(s, clock)
    await up(redis, keys, running)
    async with Client(s, timeout_s=EVENT_TIMEOUT_S) as client:
        a = await client.allocate("dave")
        assert isinstance(a, Allocated)
        await client.release(allocation_id=a.allocation_id)
        refused = await client.allocate("nobody")
        assert isinstance(refused, Failed)

    async def both() -> bool:
        events = {n["event"] for n in receiver.received.notifications.values()}
        return {"device.allocated", "device.released", "allocation.quota_exceeded"} <= events
    await wait_until(both)
    await running.close()
    seen = receiver.received.webhook_bodies
    assert seen and receiver.received.rejected == {}
    for body, header in seen:  # checked here, apart from the project's own verify()
        assert header == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        for n in json.loads(body)["notifications"]:
            assert n["id"] and n["channels"]


async def standing_known(redis: Redis, keys: Keys, user: str) -> bool:
    return await redis.hget(keys.user(user), "billing_checked_ms") is not None


async def test_balance_check_refuses_overdue_and_fails_open(
    settings: Settings, clock: ManualClock, redis: Redis, pg: asyncpg.Pool, receiver: Receiver,
) -> None:
    s = sink_settings(settings, receiver, billing_fail_open=True)
    keys = Keys(s.prefix)
    await seeded(redis, keys, clock, ["erin", "frank"])
    receiver.set_account("erin", "overdue", -12.5)
    running = Running(s, clock)
    await up(redis, keys, running)
    async with Client(s, timeout_s=EVENT_TIMEOUT_S) as client:
        # standings unknown: fail-open admits, and the users are now seen
        held = await client.allocate("erin")
        assert isinstance(held, Allocated), held
        assert isinstance(await client.allocate("frank"), Allocated)
        await wait_until(lambda: standing_known(redis, keys, "erin"))
        await wait_until(lambda: standing_known(redis, keys, "frank"))
        overdue = await client.allocate("erin")
        assert isinstance(overdue, Failed) and overdue.reason == "billing_overdue", overdue
        # nor may she renew what she holds
        renewal = await client.renew(held.allocation_id, "erin", extend_minutes=5)
        assert isinstance(renewal, Failed) and renewal.reason == "billing_overdue", renewal
        assert isinstance(await client.allocate("frank"), Allocated)
        # the service goes down, the standings get old: fail-open still admits frank
        await receiver.down()
        clock.advance((s.billing_standing_max_age_s + 1) * 1000)
        assert isinstance(await client.allocate("frank"), Allocated)
        # erin pays: the next fetch clears her standing
        receiver.set_account("erin", "ok", 20.0)
        await receiver.up()
        clock.advance(2_000)

        async def erin_ok() -> bool:
            clock.advance(100)
            return await redis.hget(keys.user("erin"), "billing_status") == b"ok"
        await wait_until(erin_ok)
        assert isinstance(await client.allocate("erin"), Allocated)
    await running.close()
    assert receiver.received.lookups["erin"] >= 2


async def test_balance_check_fails_closed_on_unknown_or_stale_standing(
    settings: Settings, clock: ManualClock, redis: Redis, pg: asyncpg.Pool, receiver: Receiver,
) -> None:
    s = sink_settings(settings, receiver, billing_fail_open=False)
    keys = Keys(s.prefix)
    await seeded(redis, keys, clock, ["gina"])
    running = Running(s, clock)
    await up(redis, keys, running)
    async with Client(s, timeout_s=EVENT_TIMEOUT_S) as client:
        first = await client.allocate("gina")
        assert isinstance(first, Failed) and first.reason == "billing_unavailable", first
        await wait_until(lambda: standing_known(redis, keys, "gina"))
        held = await client.allocate("gina", duration_minutes=60)
        assert isinstance(held, Allocated), held
        assert isinstance(await client.renew(held.allocation_id, "gina", extend_minutes=1),
                          Renewed)
        await receiver.down()
        clock.advance((s.billing_standing_max_age_s + 1) * 1000)
        stale = await client.allocate("gina")
        assert isinstance(stale, Failed) and stale.reason == "billing_unavailable", stale
        renewal = await client.renew(held.allocation_id, "gina", extend_minutes=1)
        assert isinstance(renewal, Failed) and renewal.reason == "billing_unavailable", renewal
    await running.close()


async def test_sinks_are_off_without_urls(
    settings: Settings, clock: ManualClock, redis: Redis, pg: asyncpg.Pool,
) -> None:
    keys = Keys(settings.prefix)
    await seeded(redis, keys, clock, ["hal"])
    running = Running(settings, clock)
    await up(redis, keys, running)
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        a = await client.allocate("hal")
        assert isinstance(a, Allocated)
        await client.release(allocation_id=a.allocation_id)

    async def written_behind() -> bool:
        return await exported(pg, [a.allocation_id]) == 0 and bool(await pg.fetchval(
            "SELECT count(*) FROM billing_ledger WHERE allocation_id = $1::uuid",
            a.allocation_id))
    await wait_until(written_behind)
    await running.close()
    # off: the stages did not start, so they read nothing (no consumer group at all)
    groups = {g["name"].decode() for g in await redis.xinfo_groups(keys.changes)}
    assert GROUP_EXPORT not in groups and GROUP_BILL in groups
    assert not await redis.exists(keys.notifications) or GROUP_WEBHOOK not in {
        g["name"].decode() for g in await redis.xinfo_groups(keys.notifications)}
    assert await redis.exists(keys.sink_retry(GROUP_EXPORT), keys.billing_seen) == 0
    assert await exported(pg, [a.allocation_id]) == 0


async def test_ledger_rows_closed_while_export_was_off_are_backfilled_once_on(
    settings: Settings, clock: ManualClock, redis: Redis, pg: asyncpg.Pool, receiver: Receiver,
) -> None:
    keys = Keys(settings.prefix)
    await seeded(redis, keys, clock, ["ivy", "jon"])
    running = Running(settings, clock)  # DEVSCHED_BILLING_URL unset: the export is off
    await up(redis, keys, running)
    closed: list[str] = []
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        for user in ("ivy", "jon", "ivy", "jon", "ivy"):
            a = await client.allocate(user)
            assert isinstance(a, Allocated), a
            assert isinstance(await client.release(allocation_id=a.allocation_id), Released)
            closed.append(a.allocation_id)

    async def off_and_billed() -> bool:
        ledger = await pg.fetchval("SELECT count(*) FROM billing_ledger WHERE allocation_id "
                                   "= ANY($1::uuid[])", closed)
        return bool(ledger == len(closed))
    await wait_until(off_and_billed)
    await running.close()
    assert await exported(pg, closed) == 0  # the export was off: nothing sent

    # turned on: the changes are gone from its group, the backfill finds the rows (once
    # they ended DEVSCHED_BILLING_BACKFILL_GRACE_S ago, on the clock)
    s = sink_settings(settings, receiver, billing_backfill_grace_s=60,
                      billing_backfill_every_s=60)
    running = Running(s, clock)
    await up(redis, keys, running)
    clock.advance(61_000)

    async def backfilled() -> bool:
        return (set(receiver.received.usage) >= set(closed)
                and await exported(pg, closed) == len(closed))
    await wait_until(backfilled)
    await running.close()
    entry = receiver.received.usage[closed[0]]
    assert entry["user_id"] == "ivy" and entry["reason"] == "released"
    assert set(entry) == {"entry_id", "kind", "allocation_id", "user_id", "tenant_id",
                          "device_id", "started_at_ms", "ended_at_ms", "billed_seconds",
                          "reason", "covered_from_ms", "covered_to_ms"}
    assert entry["entry_id"] == closed[0] and entry["kind"] == "final"
    assert receiver.received.rejected == {}  # the bearer token was sent
    assert receiver.received.duplicates["usage"] == 0
    assert await dead_of(redis, keys, GROUP_EXPORT) == []


OUTAGE_S = 30.0
"""How long the receiver is down, on the wall clock, in the fault test below."""
LOAD_AROUND_S = 4.0
"""Load before the outage and after it."""


@pytest.mark.faults
async def test_receiver_down_30s_wall_clock_under_load_every_usage_arrives_once(
    settings: Settings, redis: Redis, pg: asyncpg.Pool, receiver: Receiver,
) -> None:
    """The real clock: back-offs, the breaker's open period and the retry queue's due
    times pass as they would in production while the receiver refuses connections for
    OUTAGE_S, with allocate/release cycles running before, during and after."""
    s = sink_settings(settings, receiver, http_backoff_ms=100, http_backoff_max_ms=4_000,
                      http_breaker_open_ms=2_000, http_retry_budget_s=3_600)
    keys = Keys(s.prefix)
    clock = SystemClock()
    users = [f"w{i}" for i in range(4)]
    await seed(redis, keys, clock,  # type: ignore[arg-type]
               devices=[DeviceSpec(id=f"d{i}", cpu_cores=2) for i in range(8)],
               quotas=[QuotaSpec(user_id=u, max_devices=8, total_cpu_cores=64) for u in users])
    stop = asyncio.Event()
    running = asyncio.create_task(serve(STAGES, s, clock, stop=stop, install_signals=False))
    closed: list[str] = []
    failures: list[object] = []
    loading = True

    async def cycles(client: Client, user: str) -> None:
        while loading:
            a = await client.allocate(user)
            if not isinstance(a, Allocated):
                failures.append(a)
                continue
            await asyncio.sleep(0.05)
            rel = await client.release(allocation_id=a.allocation_id)
            if isinstance(rel, Released):
                closed.append(a.allocation_id)
            else:
                failures.append(rel)
            await asyncio.sleep(0.1)

    try:
        async with Client(s, timeout_s=EVENT_TIMEOUT_S) as client:
            load = [asyncio.create_task(cycles(client, u)) for u in users]
            await asyncio.sleep(LOAD_AROUND_S)
            await receiver.down()
            down_from = len(closed)
            await asyncio.sleep(OUTAGE_S)
            during = len(closed) - down_from
            await receiver.up()
            await asyncio.sleep(LOAD_AROUND_S)
            loading = False
            await asyncio.gather(*load)

        async def drained() -> bool:
            return (set(receiver.received.usage) >= set(closed)
                    and await exported(pg, closed) == len(closed)
                    and await redis.zcard(keys.sink_retry(GROUP_EXPORT)) == 0)
        await wait_until(drained, 120)
    finally:
        stop.set()
        await asyncio.wait_for(running, EVENT_TIMEOUT_S)
    print(f"\nbilling receiver down {OUTAGE_S:.0f} s (wall clock) under load: "
          f"{len(closed)} allocations closed ({during} while it was down), received "
          f"{len(receiver.received.usage)} distinct, duplicates "
          f"{receiver.received.duplicates['usage']}, requests "
          f"{receiver.received.attempts['usage']}, refused for the token "
          f"{receiver.received.rejected['token']}", flush=True)
    assert not failures, failures[:3]
    assert during > 0  # the outage really was under load
    assert set(receiver.received.usage) == set(closed)  # nothing else, nothing missing
    assert receiver.received.duplicates["usage"] == 0  # each exactly once
    assert receiver.received.rejected == {}  # every request carried the bearer token
    assert await exported(pg, closed) == len(closed)
    assert await dead_of(redis, keys, GROUP_EXPORT) == []
