"""Bulk import and export: `devsched devices import|export`, `devsched quota import`.

Run as the operator runs them. An export imports back to the same devices (CSV and
JSON lines: exporting again after a re-import gives the same file), a file with bad
lines names each by its line number and changes nothing (no device, no quota, no
change record), and 145 quotas go in with one command.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from pipeline.runner import child_env
from schemas.keys import Keys
from schemas.messages import DeviceSpec
from stages.settings import Settings
from stages.tools.admin import parse_user_state
from stages.tools.bulk import detect_format, parse_records
from tests.conftest import EVENT_TIMEOUT_S

CSV = """id,pool,model,cpu_cores,memory_mb,storage_mb,adb_port,name,host,adb_host
p-1,eu,pixel,4,8192,,5601,,,
p-2,eu,pixel,8,16384,65536,5602,phone two,node-2,10.0.0.2
p-3,us,,2,,,5603,,,
"""


async def devsched(settings: Settings, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stages.tools.cli", *args, env=child_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), EVENT_TIMEOUT_S)
    return await process.wait(), out.decode(), err.decode()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
async def test_devices_export_imports_back_to_the_same_devices(
    settings: Settings, redis: Redis, keys: Keys, pg: asyncpg.Pool, tmp_path: Path,
    suffix: str,
) -> None:
    given = tmp_path / "given.csv"
    given.write_text(CSV)
    code, out, err = await devsched(settings, "devices", "import", str(given))
    assert code == 0, err
    assert '"imported": 3' in out
    exported = tmp_path / f"exported{suffix}"
    code, _, err = await devsched(settings, "devices", "export", str(exported))
    assert code == 0, err
    first = exported.read_text()
    devices = parse_records(first, DeviceSpec, fmt=detect_format(str(exported), first))
    assert [d.id for d in devices] == ["p-1", "p-2", "p-3"]
    p1, p2, p3 = devices
    assert (p1.pool, p1.cpu_cores, p1.memory_mb, p1.storage_mb, p1.name) == (
        "eu", 4, 8192, 32768, "p-1")
    assert (p2.name, p2.host, p2.adb_host, p2.storage_mb) == ("phone two", "node-2",
                                                              "10.0.0.2", 65536)
    assert (p3.pool, p3.model, p3.adb_port) == ("us", "generic", 5603)

    code, _, err = await devsched(settings, "devices", "import", str(exported))
    assert code == 0, err
    again = tmp_path / f"again{suffix}"
    code, _, err = await devsched(settings, "devices", "export", str(again))
    assert code == 0, err
    assert again.read_text() == first


async def test_a_bad_line_is_named_and_nothing_changes(
    settings: Settings, redis: Redis, keys: Keys, pg: asyncpg.Pool, tmp_path: Path,
) -> None:
    bad = tmp_path / "devices.csv"
    bad.write_text("id,cpu_cores,memory_mb\n"
                   "ok-1,2,1024\n"
                   "bad-1,many,1024\n"
                   "ok-1,4,2048\n"
                   "bad-2,2,0\n")
    code, out, err = await devsched(settings, "devices", "import", str(bad))
    assert code == 1 and out == ""
    assert f"{bad}:3: " in err and "cpu_cores" in err
    assert f"{bad}:4: duplicate id 'ok-1' (first on line 2)" in err
    assert f"{bad}:5: " in err and "memory_mb" in err
    assert f"{bad}:2:" not in err
    assert not await redis.exists(keys.devices, keys.changes)

    quotas = tmp_path / "quotas"  # no extension: JSON lines by its content
    quotas.write_text('{"user_id": "u1", "max_devices": 3}\n\n'
                      '{"user_id": "u2", "max_devices": -1}\n'
                      '{"user_id": "u3", "colour": "red"}\n')
    code, _, err = await devsched(settings, "quota", "import", str(quotas))
    assert code == 1
    assert f"{quotas}:3: " in err and f"{quotas}:4: " in err and f"{quotas}:1:" not in err
    assert not await redis.exists(keys.user("u1"), keys.changes)


async def test_quota_import_sets_many_quotas_in_one_command(
    settings: Settings, redis: Redis, keys: Keys, tmp_path: Path,
) -> None:
    path = tmp_path / "quotas.csv"
    path.write_text("user_id,max_devices,total_cpu_cores,status\n" + "".join(
        f"user-{i},{i % 7 + 1},{4 * (i % 7 + 1)},{'suspended' if i == 5 else 'active'}\n"
        for i in range(145)))
    code, out, err = await devsched(settings, "quota", "import", str(path))
    assert code == 0, err
    assert '"imported": 145' in out and '"format": "csv"' in out
    for i in (0, 5, 144):
        state = parse_user_state(await redis.hgetall(keys.user(f"user-{i}")))
        assert state.quota["max_devices"] == str(i % 7 + 1), state
        assert state.quota["status"] == ("suspended" if i == 5 else "active")
    assert await redis.xlen(keys.changes) == 145
