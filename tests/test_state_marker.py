"""Never serve from an empty or foreign state: the state marker (stages/state.py).

Without the marker's epoch the quota and select scripts change nothing and ack
nothing (their stages raise StateMissing, the worker keeps the batch and logs why);
a running pipeline holds requests while Redis is empty and serves them once the
state is rebuilt; admin changes are refused; `devsched devices add` never makes a
device free while PostgreSQL shows it held; `up`/`run` (recover) mark a fresh state
and run again a rebuild that was cut short.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import text
from pipeline.worker import Entry
from schemas.keys import GROUP_QUOTA, GROUP_SELECT, Keys
from schemas.messages import Allocated, AllocateRequest, DeviceSpec, QuotaSpec, encoder
from stages.context import StageContext
from stages.quota import QuotaStage
from stages.select import SelectStage
from stages.settings import Settings
from stages.state import StateMissing, mark_rebuilding, mark_state, read_marker
from stages.tools.admin import add_devices, delete_keys, set_quotas, write_behind_drained
from stages.tools.client import Client
from stages.tools.rebuild import rebuild, recover
from tests.conftest import RunningPipeline, seed, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEVICES = [DeviceSpec(id="d1", cpu_cores=2, memory_mb=4096),
           DeviceSpec(id="d2", cpu_cores=2, memory_mb=4096)]
QUOTAS = [QuotaSpec(user_id="alice")]


async def key_set(redis: Redis, keys: Keys) -> set[str]:
    return {text(k) async for k in redis.scan_iter(match=f"{keys.prefix}:*", count=1000)}


async def read_group(redis: Redis, stream: str, group: str) -> list[Entry]:
    reply = await redis.xreadgroup(group, "t", {stream: ">"}, count=100)
    return [Entry(stream, text(eid), dict(fields)) for _s, items in reply for eid, fields in items]


async def pending(redis: Redis, stream: str, group: str) -> int:
    return int((await redis.xpending(stream, group))["pending"])


async def test_without_the_marker_quota_and_select_change_and_ack_nothing(
    ctx: StageContext, redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    for stream, group in ((keys.requests, GROUP_QUOTA), (keys.admitted, GROUP_SELECT)):
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    quota, select = QuotaStage(ctx), SelectStage(ctx)
    await redis.xadd(keys.requests, {"d": encoder.encode(AllocateRequest(
        request_id="r1", user_id="alice", reply_to=keys.reply("c")))})
    requests = await read_group(redis, keys.requests, GROUP_QUOTA)

    epoch = (await read_marker(redis, keys))["epoch"]
    await redis.delete(keys.state)
    before = await key_set(redis, keys)
    with pytest.raises(StateMissing, match="no state marker"):
        await quota.handle(requests)
    assert await key_set(redis, keys) == before  # no reply, no hold, no admitted entry
    assert await pending(redis, keys.requests, GROUP_QUOTA) == 1  # not acked

    await mark_state(redis, keys, by="test", now_ms=clock.now_ms(), epoch=epoch)
    await quota.handle(requests)
    assert await pending(redis, keys.requests, GROUP_QUOTA) == 0
    admitted = await read_group(redis, keys.admitted, GROUP_SELECT)
    assert len(admitted) == 1

    await mark_rebuilding(redis, keys, now_ms=clock.now_ms())  # a marker without an epoch
    before = await key_set(redis, keys)
    with pytest.raises(StateMissing):
        await select.handle(admitted)
    assert await key_set(redis, keys) == before  # no allocation, no reply, no change
    assert await pending(redis, keys.admitted, GROUP_SELECT) == 1

    await mark_state(redis, keys, by="test", now_ms=clock.now_ms(), epoch=epoch)
    await select.handle(admitted)
    assert await pending(redis, keys.admitted, GROUP_SELECT) == 0
    assert await redis.zcard(keys.expiry) == 1


async def test_a_running_pipeline_holds_requests_while_redis_is_empty_and_serves_them_after(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool, caplog: pytest.LogCaptureFixture,
) -> None:
    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    async with Client(settings, timeout_s=10) as client:
        first = await client.allocate("alice", request_id="r1")
        assert isinstance(first, Allocated)
    await wait_until(lambda: write_behind_drained(redis, keys))

    caplog.set_level(logging.WARNING, logger="devsched.worker")
    await delete_keys(redis, settings.prefix)  # Redis came back empty
    async with Client(settings, timeout_s=60) as client:
        waiting = asyncio.create_task(client.allocate("alice", request_id="r2"))

        async def held() -> bool:  # delivered to quota, refused by the script, kept
            try:
                return await pending(redis, keys.requests, GROUP_QUOTA) == 1
            except Exception:  # noqa: BLE001 - no group yet
                return False

        await wait_until(held)
        await wait_until(lambda: asyncio.sleep(0, "no state marker" in caplog.text))
        assert not waiting.done()  # no answer from nothing
        assert not await redis.exists(keys.user("alice"))

        report = await rebuild(redis, keys, pg, settings, clock)
        assert report.devices == 2 and report.active == 1
        got = await waiting
    assert isinstance(got, Allocated) and got.device.id != first.device.id
    assert not pipeline.task.done()


async def test_admin_changes_are_refused_without_the_marker(
    redis: Redis, keys: Keys, clock: ManualClock,
) -> None:
    await redis.delete(keys.state)
    with pytest.raises(StateMissing, match="the change is refused"):
        await add_devices(redis, keys, clock, DEVICES)
    with pytest.raises(StateMissing):
        await set_quotas(redis, keys, clock, QUOTAS)
    assert await key_set(redis, keys) == set()


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix)
    return subprocess.run([sys.executable, "-m", "stages.tools.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


async def test_devices_add_never_frees_a_device_postgresql_shows_held(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
    clock: ManualClock, pg: asyncpg.Pool,
) -> None:
    await seed(redis, keys, clock, devices=DEVICES[:1], quotas=QUOTAS)
    async with Client(settings, timeout_s=10) as client:
        got = await client.allocate("alice", request_id="r1")
        assert isinstance(got, Allocated)
    await wait_until(lambda: write_behind_drained(redis, keys))
    await pipeline.close()

    # Redis emptied: refused, nothing written
    await delete_keys(redis, settings.prefix)
    done = await asyncio.to_thread(_cli, settings, "devices", "add", "--id", "d1")
    assert done.returncode == 1 and "no state marker" in done.stderr
    assert not await redis.exists(keys.device("d1"))

    # Redis lost the allocation's last writes (d1 free there), PostgreSQL holds it: refused
    await mark_state(redis, keys, by="test", now_ms=clock.now_ms())
    await add_devices(redis, keys, clock, DEVICES[:1])
    assert text(await redis.hget(keys.device("d1"), "status")) == "available"
    done = await asyncio.to_thread(_cli, settings, "devices", "add", "--id", "d1", "--cpu", "4")
    assert done.returncode == 1 and got.allocation_id in done.stderr
    assert text(await redis.hget(keys.device("d1"), "cpu_cores")) == "2"  # untouched

    # a device nobody holds is added
    done = await asyncio.to_thread(_cli, settings, "devices", "add", "--id", "d9")
    assert done.returncode == 0, done.stderr
    assert text(await redis.hget(keys.device("d9"), "status")) == "available"


async def test_recover_marks_a_fresh_state_and_runs_a_cut_short_rebuild_again(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock, pg: asyncpg.Pool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await redis.delete(keys.state)
    await recover(settings)  # both empty: a fresh install
    assert (await read_marker(redis, keys))["by"] == "up"

    await seed(redis, keys, clock, devices=DEVICES, quotas=QUOTAS)
    async with pg.acquire() as conn:  # PostgreSQL has the devices (as persist wrote them)
        await conn.execute(
            "INSERT INTO devices (id, name, pool, model, host, adb_host, adb_port, cpu_cores, "
            "memory_mb, storage_mb, status, version) VALUES ('d1', 'd1', 'default', 'generic', "
            "'node-1', '127.0.0.1', 5555, 2, 4096, 32768, 'available', 1)")
    await redis.delete(keys.changes)  # no backlog: nothing a rebuild would lose
    await recover(settings)  # the marker is there: nothing to do
    assert "rebuild" not in capsys.readouterr().out

    await mark_rebuilding(redis, keys, now_ms=clock.now_ms())  # a rebuild died half-way
    await recover(settings)
    assert "cut short" in capsys.readouterr().out
    marker = await read_marker(redis, keys)
    assert marker["by"] == "rebuild" and "rebuilding" not in marker
    assert await redis.smembers(keys.devices) == {b"d1"}  # PostgreSQL's state, whole
