"""Memory that stays bounded: under a steady load, what requests leave in Redis lives
only for the retention windows, so memory is flat once the first window has passed.

A redis-server of this test alone (so ``used_memory`` and the key count are the
pipeline's), the session's PostgreSQL, every stage but notify (whose outbound stream
is capped by length, 100k entries, not by time), the system clock, and windows of
``WINDOW_S`` seconds (``DEVSCHED_IDEMPOTENCY_TTL_S``, ``DEVSCHED_RELEASED_TTL_S``,
``DEVSCHED_REPLY_TTL_S``), ticks every 100 ms and trims every 2 ticks. The load is
paced (``CYCLES`` allocate+release cycles every ``ROUND_S``), so requests keep
growing linearly while the keys and bytes they leave must not: the largest sample of
the last rounds is compared with the largest of the rounds right after the first
window. When the load stops, everything it left expires: the key count returns to
what it was before the load (waited for, with a generous bound).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from pipeline.clock import SystemClock
from pipeline.connections import redis_client
from pipeline.embedded import redis_server
from pipeline.embedded.layout import Layout
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, QuotaSpec, Released
from stages.app import serve
from stages.settings import Settings
from stages.state import mark_state
from stages.tools.admin import add_devices, set_quotas
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, wait_until

WINDOW_S = 2
"""Every retention window of the test, in seconds."""
ROUND_S = 0.5
CYCLES = 100
"""Cycles per round: 400 requests/s offered."""
ROUNDS = 20
"""Five windows of load."""
STAGES = ["quota", "select", "persist", "bill", "timers"]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[redis_server.RedisRecord]:
    layout = Layout.of(tmp_path / "own")
    record = redis_server.start(layout)
    yield record
    redis_server.stop(layout, record)


async def test_memory_is_flat_after_the_retention_window(
    settings: Settings, own_redis: redis_server.RedisRecord, pg: asyncpg.Pool,
) -> None:
    short = replace(settings, redis_url=own_redis.url, idempotency_ttl_s=WINDOW_S,
                    released_ttl_s=WINDOW_S, reply_ttl_s=WINDOW_S, tick_ms=100,
                    trim_every_ticks=2, write_linger_ms=0)
    keys, clock = Keys(short.prefix), SystemClock()
    redis = redis_client(short)
    await mark_state(redis, keys, by="test", now_ms=clock.now_ms())
    await add_devices(redis, keys, clock, [DeviceSpec(id=f"d{i}") for i in range(2 * CYCLES)])
    await set_quotas(redis, keys, clock, [QuotaSpec(user_id=f"u{i}", max_devices=CYCLES)
                                          for i in range(10)])
    stop = asyncio.Event()
    task = asyncio.create_task(serve(STAGES, short, clock, stop=stop, install_signals=False))
    samples: list[tuple[int, int, int]] = []  # (requests so far, keys, used_memory)
    try:
        async with Client(short, timeout_s=EVENT_TIMEOUT_S) as client:
            async def cycle(n: int) -> None:
                got = await client.allocate(f"u{n % 10}")
                assert isinstance(got, Allocated), got
                done = await client.release(allocation_id=got.allocation_id)
                assert isinstance(done, Released), done

            await cycle(0)  # warm: every stage up
            await asyncio.sleep(WINDOW_S + 1)  # what the warm-up left has expired
            base_keys = int(await redis.dbsize())
            base_names = {k async for k in redis.scan_iter(count=1000)}
            base_memory = int((await redis.info("memory"))["used_memory"])
            started = time.monotonic()
            for r in range(ROUNDS):
                await asyncio.gather(*(cycle(n) for n in range(CYCLES)))
                samples.append(((r + 1) * CYCLES * 2, int(await redis.dbsize()),
                                int((await redis.info("memory"))["used_memory"])))
                await asyncio.sleep(max(0.0, started + (r + 1) * ROUND_S - time.monotonic()))
            elapsed = time.monotonic() - started
        assert not task.done()

        first_window = int(WINDOW_S / ROUND_S) + 1
        early = samples[first_window:first_window + 4]  # just after the first window
        late = samples[-4:]  # the end, after four more windows of load
        early_keys, late_keys = max(s[1] for s in early), max(s[1] for s in late)
        early_mem, late_mem = max(s[2] for s in early), max(s[2] for s in late)
        assert late[-1][0] >= 2 * early[-1][0]  # the requests kept growing ...
        assert late_keys <= 1.5 * early_keys  # ... the keys they leave did not
        assert late_mem - base_memory <= 1.5 * (early_mem - base_memory) + 256 * 1024

        # keys a timer job may make once, whatever the load (the smart model, the tracked
        # jobs' and the schedules' state), are not left by requests
        once = (b":{pool}:smart", b":{jobs}:", b":{sched}:")

        async def left_by_requests() -> list[bytes]:
            now = {k async for k in redis.scan_iter(count=1000)}
            return sorted(k for k in now - base_names if not any(m in k for m in once))

        async def all_expired() -> bool:  # nothing outlives its window once the load stops
            return not await left_by_requests()
        try:
            await wait_until(all_expired)
        except AssertionError:
            raise AssertionError((await left_by_requests())[:20]) from None

        requests = samples[-1][0]
        rate = requests / elapsed
        kept = sum(s[2] for s in late) / len(late) - base_memory
        print(f"\nmemory soak: {requests} requests in {elapsed:.1f} s ({rate:.0f}/s), windows "
              f"{WINDOW_S} s: keys {base_keys} before, {early_keys} after the first window, "
              f"{late_keys} at the end; used_memory +{(early_mem - base_memory) / 1024:.0f} "
              f"KiB after the first window, +{kept / 1024:.0f} KiB at the end "
              f"(~{kept / (rate * WINDOW_S):.0f} bytes per request inside the window); "
              f"back to {int(await redis.dbsize())} keys after it")
    finally:
        stop.set()
        await asyncio.wait_for(task, EVENT_TIMEOUT_S)
        await redis.flushdb()
        await redis.aclose()
