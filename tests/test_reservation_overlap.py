"""Property: concurrent bookings never double-book a device, in Redis or in PostgreSQL.

Hypothesis draws, for a pool of its own of three devices, a batch of reserve requests
(a named device, or "any device of the pool"; a start 1 to 40 minutes ahead; 1 to 20
minutes long). They are sent at once by two producers (two clients, interleaved) to two
sets of request-path workers (two quota and two select consumers in their groups, on
one real Redis), with persist writing behind (the only stage behind the reply here). Then:

* every answer is ``reserved`` or ``failed`` ``overlaps``;
* in Redis, each device's bookings are exactly the reservations answered ``reserved``
  on it, and no two of them overlap;
* every refusal is justified: its interval overlaps a booking of its device (of every
  device of the pool, for "any device") among those finally booked (no booking is
  cancelled here, so a booking that refused it is still there);
* in PostgreSQL (after the write-behind drained), the ``reservations`` rows of the pool
  are the same reservations, pairwise non-overlapping per device.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from itertools import combinations, count

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pipeline.clock import ManualClock
from pipeline.connections import pg_pool, redis_client, text
from pipeline.embedded import ServerUrls
from pipeline.worker import groups_caught_up
from schemas.keys import GROUP_PERSIST, Keys
from schemas.messages import DeviceSpec, Failed, QuotaSpec, Reserved
from stages.app import serve
from stages.state import mark_state
from stages.tools.admin import add_devices, set_quotas
from stages.tools.client import Client
from tests.conftest import wait_until
from tests.test_allocation_invariants import START_MS, base_settings, fresh_prefix

MIN = 60_000
DEVICES = 3
SETTLE_TIMEOUT_S = 30.0
"""Longest wait for the answers and the write-behind (a passing run never waits it out)."""

Ask = tuple[int | None, int, int]
"""(device index or None for any device of the pool, start minute, length in minutes)."""


def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_concurrent_bookings_never_double_book_a_device(servers: ServerUrls) -> None:
    settings = replace(base_settings(servers), prefix=fresh_prefix())
    keys, clock = Keys(settings.prefix), ManualClock(START_MS)
    stop = asyncio.Event()
    examples = count()

    with asyncio.Runner() as runner:
        redis = redis_client(settings)
        clients = [Client(settings, timeout_s=SETTLE_TIMEOUT_S) for _ in range(2)]
        pg = runner.run(pg_pool(settings))

        async def start() -> list[asyncio.Task[None]]:
            await mark_state(redis, keys, by="test", now_ms=clock.now_ms())
            tasks = [asyncio.create_task(serve(names, settings, clock, stop=stop,
                                               install_signals=False))
                     for names in (["quota", "select", "persist"], ["quota", "select"])]
            await set_quotas(redis, keys, clock, [QuotaSpec(user_id=u) for u in ("a", "b")])
            for c in clients:
                await c.start()
            return tasks

        tasks = runner.run(start())
        try:
            @hsettings(max_examples=20, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow])
            @given(asks=st.lists(st.tuples(st.none() | st.integers(0, DEVICES - 1),
                                           st.integers(1, 40), st.integers(1, 20)),
                                 min_size=1, max_size=24))
            def check(asks: list[Ask]) -> None:
                pool = f"p{next(examples)}"
                devices = [f"{pool}-d{i}" for i in range(DEVICES)]
                runner.run(add_devices(redis, keys, clock,
                                       [DeviceSpec(id=d, pool=pool) for d in devices]))

                async def book(i: int, ask: Ask) -> Reserved | Failed:
                    dev, start, length = ask
                    s = clock.now_ms() + start * MIN
                    return await clients[i % 2].reserve(
                        "ab"[i % 2], s, s + length * MIN,
                        device_id=None if dev is None else devices[dev],
                        pool=pool if dev is None else None)

                async def all_at_once() -> list[Reserved | Failed]:
                    return list(await asyncio.gather(*(book(i, a) for i, a in enumerate(asks))))

                replies = runner.run(all_at_once())
                booked: dict[str, list[tuple[int, int]]] = {d: [] for d in devices}
                ids: dict[str, set[str]] = {d: set() for d in devices}
                for reply in replies:
                    if isinstance(reply, Reserved):
                        booked[reply.device_id].append((reply.start_ms, reply.end_ms))
                        ids[reply.device_id].add(reply.reservation_id)
                    else:
                        assert isinstance(reply, Failed) and reply.reason == "overlaps", reply
                for dev in devices:
                    for a, b in combinations(booked[dev], 2):
                        assert not overlap(a, b), (dev, a, b)

                    async def in_redis(dev: str = dev) -> set[str]:
                        return {text(m) for m in await redis.zrange(keys.bookings(dev), 0, -1)}

                    assert runner.run(in_redis()) == ids[dev]
                for (dev, start, length), reply in zip(asks, replies, strict=True):
                    if isinstance(reply, Failed):
                        s = clock.now_ms() + start * MIN
                        wanted = (s, s + length * MIN)
                        on = devices if dev is None else [devices[dev]]
                        assert all(any(overlap(wanted, b) for b in booked[d]) for d in on), (
                            dev, wanted, booked)

                async def from_pg() -> dict[str, list[tuple[str, int, int]]]:
                    await wait_until(lambda: groups_caught_up(redis, keys.changes,
                                                              [GROUP_PERSIST]),
                                     SETTLE_TIMEOUT_S)
                    async with pg.acquire() as conn:
                        rows = await conn.fetch(
                            "SELECT id::text, device_id, start_at, end_at FROM reservations"
                            " WHERE pool = $1", pool)
                    found: dict[str, list[tuple[str, int, int]]] = {d: [] for d in devices}
                    for r in rows:
                        found[r["device_id"]].append(
                            (r["id"], round(r["start_at"].timestamp() * 1000),
                             round(r["end_at"].timestamp() * 1000)))
                    return found

                in_pg = runner.run(from_pg())
                for dev in devices:
                    assert {r[0] for r in in_pg[dev]} == ids[dev]
                    for a, b in combinations(in_pg[dev], 2):
                        assert not overlap(a[1:], b[1:]), (dev, a, b)

            check()
        finally:
            async def stop_all() -> None:
                stop.set()
                for c in clients:
                    await c.close()
                await asyncio.wait_for(asyncio.gather(*tasks), SETTLE_TIMEOUT_S)
                found = [k async for k in redis.scan_iter(match=f"{settings.prefix}:*",
                                                          count=1000)]
                if found:
                    await redis.delete(*found)
                await redis.aclose()
                await pg.close()

            runner.run(stop_all())
