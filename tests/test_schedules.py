"""Global interval schedules (SPEC E1-E6), with the injected clock.

A tenant on each tier is metered at its tier's interval (interim ledger rows counted per
period); an override moves a tenant to its custom interval and back to its tier when it
expires; batches split at capacity with staggered offsets and consolidate on rebalance;
plan changes under concurrent readers and runs never show a tenant in two batches or in
none (hypothesis); a failing tenant is retried at 5, 15 and 45 minutes, then permanently
failed, and a retry by command brings it back; interim plus final ledger rows add up to
the allocation's exact length, and the billing export gets the interim entries under
their own entry ids; the usage report writes per-pool and total rows once per period;
tenant events apply once; validation finds each kind of fault; the CLI does what the
issue's check does.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from itertools import pairwise
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import redis_client
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, QuotaSpec, Released
from schemas.rows import TenantOp
from stages.app import serve
from stages.context import StageContext
from stages.schedules import (
    KINDS,
    apply_tenants,
    as_list,
    dump,
    run_schedules,
    schedule_views,
    set_override,
)
from stages.settings import Settings
from stages.tools.client import Client
from stages.tools.schedules import failures, rebalance, retry, trigger, validate
from stages.tools.tenants import set_tenant
from tests.conftest import EVENT_TIMEOUT_S, seed, wait_until
from tests.test_admin import devsched_command

DAY = 86_400_000
MIN = 60_000


@pytest_asyncio.fixture
async def sctx(redis: Redis, settings: Settings, clock: ManualClock,
               pg: asyncpg.Pool) -> StageContext:
    """A timers worker's context, the clock one second after a day boundary (so that the
    boundaries of the tiers fall where the tests count them)."""
    clock.advance(DAY - clock.now_ms() % DAY + 1_000)
    return StageContext(redis=redis, settings=settings, clock=clock, pg=pg)


@pytest_asyncio.fixture
async def allocating(settings: Settings, clock: ManualClock, pg: asyncpg.Pool,
                     redis: Redis) -> AsyncIterator[None]:
    """The request path and the write-behind in this event loop, without the timers (the
    test runs the schedules itself)."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(["quota", "select", "persist", "bill", "events"],
                                     settings, clock, stop=stop, install_signals=False))

    async def up() -> bool:
        assert not task.done()
        try:
            return bool(await redis.xinfo_consumers(Keys(settings.prefix).changes, "bill"))
        except Exception:  # noqa: BLE001  not yet created
            return False

    await wait_until(up)
    yield
    stop.set()
    await asyncio.wait_for(task, EVENT_TIMEOUT_S)


async def allocate_for(settings: Settings, pg: asyncpg.Pool, user: str, tenant: str,
                       minutes: int = 525_600) -> Allocated:
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate(user, tenant_id=tenant, duration_minutes=minutes)
    assert isinstance(got, Allocated), got

    async def persisted() -> bool:
        async with pg.acquire() as conn:
            return bool(await conn.fetchval(
                "SELECT count(*) FROM device_allocations WHERE id = $1", got.allocation_id))

    await wait_until(persisted)
    return got


async def interim_rows(pg: asyncpg.Pool, tenant: str) -> list[asyncpg.Record]:
    async with pg.acquire() as conn:
        return list(await conn.fetch(
            "SELECT * FROM billing_ledger WHERE tenant_id = $1 AND kind = 'interim'"
            " ORDER BY covered_to_s", tenant))


def where(state: dict[str, object], tenant: str, kind: str) -> list[str]:
    """The batches of ``kind`` that hold the tenant, from one dump."""
    out = []
    for sched in as_list(state["schedules"]):
        for b in as_list(sched["batches"]):
            if sched["id"].startswith(kind + ":") and tenant in as_list(b.get("members")):
                out.append(b["ref"])
    return out


