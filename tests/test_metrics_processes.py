"""Metrics of a `devsched run --workers 2` add up behind one port.

A real `run --workers 2` (two processes of the request path, two of the stages behind
it) is started with DEVSCHED_METRICS_PORT; a known load goes through the producer
client (N allocations, then N releases: 2N requests; the releases go straight to select).
The one endpoint the supervisor serves must then report, summed over the worker
processes, exactly N entries consumed and handled by quota and 2N by select, as many
queue waits recorded for each, and
every process alive (before, the second process died on "Address already in use").
The client's own end-to-end allocate histogram counted the N allocations.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pipeline.clock import ManualClock
from pipeline.runner import spawn_run, stop_run
from schemas.keys import GROUP_QUOTA, GROUP_SELECT, Keys
from schemas.messages import Allocated, DeviceSpec, QuotaSpec, Released
from stages.app import APP
from stages.settings import Settings
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, seed, wait_until

N = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the endpoint serves: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        body = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def consumers(redis: Redis, stream: str, group: str) -> int:
    try:
        return len(await redis.xinfo_consumers(stream, group))
    except ResponseError:
        return 0


def client_allocations() -> float:
    return REGISTRY.get_sample_value(
        "devsched_client_allocate_seconds_count", {"outcome": "allocated"}) or 0.0


async def test_run_with_two_workers_serves_summed_metrics_on_one_port(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock, pg: object,
    tmp_path: Path,
) -> None:
    await seed(redis, keys, clock, devices=[DeviceSpec(id=f"d{i:03d}") for i in range(N)],
               quotas=[QuotaSpec(user_id="u1", max_devices=N)])
    port = free_port()
    run = spawn_run(APP, settings, 2, DEVSCHED_METRICS_PORT=str(port),
                    DEVSCHED_DATA_DIR=str(tmp_path))
    try:
        async def request_path_up() -> bool:
            assert run.poll() is None, "devsched run exited"
            return (await consumers(redis, keys.requests, GROUP_QUOTA) >= 2
                    and await consumers(redis, keys.admitted, GROUP_SELECT) >= 2)

        await wait_until(request_path_up)
        client_before = client_allocations()
        async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
            allocated = await asyncio.gather(*[client.allocate("u1") for _ in range(N)])
            assert all(isinstance(a, Allocated) for a in allocated), allocated
            released = await asyncio.gather(*[
                client.release(allocation_id=a.allocation_id) for a in allocated
                if isinstance(a, Allocated)])
            assert all(isinstance(r, Released) for r in released), released
        assert client_allocations() - client_before == N

        async def counted() -> bool:
            got = scrape(port)
            return all(sample(got, "devsched_stage_handled_total", stage=s) >= n
                       for s, n in ((GROUP_QUOTA, N), (GROUP_SELECT, 2 * N)))

        await wait_until(counted)
        got = scrape(port)
        for stage, entries in ((GROUP_QUOTA, N), (GROUP_SELECT, 2 * N)):
            assert sample(got, "devsched_stage_consumed_total", stage=stage) == entries
            assert sample(got, "devsched_stage_handled_total", stage=stage) == entries
            assert sample(got, "devsched_stage_queue_wait_seconds_count", stage=stage) == entries
            assert sample(got, "devsched_stage_batch_seconds_count", stage=stage) >= 1
        assert run.poll() is None, "a worker process took the supervisor down"
        # every worker process (two per process group) writes its own values there
        pids = {f.stem.rsplit("_", 1)[1] for f in (tmp_path / "metrics").glob("counter_*.db")}
        assert len(pids) >= 4, pids
    finally:
        stop_run(run, EVENT_TIMEOUT_S)
