"""Batch requests: many devices in one allocate request, many allocations in one release.

Through the real pipeline: an all_or_nothing batch larger than what fits allocates
nothing (every device stays free, the user's usage and holds come back to zero) and one
that fits gets every device at once; best_effort gets what fits and one failure, with
its reason, per device not given; the quota is checked for the whole set (the device
count at admission, the resource totals device by device at select); a batch retried
with its request id gets its first answer and allocates nothing more; a release batch
answers per allocation (released, already released, not found, not owner). The audit
finds Redis and PostgreSQL consistent after, and a rebuild keeps a batch's answer.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg
import orjson
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from schemas.keys import Keys
from schemas.messages import (
    AllocatedBatch,
    DeviceSpec,
    Failed,
    QuotaSpec,
    ReleasedBatch,
    reply_decoder,
)
from stages.settings import Settings
from stages.tools.admin import delete_keys, stats, user_state, write_behind_drained
from stages.tools.audit import audit
from stages.tools.client import Client
from stages.tools.rebuild import rebuild
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, seed, wait_until
from tests.test_admin import devsched_command


def devices(n: int, pool: str = "default", cpu: int = 2) -> list[DeviceSpec]:
    return [DeviceSpec(id=f"{pool}-{i}", pool=pool, cpu_cores=cpu) for i in range(n)]


async def test_all_or_nothing_larger_than_the_free_pool_allocates_nothing(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=devices(3), quotas=[QuotaSpec(user_id="u")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate_many("u", 5)
        assert isinstance(got, AllocatedBatch), got
        assert (got.mode, got.success_count, got.failed_count) == ("all_or_nothing", 0, 5)
        assert got.allocations == []
        assert {f.reason for f in got.failures} == {"no_available_devices"}
        assert "3 of 5" in got.failures[0].message
        assert (await stats(redis, keys)).free == 3
        state = await user_state(redis, keys, "u")
        assert state.usage == {"devices": 0, "cpu": 0, "mem": 0, "sto": 0} and state.holds == {}

        fits = await client.allocate_many("u", 3, request_id="three")
        assert isinstance(fits, AllocatedBatch) and fits.success_count == 3, fits
        assert len({a.device.id for a in fits.allocations}) == 3
        assert len({a.allocation_id for a in fits.allocations}) == 3
        assert all(a.request_id == "three" for a in fits.allocations)
        again = await client.allocate_many("u", 3, request_id="three")  # its first answer
        assert again == fits
    state = await user_state(redis, keys, "u")
    assert state.usage["devices"] == 3 and state.usage["cpu"] == 6 and state.holds == {}
    assert sorted(state.allocations) == sorted(a.allocation_id for a in fits.allocations)
    assert (await stats(redis, keys)).free == 0
    await wait_until(lambda: write_behind_drained(redis, keys))
    assert (await audit(redis, keys, pg))["consistent"]


async def test_best_effort_takes_what_fits_and_names_a_reason_per_missing_device(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=devices(3) + devices(2, pool="other"),
               quotas=[QuotaSpec(user_id="u")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate_many("u", 5, best_effort=True, pool="default")
    assert isinstance(got, AllocatedBatch), got
    assert (got.mode, got.success_count, got.failed_count) == ("best_effort", 3, 2)
    assert {a.device.id for a in got.allocations} == {"default-0", "default-1", "default-2"}
    assert [f.reason for f in got.failures] == ["no_available_devices"] * 2
    state = await user_state(redis, keys, "u")
    assert state.usage["devices"] == 3 and state.holds == {}


async def test_the_quota_is_checked_for_the_whole_set(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=devices(8), quotas=[
        QuotaSpec(user_id="three", max_devices=3), QuotaSpec(user_id="cpu", total_cpu_cores=4)])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        # the device count: refused whole at admission, or as many as there is room for
        refused = await client.allocate_many("three", 4)
        assert isinstance(refused, Failed) and refused.reason == "quota_exceeded", refused
        assert "Requested: 4" in refused.message
        some = await client.allocate_many("three", 4, best_effort=True)
        assert isinstance(some, AllocatedBatch) and some.success_count == 3, some
        assert [f.reason for f in some.failures] == ["quota_exceeded"]
        # the CPU total (4 cores, 2 per device): the third device does not fit
        none = await client.allocate_many("cpu", 3)
        assert isinstance(none, AllocatedBatch) and none.success_count == 0, none
        assert {f.reason for f in none.failures} == {"quota_exceeded"}
        two = await client.allocate_many("cpu", 3, best_effort=True)
        assert isinstance(two, AllocatedBatch) and two.success_count == 2, two
    for user, n in (("three", 3), ("cpu", 2)):
        state = await user_state(redis, keys, user)
        assert state.usage["devices"] == n and state.holds == {}, (user, state)
    assert (await user_state(redis, keys, "cpu")).usage["cpu"] == 4


async def test_a_release_batch_answers_per_allocation(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=devices(4),
               quotas=[QuotaSpec(user_id="u"), QuotaSpec(user_id="v")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        mine = await client.allocate_many("u", 3)
        theirs = await client.allocate("v")
        assert isinstance(mine, AllocatedBatch) and mine.success_count == 3
        ids = [a.allocation_id for a in mine.allocations]
        first = await client.release_many(ids[:1], user_id="u")
        assert isinstance(first, ReleasedBatch) and first.success_count == 1
        clock.advance(7_000)
        done = await client.release_many(
            [*ids, "no-such", theirs.allocation_id], user_id="u")  # type: ignore[union-attr]
    assert isinstance(done, ReleasedBatch), done
    assert (done.success_count, done.failed_count) == (3, 2)
    assert [(r.allocation_id, r.already_released) for r in done.releases] == [
        (ids[0], True), (ids[1], False), (ids[2], False)]
    assert all(r.duration_seconds == 7 for r in done.releases[1:])
    assert [f.reason for f in done.failures] == ["not_found", "not_owner"]
    assert (await user_state(redis, keys, "u")).usage["devices"] == 0
    assert (await stats(redis, keys)).active == 1


async def test_the_commands_ask_for_and_release_a_batch(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=devices(2), quotas=[QuotaSpec(user_id="u")])
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix)

    async def run(*args: str) -> tuple[int, dict[str, object]]:
        proc = await asyncio.create_subprocess_exec(
            devsched_command(), *args, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), EVENT_TIMEOUT_S)
        assert proc.returncode is not None, err.decode()
        return proc.returncode, orjson.loads(out)

    code, got = await run("allocate", "u", "--count", "3", "--best-effort")
    assert code == 0 and got["type"] == "allocated_batch" and got["success_count"] == 2, got
    ids = [a["allocation_id"] for a in got["allocations"]]  # type: ignore[union-attr]
    code, done = await run("release", "--allocations", ",".join(ids), "--user", "u")
    assert code == 0 and done["type"] == "released_batch" and done["success_count"] == 2, done


async def test_a_rebuild_keeps_a_batchs_answer_so_a_retry_gets_no_second_set(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=devices(6), quotas=[QuotaSpec(user_id="u")])
    async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
        got = await client.allocate_many("u", 3, request_id="b1")
    assert isinstance(got, AllocatedBatch) and got.success_count == 3
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()
    await delete_keys(redis, settings.prefix)
    await rebuild(redis, keys, pg, settings, clock)
    stored = reply_decoder.decode(await redis.get(keys.user("u").replace(":user", ":req:b1")))
    assert isinstance(stored, AllocatedBatch)
    # the same allocations (PostgreSQL keeps no batch order: the answer lists them by id)
    assert sorted(a.allocation_id for a in stored.allocations) == sorted(
        a.allocation_id for a in got.allocations)
    assert (await user_state(redis, keys, "u")).usage["devices"] == 3