async def test_a_tenant_on_each_tier_is_metered_at_its_interval(
    sctx: StageContext, allocating: None, settings: Settings, redis: Redis, pg: asyncpg.Pool,
    clock: ManualClock,
) -> None:
    plans = ["basic", "standard", "premium", "enterprise"]
    await seed(redis, Keys(settings.prefix), clock,
               devices=[DeviceSpec(id=f"d{i}") for i in range(4)],
               quotas=[QuotaSpec(user_id=f"u-{p}") for p in plans])
    for plan in plans:
        await set_tenant(redis, settings, clock.now_ms(), f"t-{plan}", plan)
        await allocate_for(settings, pg, f"u-{plan}", f"t-{plan}")
    # six hours in 15-minute steps, the schedules run at each step
    for _ in range(24):
        clock.advance(15 * MIN)
        await run_schedules(sctx)
    counts = {p: len(await interim_rows(pg, f"t-{p}")) for p in plans}
    assert counts == {"enterprise": 24, "premium": 6, "standard": 1, "basic": 0}
    clock.advance(DAY - clock.now_ms() % DAY)  # the next day boundary
    await run_schedules(sctx)
    assert len(await interim_rows(pg, "t-basic")) == 1
    # the enterprise rows are contiguous, each 15 minutes (the first from allocation)
    rows = await interim_rows(pg, "t-enterprise")
    assert all(a["covered_to"] == b["covered_from"] for a, b in pairwise(rows))
    assert {r["duration_seconds"] for r in rows[1:24]} == {900}
    # the usage reports of the same run: one total row per tenant per period
    async with pg.acquire() as conn:
        reports = await conn.fetch("SELECT * FROM usage_reports WHERE pool = '*'"
                                   " AND tenant_id = 't-enterprise'")
    assert len(reports) == 25 and all(r["devices_used"] == 1 for r in reports)
    assert all(r["device_seconds"] == 900 for r in reports if r["period_start"] >
               rows[0]["started_at"])
    assert (await validate(redis, settings, clock.now_ms()))["valid"]


async def test_an_override_runs_at_its_interval_until_it_expires(
    sctx: StageContext, redis: Redis, settings: Settings, clock: ManualClock,
) -> None:
    await set_tenant(redis, settings, clock.now_ms(), "acme", "premium")
    state = await dump(redis, settings, clock.now_ms())
    assert where(state, "acme", "interim_metering") == ["interim_metering:1h#0"]
    until = clock.now_ms() + 2 * 3_600_000
    assert await set_override(redis, settings, clock.now_ms(), "acme", 30 * MIN, until)
    state = await dump(redis, settings, clock.now_ms())
    for kind in KINDS:
        assert where(state, "acme", kind) == [f"{kind}:30m#0"]
    assert (await validate(redis, settings, clock.now_ms()))["valid"]
    ran = []
    for _ in range(4):  # two hours in 30-minute steps: the override's runs
        clock.advance(30 * MIN)
        await run_schedules(sctx)
        state = await dump(redis, settings, clock.now_ms())
        ran.append(where(state, "acme", "interim_metering")[0])
    # the override expired at the last step: back to its tier, the 30m schedule gone
    assert ran[:3] == ["interim_metering:30m#0"] * 3 and ran[3] == "interim_metering:1h#0"
    assert "interim_metering:30m" not in {s["id"] for s in as_list(state["schedules"])}
    assert (await validate(redis, settings, clock.now_ms()))["valid"]
    assert not await set_override(redis, settings, clock.now_ms(), "nobody", 30 * MIN, until)


