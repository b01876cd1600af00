"""Events stage: once, in order, bad input, failures (SPEC B4, B5), metrics, the command.

Through the running pipeline on real Redis and PostgreSQL: an event id applied twice
changes things once (one release, one ledger row); versions delivered out of order
end in the state of the highest (suspended then activated, in reverse, ends active)
and the older ones are counted stale; events that do not decode go to the dead stream
with the reason and events for unknown devices or users are counted ignored, while
the stage goes on applying the next ones. A failure is injected by loading a copy of
events.lua that raises (a real script error in Redis): a critical event is retried and
dead-lettered with the error past the delivery limit; an informational one is
dead-lettered and acked at once.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import asyncpg
import orjson
import pytest
import redis as sync_redis
from prometheus_client import REGISTRY
from redis.asyncio import Redis

import stages.events
from pipeline.clock import ManualClock
from pipeline.scripts import Script
from pipeline.worker import groups_caught_up
from schemas.keys import GROUP_EVENTS, Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec
from schemas.runtime import dead_decoder
from stages.scripts import EVENTS
from stages.settings import Settings
from stages.tools import cli
from stages.tools.admin import user_state
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, wait_until
from tests.test_events import event, notes_of, send

MAX_DELIVERIES = 2


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Few deliveries before the dead stream, so a failing critical event gets there soon."""
    return replace(settings, max_deliveries=MAX_DELIVERIES)


def consumed(kind: str, status: str) -> float:
    return REGISTRY.get_sample_value(
        "scheduler_event_consumed_total", {"type": kind, "status": status}) or 0.0


def auto_released(reason: str) -> float:
    return REGISTRY.get_sample_value("scheduler_auto_release_total", {"reason": reason}) or 0.0


async def dead_letters(redis: Redis, keys: Keys) -> list[Any]:
    return [dead_decoder.decode(f[b"d"]) for _i, f in await redis.xrange(keys.dead)]


async def test_an_event_id_is_applied_once(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="u")])
    before = (consumed("device.failed", "applied"), consumed("device.failed", "duplicate"),
              auto_released("device_failed"))
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("u")
        assert isinstance(got, Allocated)
        failed = event("device.failed", device_id="d1")
        await send(redis, keys, failed, failed)
        # back up, allocated again: the same event id once more must not fail it again
        await send(redis, keys, event("device.status_changed", device_id="d1", status="running"))
        again = await client.allocate("u")
        assert isinstance(again, Allocated) and again.device.id == "d1"
        await send(redis, keys, failed)
        assert await redis.hget(keys.device("d1"), "status") == b"allocated"
    async with pg.acquire() as conn:
        ledger = await conn.fetch("SELECT allocation_id::text, end_reason FROM billing_ledger")
    assert [(r["allocation_id"], r["end_reason"]) for r in ledger] == [
        (got.allocation_id, "device_failed")]
    assert len(await notes_of(redis, keys, "device.failed")) == 1
    after = (consumed("device.failed", "applied"), consumed("device.failed", "duplicate"),
             auto_released("device_failed"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 2, 1]


async def test_older_versions_change_nothing_and_are_counted_stale(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="u")])
    stale_before = consumed("user.suspended", "stale")
    # the user service suspended (2) then re-activated (3); delivered in reverse
    await send(redis, keys, event("user.activated", user_id="u", version=3),
               event("user.suspended", user_id="u", version=2))
    assert (await user_state(redis, keys, "u")).quota["status"] == "active"
    assert consumed("user.suspended", "stale") - stale_before == 1
    # billing numbers its events on its own: its version 1 is not stale after user's 3
    await send(redis, keys, event("billing.overdue", user_id="u", version=1, amount=1.0, days=1))
    assert (await user_state(redis, keys, "u")).quota["status"] == "overdue"
    await send(redis, keys, event("billing.payment_success", user_id="u", version=1))
    assert (await user_state(redis, keys, "u")).quota["status"] == "overdue"  # stale
    # a device: maintenance (5) arrives after running (6): it stays available
    await send(redis, keys, event("device.status_changed", device_id="d1", status="running",
                                  version=6),
               event("device.maintenance", device_id="d1", version=5))
    assert await redis.hget(keys.device("d1"), "status") == b"available"
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate("u")
        assert isinstance(got, Failed) and got.reason == "billing_overdue"


