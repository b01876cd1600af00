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

from dataclasses import dataclass
from typing import Any

from benchmarks.loadgen import CycleFactory, CycleParts

NOT_READY = (
    "the pipeline benchmark hook is not written yet: implement start_pipeline, "
    "reset_pipeline, stop_pipeline and make_cycle in benchmarks/pipeline_sut.py"
)


@dataclass
class PipelineHandle:
    """A running pipeline under test."""

    factory: CycleFactory
    """What loadgen runs in every producer process, e.g.
    ``CycleFactory(make_cycle, (redis_url, users, seed))``."""
    workers_per_stage: int
    state: Any = None
    """Whatever ``reset_pipeline`` and ``stop_pipeline`` need (processes, prefix, ...)."""


async def start_pipeline(redis_url: str, database_url: str, workers_per_stage: int, *,
                         devices: int, users: int) -> PipelineHandle:
    """Start the stage workers with this population; return when they consume."""
    raise NotImplementedError(NOT_READY)


async def reset_pipeline(handle: PipelineHandle) -> None:
    """Bring state back to: all devices free, no usage, no allocations, no backlog."""
    raise NotImplementedError(NOT_READY)


async def stop_pipeline(handle: PipelineHandle) -> None:
    """Stop every worker started by ``start_pipeline`` and remove its data."""
    raise NotImplementedError(NOT_READY)


def make_cycle(redis_url: str, users: int, seed: int) -> CycleParts:
    """Loadgen factory, run inside each producer process: one allocate+release cycle."""
    raise NotImplementedError(NOT_READY)