async def test_batches_split_at_capacity_with_staggered_offsets_and_consolidate(
    redis: Redis, settings: Settings, clock: ManualClock,
) -> None:
    s = replace(settings, schedule_batch_capacity=3, schedule_stagger_s=60)
    now = clock.now_ms()
    await apply_tenants(redis, s, now, [TenantOp(action="set", tenant_id=f"t{i}", plan="basic")
                                        for i in range(7)])
    [view] = [v for v in schedule_views(await dump(redis, s, now), s)
              if v["schedule"] == "usage_report:24h"]
    assert [b["size"] for b in view["batches"]] == [3, 3, 1]
    assert [b["offset_ms"] for b in view["batches"]] == [0, 60_000, 120_000]
    assert view["batch_count"] == 3 and view["tenants"] == 7
    assert (await validate(redis, s, now))["valid"]
    # four leave: three batches hold 3 tenants, one batch would do
    await apply_tenants(redis, s, now, [TenantOp(action="delete", tenant_id=f"t{i}")
                                        for i in (0, 1, 3, 4)])
    result = await rebalance(redis, s, now, None)
    by = {r["schedule"]: r for r in result["schedules"]}
    assert by["usage_report:24h"]["batches_before"] == 3
    assert by["usage_report:24h"]["batches_after"] == 1
    [view] = [v for v in schedule_views(await dump(redis, s, now), s)
              if v["schedule"] == "usage_report:24h"]
    assert [b["size"] for b in view["batches"]] == [3]
    assert sorted(view["batches"][0]["tenants"]) == ["t2", "t5", "t6"]
    assert (await validate(redis, s, now))["valid"]
    # a full schedule is critical
    s1 = replace(s, schedule_batch_capacity=3)
    await apply_tenants(redis, s1, now, [TenantOp(action="set", tenant_id="t9", plan="premium")])
    views = {v["schedule"]: v for v in schedule_views(await dump(redis, s1, now), s1)}
    assert views["usage_report:24h"]["health"] == "critical"
    assert views["usage_report:1h"]["health"] == "healthy"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_plan_changes_move_tenants_atomically_under_concurrent_runs(
    settings: Settings, servers: object,
) -> None:
    plans = ["basic", "standard", "premium", "enterprise"]
    s = replace(settings, schedule_batch_capacity=2)

    @hsettings(max_examples=15, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(plans + ["delete"])),
                    min_size=1, max_size=30))
    def check(changes: list[tuple[int, str]]) -> None:
        async def go() -> None:
            prefix = f"h{uuid.uuid4().hex[:10]}"
            hs = replace(s, prefix=prefix)
            writer, reader = redis_client(hs), redis_client(hs)
            clock = ManualClock()
            try:
                snapshots: list[dict[str, object]] = []
                done = asyncio.Event()

                async def read() -> None:
                    while not done.is_set():
                        snapshots.append(await dump(reader, hs, clock.now_ms()))
                        await asyncio.sleep(0)

                async def change() -> None:
                    for i, plan in changes:
                        op = (TenantOp(action="delete", tenant_id=f"t{i}") if plan == "delete"
                              else TenantOp(action="set", tenant_id=f"t{i}", plan=plan))
                        await apply_tenants(writer, hs, clock.now_ms(), [op])
                        clock.advance(15 * MIN)  # batches fall due while tenants move
                    done.set()

                ctx = StageContext(redis=writer, settings=hs, clock=clock)

                async def claim_runs() -> None:
                    from stages.schedules import BatchFinish, call, claim_batches
                    while not done.is_set():
                        for run in await claim_batches(ctx):
                            # every claimed batch's tenants are registered and in it
                            await call(writer, hs, clock.now_ms(), finish=BatchFinish(
                                batch=run.batch, execution_id=run.execution_id,
                                status="succeeded", period_end_ms=run.period_end_ms))
                        await asyncio.sleep(0)

                await asyncio.gather(read(), change(), claim_runs())
                snapshots.append(await dump(reader, hs, clock.now_ms()))
                for snap in snapshots:
                    for t in as_list(snap["tenants"]):
                        for kind in KINDS:
                            assert len(where(snap, t["id"], kind)) == 1, (t["id"], kind)
                    members = {m for sc in as_list(snap["schedules"])
                               for b in as_list(sc["batches"]) for m in as_list(b["members"])}
                    assert members == {t["id"] for t in as_list(snap["tenants"])}
                report = await validate(reader, hs, clock.now_ms())
                assert report["valid"], report
            finally:
                from stages.tools.admin import delete_keys
                await delete_keys(writer, prefix)
                await writer.aclose()
                await reader.aclose()

        asyncio.run(go())

    check()


FAIL_TRIGGER = """
CREATE OR REPLACE FUNCTION devsched_test_fail_{tag}() RETURNS trigger AS $$
BEGIN
    IF NEW.tenant_id = '{tenant}' THEN RAISE EXCEPTION 'report store refused {tenant}'; END IF;
    RETURN NEW;
END; $$ LANGUAGE plpgsql;
CREATE TRIGGER devsched_test_fail_{tag} BEFORE INSERT ON usage_reports
    FOR EACH ROW EXECUTE FUNCTION devsched_test_fail_{tag}();
"""


