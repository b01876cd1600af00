"""A worker process's start: ``serve`` calls its ``on_ready`` once, with the stages built,
and the entry points' ``freeze_startup_heap`` takes the start-up heap out of the cyclic
collector's view (checked in a fresh interpreter, so this test process is not frozen)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from pipeline.clock import ManualClock
from pipeline.service import serve
from stages.app import APP
from stages.settings import Settings
from tests.conftest import EVENT_TIMEOUT_S

FREEZE = """
import gc, json
import pipeline.commands, stages.app
from pipeline.service import freeze_startup_heap
before = len(gc.get_objects())
frozen = freeze_startup_heap()
print(json.dumps({"before": before, "frozen": frozen, "after": len(gc.get_objects())}))
"""


def test_a_frozen_start_up_heap_leaves_a_full_collection_only_what_came_after() -> None:
    out = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True,
                         check=True, timeout=60)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # the modules and set-up of a worker: tens of thousands of objects a full collection
    # walked every time; frozen, they are left out and the collector tracks next to none
    assert seen["before"] > 10_000
    assert seen["frozen"] > 0.9 * seen["before"]
    assert seen["after"] < 100


async def test_serve_calls_on_ready_once_with_the_stages_built(
    settings: Settings, clock: ManualClock,
) -> None:
    stop = asyncio.Event()
    calls: list[int] = []

    def ready() -> None:
        calls.append(len(calls))
        stop.set()  # served from here on; stopping now ends it after the first reads

    await asyncio.wait_for(serve(APP, ["quota", "select"], settings, clock, stop=stop,
                                 install_signals=False, on_ready=ready), EVENT_TIMEOUT_S)
    assert calls == [0]
