"""The pipeline as a system under test: the hook the benchmark runner drives.

What it must provide (the runner calls exactly these, in this order):

1. ``await start_pipeline(redis_url, database_url, workers_per_stage, devices=, users=)``
   starts the stage workers (``workers_per_stage`` processes per stage on the
   request path and the change consumers behind it), loads ``devices`` devices
   and ``users`` users with generous quotas (the same population the baseline
   gets: ``baseline.create``), and returns a ``PipelineHandle`` once the
   workers are consuming. It raises ``NotImplementedError`` while the pipeline
   cannot be benchmarked yet; the runner then skips the pipeline and says so.
2. ``await reset_pipeline(handle)`` before every measured point: every device
   free, no usage, no allocations, streams drained (the baseline gets the same).
3. The runner hands ``handle.factory`` to ``benchmarks.loadgen``; in each
   producer process ``make_cycle(redis_url, users, seed)`` builds the cycle:
   allocate for a random user through the producer client, await the reply,
   ``loadgen.mark("allocate")``, release, await that reply. Success returns
   None; a refusal returns its reason (``quota:...``, ``no_device``, ...).
   Mix ``loadgen.producer_seed()`` into the random generator so producer
   processes draw different users.
4. ``await stop_pipeline(handle)`` stops the workers (cleanly, then bounded
   kill) and removes what ``start_pipeline`` created. Called once per handle,
   also after a failure.

Promises the runner relies on: every call returns within a bounded time, and
nothing here prints to stdout (the last line there may be the JSON report).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from redis.asyncio import Redis

from benchmarks.baseline import CPU_CHOICES, MEM_CHOICES_MB
from benchmarks.loadgen import CycleFactory, CycleParts, mark, mark_since, producer_seed
from pipeline.clock import SystemClock
from pipeline.commands import migrate_database
from pipeline.connections import pg_pool, redis_client, text
from pipeline.runner import spawn_run, stop_run
from schemas.keys import Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec
from stages.app import APP
from stages.settings import Settings
from stages.state import mark_state
from stages.tools.admin import (
    add_devices,
    delete_keys,
    empty_tables,
    set_quotas,
    write_behind_drained,
)
from stages.tools.audit import audit
from stages.tools.client import Client
from stages.tools.demo import workers_ready

READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


@dataclass
class PipelineHandle:
    """A running pipeline under test."""

    factory: CycleFactory
    workers_per_stage: int
    state: Any = None


@dataclass
class _State:
    settings: Settings
    process: subprocess.Popen[bytes]
    users: int
    last_audit: dict[str, Any] = field(default_factory=dict)


def population(devices: int, users: int, seed: int = 7) -> tuple[list[DeviceSpec], list[QuotaSpec]]:
    """The baseline's population: same device sizes, same generous quotas."""
    rng = random.Random(seed)
    specs = [
        DeviceSpec(id=f"bd{i}", cpu_cores=rng.choice(CPU_CHOICES), memory_mb=rng.choice(MEM_CHOICES_MB),
                   storage_mb=rng.choice((32_768, 65_536)), adb_port=5555)
        for i in range(1, devices + 1)
    ]
    quotas = [
        QuotaSpec(user_id=f"bu{u}", max_devices=50, max_cpu_per_device=8,
                  max_memory_mb_per_device=8192, total_cpu_cores=400, total_memory_gb=400,
                  total_storage_gb=1_000_000)
        for u in range(1, users + 1)
    ]
    return specs, quotas


async def load_population(redis: Redis, keys: Keys, devices: int, users: int) -> None:
    """A fresh live state under ``keys`` (new state marker) holding :func:`population`."""
    clock = SystemClock()
    await mark_state(redis, keys, by="bench", now_ms=clock.now_ms())
    specs, quotas = population(devices, users)
    for i in range(0, len(specs), 500):
        await add_devices(redis, keys, clock, specs[i:i + 500])
    for i in range(0, len(quotas), 500):
        await set_quotas(redis, keys, clock, quotas[i:i + 500])