async def test_a_failing_tenant_is_retried_at_5_15_45_minutes_then_failed(
    sctx: StageContext, redis: Redis, settings: Settings, clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    tag = uuid.uuid4().hex[:8]
    bad = f"bad-{tag}"
    async with pg.acquire() as conn:
        await conn.execute(FAIL_TRIGGER.format(tag=tag, tenant=bad))
    try:
        for t in ("good", bad):
            await set_tenant(redis, settings, clock.now_ms(), t, "enterprise")
        clock.advance(15 * MIN - 1_000)  # the 15-minute boundary
        await run_schedules(sctx)
        async with pg.acquire() as conn:
            good = await conn.fetchval("SELECT count(*) FROM usage_reports"
                                       " WHERE tenant_id = 'good'")
        assert good == 1
        [waiting] = (await failures(redis, settings, clock.now_ms()))["retrying"]
        assert waiting["tenant_id"] == bad and waiting["tries"] == 0
        assert "report store refused" in waiting["error"]
        failed_at = clock.now_ms()
        for backoff_min, tries in ((5, 1), (15, 2), (45, 3)):
            clock.advance(backoff_min * MIN - 1)
            await run_schedules(sctx)  # not yet due
            shown = await failures(redis, settings, clock.now_ms())
            assert [w["tries"] for w in shown["retrying"] if w["tenant_id"] == bad] == \
                [tries - 1]
            clock.advance(1)
            await run_schedules(sctx)
            shown = await failures(redis, settings, clock.now_ms())
            if tries < 3:
                [w] = [w for w in shown["retrying"] if w["tenant_id"] == bad]
                assert w["tries"] == tries
            else:
                assert not [w for w in shown["retrying"] if w["tenant_id"] == bad]
        assert clock.now_ms() - failed_at == (5 + 15 + 45) * MIN
        [failed] = (await failures(redis, settings, clock.now_ms()))["failed"]
        assert failed["tenant_id"] == bad and failed["kind"] == "usage_report"
        assert failed["tries"] == 3 and "report store refused" in failed["error"]
        # the report store takes it again: a retry by command succeeds
        async with pg.acquire() as conn:
            await conn.execute(f"DROP TRIGGER devsched_test_fail_{tag} ON usage_reports")
        assert (await retry(sctx, bad, "usage_report"))["outcome"] == "done"
        shown = await failures(redis, settings, clock.now_ms())
        assert shown == {"failed": [], "retrying": []}
        async with pg.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM usage_reports WHERE tenant_id = $1",
                                       bad) == 1
    finally:
        async with pg.acquire() as conn:
            await conn.execute(f"DROP TRIGGER IF EXISTS devsched_test_fail_{tag} ON usage_reports")
            await conn.execute(f"DROP FUNCTION IF EXISTS devsched_test_fail_{tag}()")


async def test_interim_and_final_rows_add_up_to_the_exact_duration(
    sctx: StageContext, allocating: None, settings: Settings, redis: Redis, pg: asyncpg.Pool,
    clock: ManualClock,
) -> None:
    await seed(redis, Keys(settings.prefix), clock, devices=[DeviceSpec(id="d1"),
                                                               DeviceSpec(id="d2")],
               quotas=[QuotaSpec(user_id="u1")])
    await set_tenant(redis, settings, clock.now_ms(), "acme", "enterprise")
    clock.advance(737)  # not on a second
    long = await allocate_for(settings, pg, "u1", "acme")
    short = await allocate_for(settings, pg, "u1", "acme")
    for step in (15 * MIN - 1_737, 15 * MIN, 15 * MIN):
        clock.advance(step)
        await run_schedules(sctx)
    # the short one is released between two runs; the long one later, mid-second
    clock.advance(7 * MIN + 333)
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        assert isinstance(await client.release(allocation_id=short.allocation_id,
                                               user_id="u1"), Released)
        clock.advance(8 * MIN)
        await run_schedules(sctx)  # meters the long one only
        clock.advance(3 * MIN + 451)
        assert isinstance(await client.release(allocation_id=long.allocation_id,
                                               user_id="u1"), Released)

    async def billed() -> bool:
        async with pg.acquire() as conn:
            return await conn.fetchval("SELECT count(*) FROM billing_ledger WHERE kind = 'final'"
                                       ) == 2

    await wait_until(billed)
    async with pg.acquire() as conn:
        for got, interim in ((long, 4), (short, 3)):
            rows = await conn.fetch("SELECT * FROM billing_ledger WHERE allocation_id = $1"
                                    " ORDER BY covered_to_s, kind DESC", got.allocation_id)
            exact = await conn.fetchval("SELECT duration_seconds FROM device_allocations"
                                        " WHERE id = $1", got.allocation_id)
            assert [r["kind"] for r in rows] == ["interim"] * interim + ["final"]
            assert sum(r["duration_seconds"] for r in rows) == exact
            assert all(a["covered_to"] == b["covered_from"] for a, b in pairwise(rows))
            assert rows[-1]["entry_id"] == got.allocation_id
            assert len({r["entry_id"] for r in rows}) == len(rows)
        # metering again after the release adds nothing
        await run_schedules(sctx)
        assert await conn.fetchval("SELECT count(*) FROM billing_ledger") == 9


