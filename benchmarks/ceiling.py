"""The raw Redis ceiling: a bare 3-hop stream chain with no logic in it.

What it measures: how many messages per second one Redis and our client stack
(redis-py asyncio with hiredis parsing and packing, uvloop) can carry end to end through three
consumer-group hops, the same plumbing the pipeline's request path uses
(requests -> quota -> admitted -> select -> reply), with zero work per message.
No pipeline can beat this on the same machine; the ratio to it says how much
the stages' logic costs.

The chain: ``s0 -> hop 0 -> s1 -> hop 1 -> s2 -> hop 2 -> reply stream``.
Each hop is a separate worker process that reads a batch with ``XREADGROUP
COUNT n BLOCK b``, then in ONE ``MULTI``/``EXEC`` adds every entry to the next
stream (the last hop: to the reply stream the entry names) and acks the batch,
as the pipeline's hand-off does. Producers are separate processes.

Two ways to drive it:

- ``measure_max``: closed-loop saturating producers (a window of outstanding
  messages, sent in pipelined batches, replies counted from the reply stream)
  report ``max_msgs_per_s``: messages that went through all three hops per
  second, after a warm-up.
- ``make_cycle``: a loadgen factory (one XADD, await the reply) for latency at
  fixed offered rates.

Promises: every key lives under one run prefix (``bench:ceiling:<run>``) and
``stop_chain`` deletes it; workers stop on a flag checked between short BLOCK
reads (never by cancelling a blocked read); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.synchronize
import os
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from benchmarks import loadgen
from benchmarks.loadgen import CycleFactory, CycleParts, LoadResult
from pipeline.connections import fast_packing

HOPS = 3
"""Stream hops every message crosses: s0 -> s1 -> s2 -> reply."""
FLOOR_HOPS = 2
"""Worker hops of an allocate in the pipeline: quota (requests -> admitted) and select
(admitted -> the producer's reply stream)."""
GROUP = "chain"
"""Consumer group of every hop."""
BATCH = 256
"""Entries per XREADGROUP (the pipeline's default DEVSCHED_BATCH_SIZE)."""
BLOCK_MS = 100
"""XREADGROUP/XREAD BLOCK; far below the 5 s socket timeout, and the stop-flag period."""
SOCKET_TIMEOUT_S = 5.0
"""Socket timeout of every connection (redis-py's default)."""
STREAM_MAXLEN = 100_000
"""Approximate cap (``MAXLEN ~``) on every stream, so long runs keep memory bounded."""
PAYLOAD = b"x" * 160
"""Body of each message: about the size of an encoded allocation request."""
WINDOW = 4_000
"""Outstanding messages a saturating producer keeps in the chain."""
SEND_BATCH = 200
"""Messages a saturating producer adds per pipelined round trip."""
WARMUP_S = 1.0
"""Replies in the first second of a measurement are not counted."""


def _client(redis_url: str) -> aioredis.Redis:
    # the pipeline's client stack: redis-py asyncio with hiredis parsing and packing
    return fast_packing(aioredis.Redis.from_url(redis_url, socket_timeout=SOCKET_TIMEOUT_S))


def _streams(prefix: str, hops: int = HOPS) -> list[str]:
    return [f"{prefix}:s{i}" for i in range(hops)]


Entry = tuple[bytes, dict[Any, Any]]


def _entries(answer: Any) -> list[Entry]:
    """The entries of the one stream an XREAD/XREADGROUP answer is about ([] if none)."""
    if not answer:
        return []
    entries: list[Entry] = answer[0][1]
    return entries


async def _wait_briefly(event: asyncio.Event) -> None:
    """Wait for ``event`` at most BLOCK_MS, so a loop around it sees its stop flag."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), BLOCK_MS / 1000)


# --- workers ---------------------------------------------------------------------------


async def _hop(redis_url: str, prefix: str, hop: int, consumer: str,
               stop: multiprocessing.synchronize.Event, batch: int, hops: int = HOPS) -> None:
    streams = _streams(prefix, hops)
    source = streams[hop]
    target = streams[hop + 1] if hop + 1 < hops else None
    client = _client(redis_url)
    try:
        while not stop.is_set():
            entries = _entries(await client.xreadgroup(GROUP, consumer, {source: ">"},
                                                       count=batch, block=BLOCK_MS))
            if not entries:
                continue
            pipe = client.pipeline(transaction=True)
            for _, fields in entries:
                out = target if target is not None else fields[b"r"].decode()
                pipe.xadd(out, fields, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.xack(source, GROUP, *[entry_id for entry_id, _ in entries])
            await pipe.execute()
    finally:
        await client.aclose()


def _worker_main(redis_url: str, prefix: str, hop: int, index: int,
                 stop: multiprocessing.synchronize.Event, batch: int) -> None:
    import uvloop

    try:
        uvloop.run(_hop(redis_url, prefix, hop, f"hop{hop}-{index}", stop, batch))
    except Exception:
        traceback.print_exc()
        raise


BUSY_POLL_CHECK = 4_096
"""Turns of a busy-polling loop between two looks at the stop flag."""


async def _busy_poll(stop: multiprocessing.synchronize.Event) -> None:
    """Keep the event loop from ever sleeping: yield to it without pause, so that the
    process is already running when a reply arrives instead of being woken from idle.
    Costs a whole core while the chain runs: a way to measure, not a way to run."""
    turns = 0
    while True:
        await asyncio.sleep(0)
        turns += 1
        if turns % BUSY_POLL_CHECK == 0 and stop.is_set():
            return


def _shared_main(redis_url: str, prefix: str, hops: int,
                 stop: multiprocessing.synchronize.Event, batch: int,
                 busy_poll: bool = False) -> None:
    """Every hop in this one process, each a task with its own connection (the layout of
    `devsched run`'s request path: quota and select in one event loop); with
    ``busy_poll`` the loop never sleeps (see :func:`_busy_poll`)."""
    import uvloop

    async def all_hops() -> None:
        awake = [_busy_poll(stop)] if busy_poll else []
        await asyncio.gather(*(_hop(redis_url, prefix, hop, f"hop{hop}-0", stop, batch, hops)
                               for hop in range(hops)), *awake)

    try:
        uvloop.run(all_hops())
    except Exception:
        traceback.print_exc()
        raise


@dataclass
class Chain:
    """A running chain: its key prefix and worker processes."""

    redis_url: str
    prefix: str
    stop: multiprocessing.synchronize.Event
    workers: list[multiprocessing.process.BaseProcess] = field(default_factory=list)


async def start_chain(redis_url: str, workers_per_hop: int = 1, batch: int = BATCH, *,
                      hops: int = HOPS, one_process: bool = False,
                      busy_poll: bool = False) -> Chain:
    """Create the streams and groups, start ``workers_per_hop`` processes per hop (or, with
    ``one_process``, one process running every hop; ``busy_poll`` keeps that process from
    sleeping between messages)."""
    if busy_poll and not one_process:
        raise ValueError("busy_poll is a setting of the one-process chain")
    prefix = f"bench:ceiling:{uuid.uuid4().hex[:8]}"
    client = _client(redis_url)
    try:
        for stream in _streams(prefix, hops):
            await client.xgroup_create(stream, GROUP, id="$", mkstream=True)
    finally:
        await client.aclose()
    ctx = multiprocessing.get_context("spawn")
    chain = Chain(redis_url, prefix, ctx.Event())
    if one_process:
        proc = ctx.Process(target=_shared_main,
                           args=(redis_url, prefix, hops, chain.stop, batch, busy_poll),
                           name="ceiling-hops", daemon=True)
        proc.start()
        chain.workers.append(proc)
        return chain
    for hop in range(hops):
        for index in range(workers_per_hop):
            proc = ctx.Process(target=_worker_main,
                               args=(redis_url, prefix, hop, index, chain.stop, batch),
                               name=f"ceiling-hop{hop}-{index}", daemon=True)
            proc.start()
            chain.workers.append(proc)
    return chain


async def stop_chain(chain: Chain) -> None:
    """Stop the workers (flag, then bounded join, then terminate) and delete every key."""
    chain.stop.set()
    for proc in chain.workers:
        await asyncio.to_thread(proc.join, 3 * BLOCK_MS / 1000 + 5.0)
        if proc.is_alive():
            proc.terminate()
            await asyncio.to_thread(proc.join, 5.0)
    client = _client(chain.redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{chain.prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def floor_latency(redis_url: str, rates: tuple[float, ...], duration_s: float, *,
                        busy_poll: bool = False, processes: int = 1, drain_s: float = 5.0,
                        on_point: Callable[[LoadResult], None] | None = None,
                        ) -> list[LoadResult]:
    """The request path's floor: a chain of the pipeline's ``FLOOR_HOPS`` hops, all in
    one process (as ``devsched run`` serves quota and select; ``busy_poll`` as in
    :func:`start_chain`), offered each of ``rates`` for ``duration_s``; one result per
    rate, each passed to ``on_point`` as it comes (which may raise to stop)."""
    chain = await start_chain(redis_url, hops=FLOOR_HOPS, one_process=True,
                              busy_poll=busy_poll)
    results = []
    try:
        await asyncio.sleep(0.5)  # let the hops connect
        factory = CycleFactory(make_cycle, (redis_url, chain.prefix))
        for rate in rates:
            result = await loadgen.run_open(factory, rate, duration_s, processes=processes,
                                            drain_s=drain_s)
            if on_point is not None:
                on_point(result)
            results.append(result)
    finally:
        await stop_chain(chain)
    return results


# --- the saturating producer -----------------------------------------------------------


async def _saturate(redis_url: str, prefix: str, duration_s: float) -> dict[str, float]:
    client = _client(redis_url)
    reader = _client(redis_url)
    reply = f"{prefix}:reply:{uuid.uuid4().hex[:8]}"
    source = _streams(prefix)[0]
    fields: dict[Any, Any] = {b"r": reply.encode(), b"m": PAYLOAD}
    outstanding = 0
    room = asyncio.Event()
    room.set()
    start = time.perf_counter()
    end = start + duration_s
    counted_from = start + min(WARMUP_S, duration_s / 3)
    counted = 0

    async def send() -> None:
        nonlocal outstanding
        while time.perf_counter() < end:
            if outstanding + SEND_BATCH > WINDOW:
                room.clear()
                await _wait_briefly(room)
                continue
            pipe = client.pipeline(transaction=False)
            for _ in range(SEND_BATCH):
                pipe.xadd(source, fields, maxlen=STREAM_MAXLEN, approximate=True)
            outstanding += SEND_BATCH
            await pipe.execute()

    async def receive() -> None:
        nonlocal outstanding, counted
        last = "0-0"
        while time.perf_counter() < end:
            entries = _entries(await reader.xread({reply: last}, count=5000, block=BLOCK_MS))
            if not entries:
                continue
            last = entries[-1][0].decode()
            outstanding -= len(entries)
            if time.perf_counter() >= counted_from:
                counted += len(entries)
            room.set()

    try:
        await asyncio.gather(send(), receive())
    finally:
        await client.delete(reply)
        await client.aclose()
        await reader.aclose()
    return {"msgs": counted, "seconds": time.perf_counter() - counted_from}


def _saturate_main(redis_url: str, prefix: str, duration_s: float,
                   conn: Any) -> None:
    import uvloop

    try:
        conn.send(("done", uvloop.run(_saturate(redis_url, prefix, duration_s))))
    except BaseException:  # noqa: BLE001 - the parent gets the traceback instead of a hang
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


async def measure_max(chain: Chain, duration_s: float, producers: int = 1) -> float:
    """Messages per second through all hops under ``producers`` saturating processes."""
    ctx = multiprocessing.get_context("spawn")
    pipes = []
    procs = []
    for _ in range(producers):
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_saturate_main,
                           args=(chain.redis_url, chain.prefix, duration_s, child_end),
                           daemon=True)
        proc.start()
        child_end.close()
        pipes.append(parent_end)
        procs.append(proc)
    total = 0.0
    try:
        for conn in pipes:
            if not await asyncio.to_thread(conn.poll, duration_s + 60.0):
                raise TimeoutError("saturating producer did not report")
            kind, payload = conn.recv()
            if kind != "done":
                raise RuntimeError(f"saturating producer failed:\n{payload}")
            total += payload["msgs"] / payload["seconds"]
    finally:
        for proc in procs:
            await asyncio.to_thread(proc.join, 5.0)
            if proc.is_alive():
                proc.terminate()
        for conn in pipes:
            conn.close()
    return total


# --- loadgen factory: latency at a fixed rate ------------------------------------------


def make_cycle(redis_url: str, prefix: str) -> CycleParts:
    """Loadgen factory: one cycle = add an entry to s0, await it on this process's reply stream.

    Adds are batched like a good producer client does: while one pipelined round
    trip is in flight, new entries queue and go together in the next one, so a
    high rate costs few round trips and a low rate waits for none.
    """
    reply = f"{prefix}:reply:{os.getpid()}-{uuid.uuid4().hex[:6]}"
    reply_name = reply.encode()
    source = _streams(prefix)[0]
    waiting: dict[bytes, asyncio.Future[None]] = {}
    queued: list[bytes] = []
    wake = asyncio.Event()
    state: dict[str, Any] = {"running": True}

    async def read_replies() -> None:
        reader: aioredis.Redis = state["reader"]
        last = "0-0"
        while state["running"]:
            entries = _entries(await reader.xread({reply: last}, count=5000, block=BLOCK_MS))
            if not entries:
                continue
            last = entries[-1][0].decode()
            for _, fields in entries:
                future = waiting.pop(fields[b"i"], None)
                if future is not None and not future.done():
                    future.set_result(None)

    async def send_queued() -> None:
        client: aioredis.Redis = state["client"]
        while state["running"]:
            if not queued:
                wake.clear()
                await _wait_briefly(wake)
                continue
            keys = queued[:SEND_BATCH]
            del queued[:SEND_BATCH]
            pipe = client.pipeline(transaction=False)
            for key in keys:
                fields: dict[Any, Any] = {b"i": key, b"r": reply_name, b"m": PAYLOAD}
                pipe.xadd(source, fields, maxlen=STREAM_MAXLEN, approximate=True)
            try:
                await pipe.execute()
            except Exception as exc:  # noqa: BLE001 - fail these waiters, keep sending
                for key in keys:
                    future = waiting.pop(key, None)
                    if future is not None and not future.done():
                        future.set_exception(exc)

    async def setup() -> None:
        state["client"] = _client(redis_url)
        state["reader"] = _client(redis_url)
        state["tasks"] = [asyncio.create_task(read_replies()),
                          asyncio.create_task(send_queued())]

    async def cycle(i: int) -> str | None:
        key = str(i).encode()
        future = asyncio.get_running_loop().create_future()
        waiting[key] = future
        queued.append(key)
        wake.set()
        try:
            await future
        finally:
            waiting.pop(key, None)
        return None

    async def teardown() -> None:
        state["running"] = False
        wake.set()
        await asyncio.wait_for(asyncio.gather(*state["tasks"]),
                               3 * BLOCK_MS / 1000 + SOCKET_TIMEOUT_S)
        await state["client"].delete(reply)
        await state["client"].aclose()
        await state["reader"].aclose()

    return CycleParts(setup, cycle, teardown)
