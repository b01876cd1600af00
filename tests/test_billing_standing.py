"""The billing service's standing reaches the user's status through the events stream.

A ``billing.overdue`` event makes a user ``overdue``; the export stage's refresher fetches
the standing (GET /accounts/<user_id> on the loopback receiver) and, when it differs from
the ok/overdue part of ``billing_status``, sends a ``billing.standing`` event that the
events stage applies: the user is admitted again (or refused ``billing_overdue``), the
status is persisted in PostgreSQL and the audit finds nothing. The newest observation
wins (a standing observed before the overdue does not undo it); a suspension for failed
payments is the payment events' and no standing lifts it; a standing delivered twice is
applied once. Real Redis and PostgreSQL, the injected clock (standings come due when the
test moves it), and the receiver of stages/tools/receiver.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest_asyncio
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import text
from schemas.events import event_decoder
from schemas.keys import GROUP_EVENTS, Keys
from schemas.messages import Allocated, Failed, UserEventApplied, change_decoder
from stages.settings import Settings
from stages.tools.audit import audit
from stages.tools.client import Client
from stages.tools.receiver import Receiver
from tests.conftest import EVENT_TIMEOUT_S, wait_until
from tests.test_http_sinks import SECRET, TOKEN, Running, seeded, sink_settings, up


@pytest_asyncio.fixture
async def billing() -> AsyncIterator[Receiver]:
    r = Receiver(token=TOKEN, secret=SECRET)
    await r.start()
    yield r
    await r.stop()


async def send(redis: Redis, keys: Keys, clock: ManualClock, **event: Any) -> str:
    """Add one event (checked against its schema first) to the events stream; its id."""
    event.setdefault("event_id", f"{event['type']}-{uuid.uuid4().hex[:8]}")
    event.setdefault("occurred_at_ms", clock.now_ms())
    raw = orjson.dumps(event)
    event_decoder.decode(raw)
    await redis.xadd(keys.events, {"d": raw})
    return str(event["event_id"])


async def applied(redis: Redis, keys: Keys, user: str, event_id: str) -> bool:
    return bool(await redis.exists(keys.user_event(user, event_id)))


async def state(redis: Redis, keys: Keys, user: str) -> tuple[str, str]:
    status, billing = await redis.hmget(keys.user(user), "status", "billing_status")
    return text(status), text(billing) if billing is not None else ""


async def persisted(pg: asyncpg.Pool, user: str) -> tuple[str, str]:
    row = await pg.fetchrow(
        "SELECT status, billing_status FROM user_quotas WHERE user_id = $1", user)
    return (row["status"], row["billing_status"]) if row else ("", "")


async def standings_sent(redis: Redis, keys: Keys, user: str) -> list[dict[str, Any]]:
    """The billing.standing events the refresher sent for ``user`` (its event ids are
    ``standing-<user_id>-<observed_at_ms>``; the test's own are named otherwise)."""
    out = []
    for _, fields in await redis.xrange(keys.events):
        ev = orjson.loads(fields[b"d"])
        if ev["type"] == "billing.standing" and ev["event_id"].startswith(f"standing-{user}-"):
            out.append(ev)
    return out


async def checked_after(redis: Redis, keys: Keys, user: str, at_ms: int) -> bool:
    checked = await redis.hget(keys.user(user), "billing_checked_ms")
    return checked is not None and int(checked) >= at_ms


async def consistent(redis: Redis, keys: Keys, pg: asyncpg.Pool, clock: ManualClock) -> bool:
    return bool((await audit(redis, keys, pg, clock.now_ms()))["consistent"])


async def test_an_ok_standing_admits_an_overdue_user_again_and_overdue_refuses(
    settings: Settings, clock: ManualClock, redis: Redis, pg: asyncpg.Pool, billing: Receiver,
) -> None:
    s = sink_settings(settings, billing, billing_fail_open=True)
    keys = Keys(s.prefix)
    await seeded(redis, keys, clock, ["olga"])
    billing.set_account("olga", "ok", 10.0)
    running = Running(s, clock)
    await up(redis, keys, running)
    async with Client(s, timeout_s=EVENT_TIMEOUT_S) as client:
        held = await client.allocate("olga")
        assert isinstance(held, Allocated), held
        start = clock.now_ms()
        await wait_until(lambda: checked_after(redis, keys, "olga", start))
        assert await standings_sent(redis, keys, "olga") == []  # ok and ok: nothing to send

        # billing says overdue: her allocation ends, she is refused
        overdue = await send(redis, keys, clock, type="billing.overdue", user_id="olga",
                             amount=30.0, days=4)
        await wait_until(lambda: applied(redis, keys, "olga", overdue))
        assert await state(redis, keys, "olga") == ("overdue", "overdue")
        refused = await client.allocate("olga")
        assert isinstance(refused, Failed) and refused.reason == "billing_overdue", refused
        # an answer observed before the overdue does not undo it (newest observation wins)
        old = await send(redis, keys, clock, type="billing.standing", user_id="olga",
                         status="ok", observed_at_ms=clock.now_ms() - 1)
        await wait_until(lambda: applied(redis, keys, "olga", old))
        assert await state(redis, keys, "olga") == ("overdue", "overdue")

        # the service now answers ok: the refresher's next fetch sends a standing
        clock.advance((s.billing_standing_ttl_s + 1) * 1000)
        await wait_until(lambda: state_is(redis, keys, "olga", ("active", "ok")))
        sent = await standings_sent(redis, keys, "olga")
        assert [(e["status"], e["balance"]) for e in sent] == [("ok", 10.0)], sent
        again = await client.allocate("olga")
        assert isinstance(again, Allocated), again
        await wait_until(lambda: persisted_is(pg, "olga", ("active", "ok")))
        await wait_until(lambda: consistent(redis, keys, pg, clock))

        # the service answers overdue: refused billing_overdue, nothing held is ended
        billing.set_account("olga", "overdue", -5.0)
        clock.advance((s.billing_standing_ttl_s + 1) * 1000)
        await wait_until(lambda: state_is(redis, keys, "olga", ("overdue", "overdue")))
        refused = await client.allocate("olga")
        assert isinstance(refused, Failed) and refused.reason == "billing_overdue", refused
        assert text(await redis.hget(keys.allocation(again.allocation_id), "status")) == \
            "allocated"
        await wait_until(lambda: persisted_is(pg, "olga", ("overdue", "overdue")))
        await wait_until(lambda: consistent(redis, keys, pg, clock))
    await running.close()
    # each change went out as a UserEventApplied of billing.standing (persist, notify)
    standings = [c for c in await user_changes(redis, keys, "olga")
                 if c.event == "billing.standing"]
    assert [(c.previous_status, c.status) for c in standings] == [
        ("overdue", "active"), ("active", "overdue")], standings


async def state_is(redis: Redis, keys: Keys, user: str, want: tuple[str, str]) -> bool:
    return await state(redis, keys, user) == want


async def persisted_is(pg: asyncpg.Pool, user: str, want: tuple[str, str]) -> bool:
    return await persisted(pg, user) == want


async def user_changes(redis: Redis, keys: Keys, user: str) -> list[UserEventApplied]:
    out = []
    for _, fields in await redis.xrange(keys.changes):
        change = change_decoder.decode(fields[b"d"])
        if isinstance(change, UserEventApplied) and change.user_id == user:
            out.append(change)
    return out


async def test_an_ok_standing_does_not_lift_a_suspension_for_failed_payments(
    settings: Settings, clock: ManualClock, redis: Redis, pg: asyncpg.Pool, billing: Receiver,
) -> None:
    s = sink_settings(settings, billing, billing_fail_open=True)
    keys = Keys(s.prefix)
    await seeded(redis, keys, clock, ["pete"])
    billing.set_account("pete", "ok", 1.0)
    running = Running(s, clock)
    await up(redis, keys, running)
    async with Client(s, timeout_s=EVENT_TIMEOUT_S) as client:
        assert isinstance(await client.allocate("pete"), Allocated)
        start = clock.now_ms()
        await wait_until(lambda: checked_after(redis, keys, "pete", start))
        last = ""
        for _ in range(s.payment_failure_threshold):
            last = await send(redis, keys, clock, type="billing.payment_failed",
                              user_id="pete", amount=9.0)
        await wait_until(lambda: applied(redis, keys, "pete", last))
        assert await state(redis, keys, "pete") == ("suspended", "suspended")
        # the service says ok: the refresher sends nothing (suspension is not its part)
        clock.advance((s.billing_standing_ttl_s + 1) * 1000)
        now = clock.now_ms()
        await wait_until(lambda: checked_after(redis, keys, "pete", now))
        assert await standings_sent(redis, keys, "pete") == []
        # and a standing sent anyway (newer than everything) keeps the suspension
        ok = await send(redis, keys, clock, type="billing.standing", user_id="pete",
                        status="ok", balance=1.0, observed_at_ms=clock.now_ms() + 1)
        await wait_until(lambda: applied(redis, keys, "pete", ok))
        assert await state(redis, keys, "pete") == ("suspended", "suspended")
        refused = await client.allocate("pete")
        assert isinstance(refused, Failed) and refused.reason == "user_suspended", refused
        # a payment lifts it
        paid = await send(redis, keys, clock, type="billing.payment_success", user_id="pete",
                          amount=9.0)
        await wait_until(lambda: applied(redis, keys, "pete", paid))
        assert await state(redis, keys, "pete") == ("active", "ok")
        assert isinstance(await client.allocate("pete"), Allocated)
        await wait_until(lambda: persisted_is(pg, "pete", ("active", "ok")))
        await wait_until(lambda: consistent(redis, keys, pg, clock))
    await running.close()


async def test_a_standing_delivered_twice_is_applied_once(
    settings: Settings, clock: ManualClock, redis: Redis, pg: asyncpg.Pool, billing: Receiver,
) -> None:
    s = sink_settings(settings, billing)
    keys = Keys(s.prefix)
    await seeded(redis, keys, clock, ["quinn"])
    running = Running(s, clock)
    await up(redis, keys, running)
    event = {"type": "billing.standing", "event_id": "quinn-once", "user_id": "quinn",
             "status": "overdue", "balance": -2.0, "observed_at_ms": clock.now_ms()}
    await send(redis, keys, clock, **event)
    await send(redis, keys, clock, **event)
    last = text((await redis.xrevrange(keys.events, count=1))[0][0])

    async def both_acked() -> bool:
        for group in await redis.xinfo_groups(keys.events):
            if text(group["name"]) == GROUP_EVENTS:
                return bool(text(group["last-delivered-id"]) == last and group["pending"] == 0)
        return False
    await wait_until(both_acked)
    await running.close()
    assert await state(redis, keys, "quinn") == ("overdue", "overdue")
    once = [c for c in await user_changes(redis, keys, "quinn")
            if c.event_id == "quinn-once"]
    assert len(once) == 1 and once[0].balance == -2.0, once