async def test_interim_entries_reach_the_billing_export_with_their_own_entry_ids(
    sctx: StageContext, settings: Settings, redis: Redis, pg: asyncpg.Pool, clock: ManualClock,
) -> None:
    from stages.tools.receiver import Receiver

    receiver = Receiver(token="tok", secret="sec")
    await receiver.start()
    s = replace(settings, billing_url=receiver.url, billing_token="tok", http_backoff_ms=5)
    ctx = StageContext(redis=redis, settings=s, clock=clock, pg=pg)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(["quota", "select", "persist", "bill", "export"], s, clock,
                                     stop=stop, install_signals=False))
    try:
        await seed(redis, Keys(s.prefix), clock, devices=[DeviceSpec(id="d1")],
                   quotas=[QuotaSpec(user_id="u1")])
        await set_tenant(redis, s, clock.now_ms(), "acme", "enterprise")
        got = await allocate_for(s, pg, "u1", "acme")
        for _ in range(2):
            clock.advance(15 * MIN)
            await run_schedules(ctx)
        async with Client(s, timeout_s=EVENT_TIMEOUT_S) as client:
            assert isinstance(await client.release(allocation_id=got.allocation_id,
                                                   user_id="u1"), Released)

        async def exported() -> bool:
            async with pg.acquire() as conn:
                return await conn.fetchval("SELECT count(*) FROM billing_ledger"
                                           " WHERE exported_at IS NOT NULL") == 3

        await wait_until(exported)
        entries = receiver.received.usage
        assert len(entries) == 3
        kinds = sorted(e["kind"] for e in entries.values())
        assert kinds == ["final", "interim", "interim"]
        assert {e["allocation_id"] for e in entries.values()} == {got.allocation_id}

        async def length() -> int | None:
            async with pg.acquire() as conn:
                value: int | None = await conn.fetchval(
                    "SELECT duration_seconds FROM device_allocations WHERE id = $1",
                    got.allocation_id)
                return value

        async def persisted() -> bool:
            # persist and bill read the changes stream as separate groups: the ledger can
            # be exported before persist has written the release to the allocation's row
            return await length() is not None

        await wait_until(persisted)
        exact = await length()
        assert sum(e["billed_seconds"] for e in entries.values()) == exact
    finally:
        stop.set()
        await asyncio.wait_for(task, EVENT_TIMEOUT_S)
        await receiver.stop()


async def test_tenant_events_apply_once_and_in_order(
    settings: Settings, redis: Redis, clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    keys = Keys(settings.prefix)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(["events"], settings, clock, stop=stop,
                                     install_signals=False))

    sent: list[bytes] = []

    async def send(**event: object) -> None:
        sent.append(await redis.xadd(keys.events,
                                     {"d": json.dumps({"occurred_at_ms": 1, **event})}))

    async def plan_of(tenant: str) -> str | None:
        value = await redis.hget(keys.sched_tenants, tenant)
        return value.decode() if value else None

    try:
        await send(type="tenant.created", event_id="e1", tenant_id="acme", plan="basic",
                   version=1)
        await send(type="tenant.plan_changed", event_id="e2", tenant_id="acme",
                   plan="premium", version=3)
        await send(type="tenant.plan_changed", event_id="e3", tenant_id="acme",
                   plan="standard", version=2)  # older: ignored
        await send(type="tenant.created", event_id="e1", tenant_id="acme", plan="basic",
                   version=1)  # the same event again
        await send(type="tenant.created", event_id="e4", tenant_id="zed", plan="gold")
        await send(type="tenant.created", event_id="e5", tenant_id="gone", plan="basic")
        await send(type="tenant.deleted", event_id="e6", tenant_id="gone")

        async def all_read() -> bool:
            # the last event applied, the bad one dead-lettered, nothing left pending
            try:
                [group] = await redis.xinfo_groups(keys.events)
            except Exception:  # noqa: BLE001  the group is not there yet
                return False
            return (group["pending"] == 0 and group["last-delivered-id"] == sent[-1]
                    and await redis.xlen(keys.dead) == 1
                    and await redis.hget(keys.sched_tenants, "gone") is None
                    and await redis.hget(keys.sched_tenants, "acme") is not None)

        await wait_until(all_read)
        assert await plan_of("acme") == "premium"
        assert await plan_of("zed") is None
        [(_, letter)] = await redis.xrange(keys.dead)
        assert b"unknown plan" in letter[b"d"]
        state = await dump(redis, settings, clock.now_ms())
        assert where(state, "acme", "interim_metering") == ["interim_metering:1h#0"]
        assert (await validate(redis, settings, clock.now_ms()))["valid"]
    finally:
        stop.set()
        await asyncio.wait_for(task, EVENT_TIMEOUT_S)


