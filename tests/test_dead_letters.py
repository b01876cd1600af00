"""Dead letters through `devsched dead`: listed, shown, replayed once, purged.

A poison entry is dead-lettered by a real worker; once the stage is fixed, `devsched
dead replay ID` puts it back on its stream and the worker handles it like any entry
(it ends in the stage's output exactly once). Replaying it again, or replaying the
letters several groups of one stream wrote for the same entry, adds nothing: the
stream's length shows it. The commands run as the operator runs them (a subprocess of
the devsched command on the test's servers and prefix).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.deadletters import read_letters, replays_key
from pipeline.runner import child_env
from pipeline.worker import groups_caught_up
from schemas.keys import GROUP_BILL, GROUP_NOTIFY, GROUP_PERSIST, Keys
from stages.settings import Settings
from tests.conftest import EVENT_TIMEOUT_S, RunningPipeline, wait_until
from tests.test_worker_runtime import GROUP, Ledger, Running, _has_entries, add, readers, worker

__all__ = ["readers"]


async def devsched(settings: Settings, *args: str, **env: str) -> tuple[int, Any]:
    """Run `devsched ARGS` on the test's servers and prefix (the event loop goes on
    meanwhile); (exit code, the JSON of its last line)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stages.tools.cli", *args, env=dict(child_env(settings), **env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), EVENT_TIMEOUT_S)
    lines = out.decode().strip().splitlines()
    code = await process.wait()
    return code, json.loads(lines[-1]) if lines else None


async def test_a_fixed_poison_entry_replayed_is_handled_once(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    settings = replace(settings, max_deliveries=2)
    stream = f"{settings.prefix}:work"
    stage = Ledger(redis, stream)
    stage.poison.add(b"p")
    ids = await add(redis, stream, [b"a", b"p", b"c"])
    async with Running(worker(stage, redis, readers(), settings, keys, clock)):
        await wait_until(lambda: _has_entries(redis, keys.dead))
        code, listed = await devsched(settings, "dead", "list", "--json")
        assert code == 0 and listed["count"] == 1
        [letter] = listed["dead_letters"]
        assert (letter["stage"], letter["stream"], letter["entry_id"], letter["replayed_as"]) \
            == (GROUP, stream, ids[1], None)
        assert letter["error"] == "ValueError: poison entry p"
        code, shown = await devsched(settings, "dead", "show", letter["id"], "--json")
        assert code == 0 and shown["payload"] == "p"

        stage.poison.clear()  # the stage is fixed
        code, replayed = await devsched(settings, "dead", "replay", letter["id"])
        assert code == 0 and replayed["added"] == 1
        [one] = replayed["replayed"]
        assert one["stream"] == stream and one["added"]
        await wait_until(lambda: groups_caught_up(redis, stream, [GROUP]))
        assert await stage.done() == [b"a", b"c", b"p"]

        code, again = await devsched(settings, "dead", "replay", letter["id"])
        assert code == 0 and again["added"] == 0
        assert again["replayed"][0]["replayed_as"] == one["replayed_as"]
        assert await redis.xlen(stream) == 4  # a, p, c and the one replay
        code, listed = await devsched(settings, "dead", "list", "--json")
        assert listed["dead_letters"][0]["replayed_as"] == one["replayed_as"]
        await wait_until(lambda: groups_caught_up(redis, stream, [GROUP]))
    assert await stage.done() == [b"a", b"c", b"p"]

    code, purged = await devsched(settings, "dead", "purge")
    assert code == 0 and purged == {"purged": 1}
    assert await redis.xlen(keys.dead) == 0
    assert not await redis.exists(replays_key(keys.dead))


async def test_letters_of_one_entry_from_several_groups_replay_it_once(
    pipeline: RunningPipeline, settings: Settings, redis: Redis, keys: Keys,
) -> None:
    """A poison on the changes stream is given up by persist, bill and notify (three
    letters); replaying all three (by stage) adds it back once."""
    poison_id = (await redis.xadd(keys.changes, {"d": b"not a change"})).decode()
    groups = (GROUP_PERSIST, GROUP_BILL, GROUP_NOTIFY)

    async def three_letters() -> bool:
        return len(await read_letters(redis, keys.dead)) >= 3

    await wait_until(three_letters)
    code, listed = await devsched(settings, "dead", "list", "--stage", GROUP_BILL, "--json")
    assert code == 0 and [r["entry_id"] for r in listed["dead_letters"]] == [poison_id]
    length = await redis.xlen(keys.changes)
    code, first = await devsched(settings, "dead", "replay", "--stage", GROUP_PERSIST)
    assert code == 0 and first["added"] == 1
    letters = [s for s in await read_letters(redis, keys.dead)
               if s.letter is not None and s.letter.entry_id == poison_id]
    assert sorted(s.letter.stage for s in letters if s.letter) == sorted(groups)
    for letter in letters:  # persist's again, bill's and notify's: replayed already
        code, again = await devsched(settings, "dead", "replay", letter.id)
        assert code == 0 and again["added"] == 0
        assert again["replayed"][0]["replayed_as"] == first["replayed"][0]["replayed_as"]
    # bill's letter of the poison is marked replayed (the replayed entry, still poison, may
    # already have been given up again under its new id: that letter is a new one)
    code, listed = await devsched(settings, "dead", "list", "--stage", GROUP_BILL, "--json")
    mine = [r for r in listed["dead_letters"] if r["entry_id"] == poison_id]
    assert code == 0 and [r["replayed_as"] for r in mine] == [first["replayed"][0]["replayed_as"]]
    assert await redis.xlen(keys.changes) == length + 1
    # still poison: each group gives the replayed entry up again, under its new id
    await wait_until(lambda: _letters_at_least(redis, keys, 6))
    code, nothing = await devsched(settings, "dead", "replay", "--stage", "no-such-stage")
    assert code == 1 and nothing == {"replayed": [], "added": 0}


async def _letters_at_least(redis: Redis, keys: Keys, n: int) -> bool:
    return len(await read_letters(redis, keys.dead)) >= n


async def test_purge_older_than_keeps_newer_letters(
    settings: Settings, redis: Redis, keys: Keys,
) -> None:
    old = (await redis.xadd(keys.dead, {"d": b"{}"}, id="1000-0")).decode()
    await redis.xadd(keys.dead, {"d": b"{}"})  # now
    code, purged = await devsched(settings, "dead", "purge", "--older-than", "1h")
    assert code == 0 and purged == {"purged": 1}
    remaining = [s.id for s in await read_letters(redis, keys.dead)]
    assert old not in remaining and len(remaining) == 1
    code, _ = await devsched(settings, "dead", "purge", "--older-than", "soon")
    assert code == 2