async def test_bad_events_are_dead_lettered_or_ignored_and_the_stage_goes_on(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="u")])
    before = {k: consumed(*k) for k in (("unknown", "invalid"), ("billing.overdue", "invalid"),
                                         ("device.failed", "ignored"),
                                         ("user.suspended", "ignored"))}
    await send(
        redis, keys,
        b"{not json",
        orjson.dumps(event("device.exploded", device_id="d1")),
        orjson.dumps(event("billing.overdue", user_id="u", amount=5.0)),  # no days
        orjson.dumps(event("device.failed", device_id="d1", colour="red")),
        orjson.dumps(event("device.failed", device_id="no-such-device")),
        orjson.dumps(event("user.suspended", user_id="nobody")),
        orjson.dumps(event("device.failed", device_id="d1")),
    )
    letters = await dead_letters(redis, keys)
    assert [d.stage for d in letters] == ["events"] * 4
    errors = [d.error for d in letters]
    assert errors[0].startswith("invalid event: JSON is malformed")
    assert "`$.type`" in errors[1]
    assert "missing required field `days`" in errors[2]
    assert "unknown field `colour`" in errors[3]
    assert orjson.loads(letters[1].payload)["type"] == "device.exploded"  # kept for an operator
    # the stage is alive and applied the last one
    assert await redis.hget(keys.device("d1"), "status") == b"failed"
    assert not await redis.exists(keys.user("nobody"))
    after = {k: consumed(*k) for k in before}
    assert {k: after[k] - before[k] for k in before} == {
        ("unknown", "invalid"): 2, ("billing.overdue", "invalid"): 1,
        ("device.failed", "ignored"): 1, ("user.suspended", "ignored"): 1}


def failing_events_script() -> Script[Any, Any]:
    """events.lua with every device event raising (a real error in Redis)."""
    old = "local function apply_device(row)\n"
    assert EVENTS.body.count(old) == 1
    return Script("events", EVENTS.keys, EVENTS.call,
                  EVENTS.body.replace(old, old + "  error('injected failure')\n"))


async def test_a_critical_event_that_fails_is_retried_then_dead_lettered(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="u")])
    monkeypatch.setattr(stages.events, "EVENTS", failing_events_script())
    await redis.xadd(keys.events, {"d": orjson.dumps(event("device.failed", device_id="d1"))})

    async def dead() -> bool:
        return bool(await redis.xlen(keys.dead))

    await wait_until(dead)
    (letter,) = await dead_letters(redis, keys)
    assert letter.stage == "events" and letter.deliveries > MAX_DELIVERIES
    assert "injected failure" in letter.error
    await wait_until(lambda: groups_caught_up(redis, keys.events, [GROUP_EVENTS]))
    assert await redis.hget(keys.device("d1"), "status") == b"available"  # never applied


async def test_an_informational_event_that_fails_is_acked_at_once_with_a_dead_letter(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id="d1")], quotas=[QuotaSpec(user_id="u")])
    monkeypatch.setattr(stages.events, "EVENTS", failing_events_script())
    failed_before = consumed("device.status_changed", "failed")
    await send(redis, keys, event("device.status_changed", device_id="d1", status="running"))
    (letter,) = await dead_letters(redis, keys)
    assert letter.deliveries == 1 and "injected failure" in letter.error
    assert consumed("device.status_changed", "failed") - failed_before == 1


def test_events_send_validates_and_publishes(settings: Settings,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("DEVSCHED_PREFIX", settings.prefix)
    keys = Keys(settings.prefix)
    assert cli.main(["events", "send", "billing.overdue", "--json", '{"user_id": "u"}']) == 2
    assert "missing required field `amount`" in capsys.readouterr().err
    assert cli.main(["events", "send", "device.failed", "--json",
                     '{"type": "device.deleted", "device_id": "d"}']) == 2
    assert cli.main(["events", "send", "device.failed", "--json",
                     '{"device_id": "d1", "version": 4}']) == 0
    client = sync_redis.Redis.from_url(settings.redis_url)
    try:
        entries = client.xrange(keys.events)
        assert len(entries) == 1
        sent = orjson.loads(entries[0][1][b"d"])
        assert (sent["type"], sent["device_id"], sent["version"]) == ("device.failed", "d1", 4)
        assert uuid.UUID(sent["event_id"]) and sent["occurred_at_ms"] > 0
    finally:
        client.delete(keys.events)
        client.close()