async def _corrupt(redis: Redis, k: Keys, fault: str) -> None:
    b = k.sched
    if fault == "unmapped":
        await redis.srem(b("members:interim_metering:1h#0"), "t0")
        await redis.hincrby(b("batch:interim_metering:1h#0"), "size", -1)
        await redis.hincrby(b("schedule:interim_metering:1h"), "tenants", -1)
    elif fault == "multiple":
        await redis.sadd(b("members:interim_metering:15m#0"), "t0")
        await redis.hincrby(b("batch:interim_metering:15m#0"), "size", 1)
        await redis.hincrby(b("schedule:interim_metering:15m"), "tenants", 1)
    elif fault == "orphan_item":
        await redis.sadd(b("members:interim_metering:1h#0"), "ghost")
        await redis.hincrby(b("batch:interim_metering:1h#0"), "size", 1)
        await redis.hincrby(b("schedule:interim_metering:1h"), "tenants", 1)
    elif fault == "orphan_batch":
        await redis.hset(b("batch:interim_metering:1h#7"), mapping={"size": 0, "offset_ms": 0})
    elif fault == "count_mismatch":
        await redis.hincrby(b("batch:usage_report:1h#0"), "size", 2)
    elif fault == "invalid_interval":
        await redis.hset(b("schedule:usage_report:15m"), "interval_ms", 0)
    elif fault == "mapping_mismatch":
        await redis.hset(b("tenant:t1"), "b:usage_report", "usage_report:1h#5")
    elif fault == "wrong_schedule":
        await redis.hset(k.sched_tenants, "t2", "basic")
        await redis.hset(b("tenant:t2"), "plan", "basic")
    elif fault == "not_scheduled":
        await redis.zrem(b("due"), "usage_report:15m#0")
    else:
        raise AssertionError(fault)


@pytest.mark.parametrize("fault", ["unmapped", "multiple", "orphan_item", "orphan_batch",
                                   "count_mismatch", "invalid_interval", "mapping_mismatch",
                                   "wrong_schedule", "not_scheduled"])
async def test_validate_finds_each_kind_of_fault(
    redis: Redis, settings: Settings, clock: ManualClock, fault: str,
) -> None:
    now = clock.now_ms()
    for i, plan in enumerate(["premium", "premium", "premium", "enterprise"]):
        await set_tenant(redis, settings, now, f"t{i}", plan)
    assert (await validate(redis, settings, now))["valid"]
    await _corrupt(redis, Keys(settings.prefix), fault)
    report = await validate(redis, settings, now)
    assert not report["valid"]
    assert fault in report["faults_by_kind"], report