async def start_pipeline(redis_url: str, database_url: str, workers_per_stage: int, *,
                         devices: int, users: int) -> PipelineHandle:
    """Start every stage (``workers_per_stage`` processes each) on a fresh key prefix."""
    settings = Settings.from_env().with_urls(redis_url, database_url)
    settings = replace(settings, prefix=f"bench{uuid.uuid4().hex[:8]}")
    await migrate_database(APP, database_url)
    pg = await pg_pool(settings)
    await empty_tables(pg)
    await pg.close()
    keys = Keys(settings.prefix)
    redis = redis_client(settings)
    try:
        await load_population(redis, keys, devices, users)
        process = spawn_run(APP, settings, workers_per_stage)
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
        while not await workers_ready(redis, keys):
            if asyncio.get_running_loop().time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("pipeline workers did not start")
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
    state = _State(settings=settings, process=process, users=users)
    factory = CycleFactory(make_cycle, (redis_url, settings.prefix, users, 1))
    return PipelineHandle(factory=factory, workers_per_stage=workers_per_stage, state=state)


async def _drain(settings: Settings) -> None:
    """Wait until every change has been written behind, then release leftovers."""
    keys = Keys(settings.prefix)
    redis = redis_client(settings)
    try:
        active = [text(m) for m in await redis.zrange(keys.expiry, 0, -1)]
        if active:  # allocations whose cycle timed out: give them back through the pipeline
            async with Client(settings, timeout_s=30) as client:
                await asyncio.gather(*[client.release(allocation_id=a) for a in active])
        deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
        while not await write_behind_drained(redis, keys):
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("write-behind did not drain")
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()


async def redis_used_memory(redis_url: str) -> int:
    """Bytes the Redis server uses now (INFO memory ``used_memory``)."""
    redis = redis_client(Settings(redis_url=redis_url))
    try:
        return int((await redis.info("memory"))["used_memory"])
    finally:
        await redis.aclose()


async def reset_pipeline(handle: PipelineHandle) -> None:
    """All devices free, no usage, no backlog: every cycle releases what it took."""
    await _drain(handle.state.settings)


async def verify_pipeline(handle: PipelineHandle) -> dict[str, Any]:
    """Drain the write-behind and compare PostgreSQL with Redis."""
    state: _State = handle.state
    await _drain(state.settings)
    redis = redis_client(state.settings)
    pg = await pg_pool(state.settings)
    try:
        state.last_audit = await audit(redis, Keys(state.settings.prefix), pg)
    finally:
        await pg.close()
        await redis.aclose()
    return state.last_audit


async def stop_pipeline(handle: PipelineHandle) -> None:
    """Stop the workers (SIGTERM, then kill) and delete the run's keys."""
    state: _State = handle.state
    await asyncio.to_thread(stop_run, state.process, STOP_TIMEOUT_S)
    redis = redis_client(state.settings)
    try:
        await delete_keys(redis, state.settings.prefix)
    finally:
        await redis.aclose()


BATCH_COUNT = 5
"""Devices per request of the batch point."""


def batch_factory(handle: PipelineHandle, count: int = BATCH_COUNT) -> CycleFactory:
    """The loadgen recipe of the batch point on a started pipeline."""
    state: _State = handle.state
    return CycleFactory(make_batch_cycle, (state.settings.redis_url, state.settings.prefix,
                                           state.users, 2, count))


def make_batch_cycle(redis_url: str, prefix: str, users: int, seed: int,
                     count: int) -> CycleParts:
    """Loadgen factory of the batch point: one all_or_nothing allocate of ``count`` devices
    (``loadgen.mark("allocate")`` when answered), then one release of all of them."""
    rng = random.Random(seed * 1_000_003 + producer_seed())
    settings = Settings(redis_url=redis_url, prefix=prefix)
    client = Client(settings, timeout_s=10)

    async def setup() -> None:
        await client.start()

    async def cycle(i: int) -> str | None:
        user = f"bu{rng.randint(1, users)}"
        got = await client.allocate_many(user, count, min_cpu_cores=rng.choice(CPU_CHOICES[:3]))
        if isinstance(got, Failed):
            return f"{got.reason}"
        mark("allocate")
        if not got.success_count:
            return "no_device" if got.failures[0].reason == "no_available_devices" else (
                f"{got.failures[0].reason}")
        done = await client.release_many([a.allocation_id for a in got.allocations],
                                         user_id=user)
        if isinstance(done, Failed) or done.failed_count:
            return "release_failed"
        return None

    async def teardown() -> None:
        await client.close()

    return CycleParts(setup, cycle, teardown)