async def run_cli(settings: Settings, *args: str) -> tuple[int, str]:
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix)
    proc = await asyncio.create_subprocess_exec(
        devsched_command(), *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), EVENT_TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def test_the_commands_set_tenants_list_validate_and_trigger(
    allocating: None, settings: Settings, redis: Redis, pg: asyncpg.Pool, clock: ManualClock,
) -> None:
    await seed(redis, Keys(settings.prefix), clock, devices=[DeviceSpec(id="d1")],
               quotas=[QuotaSpec(user_id="u1")])
    for tenant, plan in (("a", "basic"), ("b", "premium"), ("c", "enterprise")):
        code, out = await run_cli(settings, "tenants", "set", tenant, "--plan", plan, "--json")
        assert code == 0, out
    code, out = await run_cli(settings, "tenants", "set", "x", "--plan", "gold")
    assert code == 2 and "unknown plan" in out
    code, out = await run_cli(settings, "schedules", "list", "--json")
    assert code == 0, out
    listing = json.loads(out)
    tiers = {"a": "24h", "b": "1h", "c": "15m"}
    for tenant, tier in tiers.items():
        for kind in KINDS:
            found = [b["batch"] for s in listing["schedules"] for b in s["batches"]
                     if s["kind"] == kind and tenant in b["tenants"]]
            assert found == [f"{kind}:{tier}#0"]
    assert listing["retry_queue"] == 0 and listing["retry_alert"] is False
    assert {s["health"] for s in listing["schedules"]} == {"healthy"}
    code, out = await run_cli(settings, "schedules", "validate")
    assert code == 0 and json.loads(out)["valid"], out
    got = await allocate_for(settings, pg, "u1", "c")
    clock.advance(5_000)  # the CLI runs on the system clock, later than the allocation
    code, out = await run_cli(settings, "schedules", "trigger", "interim_metering:15m",
                              "--json")
    assert code == 0, out
    assert json.loads(out)["processed_count"] == 1
    async with pg.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM billing_ledger WHERE allocation_id = $1"
                                   " AND kind = 'interim'", got.allocation_id) == 1
    code, out = await run_cli(settings, "schedules", "pause", "usage_report:1h", "--json")
    assert code == 0 and json.loads(out)["paused"] is True
    code, out = await run_cli(settings, "schedules", "show", "usage_report:1h", "--json")
    assert json.loads(out)["paused"] is True
    code, out = await run_cli(settings, "schedules", "resume", "usage_report:1h", "--json")
    assert code == 0 and json.loads(out)["paused"] is False
    code, out = await run_cli(settings, "schedules", "override", "a", "--every", "30m",
                              "--until", "2d", "--json")
    assert code == 0 and json.loads(out)["override_ms"] == 30 * MIN
    code, out = await run_cli(settings, "tenants", "list", "--json")
    rows = {r["tenant_id"]: r for r in json.loads(out)["tenants"]}
    assert rows["a"]["batches"]["usage_report"] == "usage_report:30m#0"
    # a fault makes validate exit 1 with its report
    await redis.hset(Keys(settings.prefix).sched("batch:usage_report:1h#9"), "size", 0)
    code, out = await run_cli(settings, "schedules", "validate")
    assert code == 1 and json.loads(out)["faults_by_kind"] == {"orphan_batch": 1}