HANDOFF_POOL = "handoff"
"""The pool of the queue hand-off point: one device, so a second request has to wait."""
HANDOFF_USERS = ("ho-holder", "ho-waiter")
HANDOFF_WAIT_S = 30
"""How long the waiter of the hand-off point may wait (it is served within milliseconds)."""


async def prepare_handoff(handle: PipelineHandle) -> None:
    """Add the hand-off point's pool (one device) and its two users to a started pipeline."""
    settings: Settings = handle.state.settings
    redis = redis_client(settings)
    keys, clock = Keys(settings.prefix), SystemClock()
    try:
        await add_devices(redis, keys, clock, [DeviceSpec(id="handoff-1", pool=HANDOFF_POOL)])
        await set_quotas(redis, keys, clock, [QuotaSpec(user_id=u) for u in HANDOFF_USERS])
    finally:
        await redis.aclose()


def handoff_factory(handle: PipelineHandle) -> CycleFactory:
    """The loadgen recipe of the queue hand-off point on a started pipeline."""
    state: _State = handle.state
    return CycleFactory(make_handoff_cycle, (state.settings.redis_url, state.settings.prefix))


def make_handoff_cycle(redis_url: str, prefix: str) -> CycleParts:
    """Loadgen factory of the queue hand-off point (one cycle at a time: the pool has one
    device): the holder takes the device; the waiter asks for one with wait_seconds and
    gets its ``queued`` notice; then the holder releases it, and ``handoff`` records the
    time from sending that release to the waiter's ``allocated`` reply (the device handed
    over in the release's own step); the waiter then gives the device back."""
    settings = Settings(redis_url=redis_url, prefix=prefix)
    client = Client(settings, timeout_s=HANDOFF_WAIT_S + 10)
    holder, waiter = HANDOFF_USERS

    async def setup() -> None:
        await client.start()

    async def cycle(i: int) -> str | None:
        held = await client.allocate(holder, pool=HANDOFF_POOL)
        if not isinstance(held, Allocated):
            return f"holder:{held.reason}"
        rid = uuid.uuid4().hex
        answered: list[float] = []

        async def wait_for_device() -> Allocated | Failed:
            got = await client.allocate(waiter, request_id=rid, pool=HANDOFF_POOL,
                                        wait_seconds=HANDOFF_WAIT_S)
            answered.append(time.perf_counter())  # the moment its reply was read
            return got

        task = asyncio.create_task(wait_for_device())
        while rid not in client.queued and not task.done():
            await asyncio.sleep(0.0005)
        if task.done():  # answered without waiting: the device was free
            got = task.result()
            if isinstance(got, Allocated):
                await client.release(allocation_id=got.allocation_id)
            await client.release(allocation_id=held.allocation_id)
            return "not_queued"
        start = time.perf_counter()
        released = await client.release(allocation_id=held.allocation_id)
        got = await task
        if isinstance(released, Failed):
            return f"release:{released.reason}"
        if not isinstance(got, Allocated):
            return f"waiter:{got.reason}"
        mark_since("handoff", start, answered[0])
        done = await client.release(allocation_id=got.allocation_id)
        return f"release:{done.reason}" if isinstance(done, Failed) else None

    async def teardown() -> None:
        await client.close()

    return CycleParts(setup, cycle, teardown)


def make_cycle(redis_url: str, prefix: str, users: int, seed: int) -> CycleParts:
    """Loadgen factory, run inside each producer process: one allocate+release cycle."""
    rng = random.Random(seed * 1_000_003 + producer_seed())
    settings = Settings(redis_url=redis_url, prefix=prefix)
    client = Client(settings, timeout_s=10)

    async def setup() -> None:
        await client.start()

    async def cycle(i: int) -> str | None:
        user = f"bu{rng.randint(1, users)}"
        got = await client.allocate(user, min_cpu_cores=rng.choice(CPU_CHOICES[:3]),
                                    min_memory_mb=rng.choice(MEM_CHOICES_MB[:3]))
        if isinstance(got, Failed):
            return "no_device" if got.reason == "no_available_devices" else f"{got.reason}"
        assert isinstance(got, Allocated)
        mark("allocate")
        done = await client.release(allocation_id=got.allocation_id, user_id=user)
        if isinstance(done, Failed):
            return f"release_{done.reason}"
        return None

    async def teardown() -> None:
        await client.close()

    return CycleParts(setup, cycle, teardown)