async def test_trigger_runs_every_batch_of_a_schedule_once(
    sctx: StageContext, redis: Redis, settings: Settings, clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    s = replace(settings, schedule_batch_capacity=2)
    ctx = StageContext(redis=redis, settings=s, clock=clock, pg=pg)
    for i in range(5):
        await set_tenant(redis, s, clock.now_ms(), f"t{i}", "standard")
    result = await trigger(ctx, "usage_report:6h")
    assert result["status"] == "succeeded" and result["tenants"] == 5
    assert [b["batch"] for b in result["batches"]] == [f"usage_report:6h#{n}" for n in range(3)]
    async with pg.acquire() as conn:
        rows = await conn.fetch("SELECT job_name, status, manual FROM job_executions"
                                " WHERE job_name LIKE 'schedule:%'")
    assert len(rows) == 3 and all(r["status"] == "succeeded" and r["manual"] for r in rows)




async def test_a_batch_run_whose_worker_died_is_run_again_in_its_period_once(
    sctx: StageContext, pg: asyncpg.Pool,
) -> None:
    """A batch claimed by a worker that died (its claim not renewed for
    DEVSCHED_JOB_LEASE_S) is recorded failed and run again at the next tick, for the SAME period, so that
    period's usage report is written, not missed until the batch next falls due. Only
    once: a re-run that dies too puts the batch's tenants in the retry queue for that
    period, and the retry writes the report."""
    from stages.schedules import claim_batches, run_batch, run_retries

    s, clock = sctx.settings, sctx.clock
    assert isinstance(clock, ManualClock)
    timeout = s.job_lease_s * 1000  # a dead worker's claim goes stale a lease after it
    await set_tenant(sctx.redis, s, clock.now_ms(), "dying", "enterprise")  # every 15 min
    name = "schedule:usage_report:15m#0"

    async def reports(period_end_ms: int) -> int:
        async with pg.acquire() as conn:
            return int(await conn.fetchval(
                "SELECT count(*) FROM usage_reports WHERE tenant_id = 'dying'"
                " AND period_end = to_timestamp($1 / 1000.0)", period_end_ms))

    async def executions() -> list[tuple[str, str | None]]:
        async with pg.acquire() as conn:
            return [(r["status"], r["error"]) for r in await conn.fetch(
                "SELECT status, error FROM job_executions WHERE job_name = $1"
                " ORDER BY started_at, status", name)]

    async def claim_usage() -> list[Any]:
        runs = await claim_batches(sctx)
        for run in runs:
            if run.kind != "usage_report":
                await run_batch(sctx, run)  # metering ends normally
        return [r for r in runs if r.kind == "usage_report"]

    clock.advance(15 * MIN)  # the batch falls due; its worker claims it and dies
    [first] = await claim_usage()
    period = first.period_end_ms
    clock.advance(timeout - 1_000)  # inside the lease: nothing is run again
    assert await claim_usage() == []
    clock.advance(2_000)  # past it, inside the same period: run again, for that period
    [again] = await claim_usage()
    assert (again.batch, again.period_end_ms, again.tenants) == (first.batch, period, ["dying"])
    assert again.execution_id != first.execution_id
    outcome = await run_batch(sctx, again)
    assert outcome.status == "succeeded" and await reports(period) == 1  # the total, "*"
    assert [st for st, _ in await executions()] == ["failed", "succeeded"]
    assert (await executions())[0][1] == "worker died: still running past its timeout"
    assert await claim_usage() == []  # once: the period is done

    # the next period: the run dies, and its re-run dies too
    clock.advance(period + 15 * MIN - clock.now_ms())
    [second] = await claim_usage()
    assert second.period_end_ms == period + 15 * MIN
    clock.advance(timeout + 1_000)
    [rerun] = await claim_usage()
    assert rerun.period_end_ms == second.period_end_ms
    clock.advance(timeout + 1_000)
    assert await claim_usage() == []  # no third run: the tenant waits in the retry queue
    waiting = (await failures(sctx.redis, s, clock.now_ms()))["retrying"]
    assert [(w["tenant_id"], w["kind"]) for w in waiting] == [("dying", "usage_report")]
    assert await reports(second.period_end_ms) == 0
    clock.advance(s.schedule_retry_backoff_s * 1000)
    assert await run_retries(sctx) == [("usage_report|dying", "done")]
    assert await reports(second.period_end_ms) == 1  # that period's report, by the retry
    assert [st for st, _ in await executions()] == ["failed", "succeeded", "failed", "failed"]


async def test_a_long_batch_run_renews_its_claim_and_is_not_run_twice(
    sctx: StageContext, pg: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch run that works for twice the lease (its one tenant's run is slow: the
    injected clock moves 2 s three times while a renewal, every third of the 3 s lease in
    real time, comes between) keeps its claim: a manual trigger of its schedule meanwhile
    claims nothing, and the run ends succeeded with the period's report written once."""
    import stages.schedules as sched
    from stages.schedules import claim_batches, run_batch

    s = replace(sctx.settings, job_lease_s=3)
    ctx = replace(sctx, settings=s)
    clock = ctx.clock
    assert isinstance(clock, ManualClock)
    await set_tenant(ctx.redis, s, clock.now_ms(), "slow", "enterprise")
    clock.advance(15 * MIN)
    runs = [r for r in await claim_batches(ctx) if r.kind == "usage_report"]
    [run] = runs
    asked: list[int] = []
    real_run_tenant = sched.run_tenant

    async def slow(*args: Any) -> int:
        for _ in range(3):
            clock.advance(2_000)
            await asyncio.sleep(1.2)
        asked.append(len(await claim_batches(ctx, run.batch.split("#")[0])))
        return await real_run_tenant(*args)

    monkeypatch.setattr(sched, "run_tenant", slow)
    outcome = await run_batch(ctx, run)
    assert asked == [0]  # busy: the live run's claim was renewed past the lease
    assert outcome.status == "succeeded"
    async with pg.acquire() as conn:
        assert await conn.fetchval(
            "SELECT count(*) FROM usage_reports WHERE tenant_id = 'slow'") >= 1
        statuses = [r["status"] for r in await conn.fetch(
            "SELECT status FROM job_executions WHERE job_name = $1", f"schedule:{run.batch}")]
    assert statuses == ["succeeded"]
