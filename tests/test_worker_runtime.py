"""The stream runtime on its own: what StageWorker and trim promise, with no device logic.

A tiny ``Ledger`` stage appends each entry's payload to a Redis list and acks it in
one MULTI/EXEC. Against real Redis this proves: a poison entry is retried and then
dead-lettered (stage, error, delivery count) and acked, while its batch mates are
handled once; entries left pending by a dead consumer are reclaimed, past the first
XAUTOCLAIM page, with the cursor kept between calls; a pending entry deleted from the
stream is acked rather than crashing reclaim; a dependency outage (``Transient``)
keeps the batch without counting deliveries; an unreachable Redis does not end the
loop; ``stop()`` returns after the batch in hand; ``trim`` removes only entries
every group has acked; and a lingering stage waits (through the worker's injected
sleep, held by the test: no timing) only after a short batch, then gets what arrived
meanwhile in one batch.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Self

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from pipeline import trim as trim_module
from pipeline.clock import ManualClock
from pipeline.connections import blocking_reader
from pipeline.trim import trim
from pipeline.worker import (
    RECLAIM_PAGE,
    Batching,
    Entry,
    StageWorker,
    Transient,
    ensure_group,
)
from schemas.keys import Keys
from schemas.runtime import DeadLetter, dead_decoder
from stages.settings import Settings
from tests.conftest import EVENT_TIMEOUT_S, wait_until

GROUP = "ledger"


class Ledger:
    """Appends payloads to ``<stream>:done`` and acks, atomically. Payloads in ``poison``
    always raise; while ``down`` is set every batch raises Transient; while ``gate`` is
    set, handling waits for it to open."""

    group = GROUP

    def __init__(self, redis: Redis, stream: str, *, ack: bool = True) -> None:
        self.redis = redis
        self.streams = [stream]
        self.done_key = f"{stream}:done"
        self.ack = ack
        self.poison: set[bytes] = set()
        self.down = False
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.calls: list[list[tuple[bytes, int]]] = []

    async def handle(self, entries: Sequence[Entry]) -> None:
        self.calls.append([(e.data, e.deliveries) for e in entries])
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise Transient("ledger database down")
        for e in entries:
            if e.data in self.poison:
                raise ValueError(f"poison entry {e.data.decode()}")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(self.done_key, *[e.data for e in entries])
            if self.ack:
                pipe.xack(self.streams[0], self.group, *[e.id for e in entries])
            await pipe.execute()

    async def done(self) -> list[bytes]:
        return list(await self.redis.lrange(self.done_key, 0, -1))


@pytest_asyncio.fixture
async def readers(settings: Settings) -> AsyncIterator[Callable[[], Redis]]:
    """Makes blocking-read connections (one per worker) and closes them after the test."""
    made: list[Redis] = []

    def make() -> Redis:
        made.append(blocking_reader(settings))
        return made[-1]

    yield make
    for r in made:
        await r.aclose()



async def add(redis: Redis, stream: str, payloads: Sequence[bytes]) -> list[str]:
    async with redis.pipeline(transaction=False) as pipe:
        for p in payloads:
            pipe.xadd(stream, {"d": p})
        ids = await pipe.execute()
    return [i.decode() for i in ids]


async def pending(redis: Redis, stream: str, group: str = GROUP) -> int:
    return int((await redis.xpending(stream, group))["pending"])


async def leave_pending(redis: Redis, stream: str, consumer: str, count: int) -> None:
    """A consumer reads ``count`` entries and dies without acking them."""
    await ensure_group(redis, stream, GROUP)
    got = await redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=count)
    assert sum(len(items) for _, items in got) == count


class Running:
    """A worker running in a task; ``async with`` stops it at the end, whatever happens."""

    def __init__(self, worker: StageWorker) -> None:
        self.worker = worker
        self.task = asyncio.create_task(worker.run())

    async def stop(self) -> None:
        self.worker.stop()
        await asyncio.wait_for(self.task, EVENT_TIMEOUT_S)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def worker(stage: Ledger, redis: Redis, reader: Redis, settings: Settings, keys: Keys,
           clock: ManualClock, name: str = "live") -> StageWorker:
    return StageWorker(stage, redis, reader, settings, clock, consumer=name, dead_stream=keys.dead)


async def test_poison_entry_is_dead_lettered_after_max_deliveries_and_batch_mates_run_once(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    settings = replace(settings, max_deliveries=3)
    stream = f"{settings.prefix}:work"
    stage = Ledger(redis, stream)
    stage.poison.add(b"p")
    ids = await add(redis, stream, [b"a", b"p", b"c"])
    async with Running(worker(stage, redis, readers(), settings, keys, clock)):
        await wait_until(lambda: _has_entries(redis, keys.dead))

    assert await stage.done() == [b"a", b"c"]
    tried_alone = [n for call in stage.calls if len(call) == 1 for data, n in call if data == b"p"]
    assert tried_alone == list(range(1, settings.max_deliveries + 1))
    [(_, fields)] = await redis.xrange(keys.dead)
    letter = dead_decoder.decode(fields[b"d"])
    assert letter == DeadLetter(
        stage=GROUP, stream=stream, entry_id=ids[1], error="ValueError: poison entry p",
        # Redis' count: the XAUTOCLAIM that found it over the limit is a delivery too
        deliveries=settings.max_deliveries + 1, payload="p", at_ms=clock.now_ms(),
    )
    assert await pending(redis, stream) == 0
    assert not await redis.hexists(keys.errors(GROUP), f"{stream}/{ids[1]}")


async def test_entries_of_a_dead_consumer_are_all_reclaimed_past_the_first_page(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    stream = f"{settings.prefix}:work"
    count = 2 * RECLAIM_PAGE + RECLAIM_PAGE // 2
    payloads = [str(i).encode() for i in range(count)]
    await add(redis, stream, payloads)
    await leave_pending(redis, stream, "dead", count)
    stage = Ledger(redis, stream)
    async with Running(worker(stage, redis, readers(), settings, keys, clock)):
        await wait_until(lambda: _settled(redis, stream, stage, count))
    assert sorted(await stage.done(), key=int) == payloads  # each once, none lost
    assert await redis.xlen(keys.dead) == 0


async def _has_entries(redis: Redis, stream: str) -> bool:
    return bool(await redis.xlen(stream))


async def _settled(redis: Redis, stream: str, stage: Ledger, count: int) -> bool:
    return await pending(redis, stream) == 0 and len(await stage.done()) >= count


async def test_reclaim_keeps_its_cursor_so_later_pages_are_reached(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    # Entries stay pending after handling (no ack) and idle past 1 ms at once: a reclaim
    # that restarted from 0-0 would take the first page again and again.
    settings = replace(settings, claim_idle_ms=1)
    stream = f"{settings.prefix}:work"
    count = 2 * RECLAIM_PAGE + RECLAIM_PAGE // 2
    payloads = [str(i).encode() for i in range(count)]
    await add(redis, stream, payloads)
    await leave_pending(redis, stream, "dead", count)
    stage = Ledger(redis, stream, ack=False)
    w = worker(stage, redis, readers(), settings, keys, clock)

    taken = []
    for _ in range(3):
        await asyncio.sleep(0.01)
        taken.append(await w.reclaim())
    assert taken == [RECLAIM_PAGE, RECLAIM_PAGE, RECLAIM_PAGE // 2]
    assert sorted(await stage.done(), key=int) == payloads


async def test_reclaim_acks_a_pending_entry_that_was_deleted_from_the_stream(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    stream = f"{settings.prefix}:work"
    ids = await add(redis, stream, [b"a", b"gone", b"c"])
    await leave_pending(redis, stream, "dead", 3)
    await redis.xdel(stream, ids[1])
    stage = Ledger(redis, stream)
    async with Running(worker(stage, redis, readers(), settings, keys, clock)) as running:
        await wait_until(lambda: _settled(redis, stream, stage, 2))
        assert not running.task.done()
    assert await stage.done() == [b"a", b"c"]
    assert await redis.xlen(keys.dead) == 0


async def test_transient_outage_keeps_the_batch_without_counting_deliveries(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    settings = replace(settings, max_deliveries=1)
    stream = f"{settings.prefix}:work"
    stage = Ledger(redis, stream)
    stage.down = True
    await add(redis, stream, [b"a", b"b", b"c"])
    async with Running(worker(stage, redis, readers(), settings, keys, clock)):
        await wait_until(lambda: _calls_at_least(stage, 3))  # retried with back-off
        rows = await redis.xpending_range(stream, GROUP, min="-", max="+", count=10)
        assert [r["times_delivered"] for r in rows] == [1, 1, 1]
        stage.down = False
        await wait_until(lambda: _settled(redis, stream, stage, 3))
    assert await stage.done() == [b"a", b"b", b"c"]
    assert await redis.xlen(keys.dead) == 0
    assert all(n == 1 for call in stage.calls for _, n in call)


class AnswerLost(Ledger):
    """A Ledger whose first call lands (appended and acked) and then loses Redis's
    answer, as a server killed after its append-only file had the call would."""

    async def handle(self, entries: Sequence[Entry]) -> None:
        await super().handle(entries)
        if len(self.calls) == 1:
            raise RedisConnectionError("Connection closed by server.")


async def test_a_call_that_landed_but_lost_its_answer_is_not_handled_again(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    """The retry after a dropped call claims the batch again first: entries the call
    acked are done and are not handed to the stage twice (a second handling would append
    them again, or answer a producer twice); one still pending is retried."""
    stream = f"{settings.prefix}:work"
    stage = AnswerLost(redis, stream)
    await add(redis, stream, [b"a", b"b"])
    async with Running(worker(stage, redis, readers(), settings, keys, clock)):
        await wait_until(lambda: _calls_at_least(stage, 1))
        await wait_until(lambda: _settled(redis, stream, stage, 2))
        await add(redis, stream, [b"c"])
        await wait_until(lambda: _settled(redis, stream, stage, 3))
    assert await stage.done() == [b"a", b"b", b"c"]
    assert [[d for d, _ in call] for call in stage.calls] == [[b"a", b"b"], [b"c"]]


class AckLost(Ledger):
    """A Ledger whose first call fails before it lands (nothing written)."""

    async def handle(self, entries: Sequence[Entry]) -> None:
        if not self.calls:
            self.calls.append([(e.data, e.deliveries) for e in entries])
            raise RedisConnectionError("Connection closed by server.")
        await super().handle(entries)


async def test_a_call_that_never_landed_is_retried_whole(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    stream = f"{settings.prefix}:work"
    stage = AckLost(redis, stream)
    await add(redis, stream, [b"a", b"b"])
    async with Running(worker(stage, redis, readers(), settings, keys, clock)):
        await wait_until(lambda: _calls_at_least(stage, 1))
        await wait_until(lambda: _settled(redis, stream, stage, 2))
    assert await stage.done() == [b"a", b"b"]
    assert [[d for d, _ in call] for call in stage.calls] == [[b"a", b"b"], [b"a", b"b"]]


async def _calls_at_least(stage: Ledger, n: int) -> bool:
    return len(stage.calls) >= n


async def test_worker_keeps_running_while_redis_is_unreachable(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis], caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2,
                        single_connection_client=True, retry=Retry(NoBackoff(), 0))
    stream = f"{settings.prefix}:work"
    stage = Ledger(redis, stream)
    w = worker(stage, redis, unreachable, settings, keys, clock)
    running = Running(w)

    async def failed_reads(n: int) -> bool:
        assert not running.task.done(), running.task
        return caplog.text.count("redis unavailable, retrying") >= n

    try:
        await wait_until(lambda: failed_reads(2))
        w.reader = readers()  # Redis is back
        await add(redis, stream, [b"a"])
        await wait_until(lambda: _settled(redis, stream, stage, 1))
    finally:
        await running.stop()
        await unreachable.aclose()
    assert await stage.done() == [b"a"]


async def test_after_an_outage_entries_delivered_to_the_worker_but_never_received_are_done_at_once(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis], caplog: pytest.LogCaptureFixture,
) -> None:
    """A read Redis answered whose reply was lost leaves entries pending to the worker's
    own consumer; with reclaim out of reach (claim_idle_ms of an hour) the worker still
    handles them once Redis is back, and only them, once each."""
    settings = replace(settings, claim_idle_ms=3_600_000)
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2,
                        single_connection_client=True, retry=Retry(NoBackoff(), 0))
    stream = f"{settings.prefix}:work"
    stage = Ledger(redis, stream)
    await add(redis, stream, [b"lost-1", b"lost-2"])
    await leave_pending(redis, stream, "live", 2)  # delivered to "live", reply never arrived
    w = worker(stage, redis, unreachable, settings, keys, clock, name="live")
    running = Running(w)
    try:
        await wait_until(lambda: _contains(caplog, "redis unavailable, retrying"))
        w.reader = readers()  # Redis is back
        await wait_until(lambda: _settled(redis, stream, stage, 2))
        await add(redis, stream, [b"new"])
        await wait_until(lambda: _settled(redis, stream, stage, 3))
    finally:
        await running.stop()
        await unreachable.aclose()
    assert sorted(await stage.done()) == [b"lost-1", b"lost-2", b"new"]


async def _contains(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return text in caplog.text


async def test_stop_lets_the_batch_in_hand_finish_then_run_returns(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    stream = f"{settings.prefix}:work"
    stage = Ledger(redis, stream)
    stage.gate = asyncio.Event()
    first = await add(redis, stream, [b"a", b"b"])
    running = Running(worker(stage, redis, readers(), settings, keys, clock))
    await asyncio.wait_for(stage.entered.wait(), EVENT_TIMEOUT_S)  # the batch is in hand, held
    running.worker.stop()
    await add(redis, stream, [b"later"])  # a round trip: the loop had every chance to end
    assert not running.task.done()  # stop() waits for the batch, it does not cut it
    stage.gate.set()
    await asyncio.wait_for(running.task, EVENT_TIMEOUT_S)
    assert await stage.done() == [b"a", b"b"]
    assert await pending(redis, stream) == 0
    [group] = await redis.xinfo_groups(stream)
    assert group["last-delivered-id"].decode() == first[-1]  # "later" was never read


async def _group_reads(redis: Redis, stream: str, group: str, count: int, ack: int) -> None:
    """``group`` is delivered ``count`` entries and acks the first ``ack`` of them."""
    await redis.xgroup_create(stream, group, id="0")
    got = await redis.xreadgroup(group, "c", {stream: ">"}, count=count)
    ids = [i for _, items in got for i, _ in items]
    if ack:
        await redis.xack(stream, group, *ids[:ack])


async def test_trim_keeps_the_oldest_entry_a_group_has_pending(
    settings: Settings, redis: Redis,
) -> None:
    stream = f"{settings.prefix}:work"
    ids = await add(redis, stream, [str(i).encode() for i in range(10)])
    await _group_reads(redis, stream, "fast", 10, 10)
    await redis.xgroup_create(stream, "slow", id="0")
    got = await redis.xreadgroup("slow", "c", {stream: ">"}, count=10)
    await redis.xack(stream, "slow", *[i for _, items in got for i, _ in items if i != ids[1].encode()])

    assert await trim(redis, stream) == 1
    assert [i.decode() for i, _ in await redis.xrange(stream)] == ids[1:]
    assert (await redis.xpending(stream, "slow"))["min"].decode() == ids[1]


async def test_trim_keeps_entries_a_group_has_not_yet_been_delivered(
    settings: Settings, redis: Redis,
) -> None:
    stream = f"{settings.prefix}:work"
    ids = await add(redis, stream, [str(i).encode() for i in range(10)])
    await _group_reads(redis, stream, "fast", 10, 10)
    await _group_reads(redis, stream, "behind", 4, 4)

    assert await trim(redis, stream) == 4
    assert [i.decode() for i, _ in await redis.xrange(stream)] == ids[4:]
    got = await redis.xreadgroup("behind", "c", {stream: ">"}, count=100)
    assert [i.decode() for _, items in got for i, _ in items] == ids[4:]


async def test_trim_removes_entries_every_group_has_acked(
    settings: Settings, redis: Redis,
) -> None:
    stream = f"{settings.prefix}:work"
    await add(redis, stream, [str(i).encode() for i in range(10)])
    await _group_reads(redis, stream, "a", 10, 10)
    await _group_reads(redis, stream, "b", 10, 10)

    assert await trim(redis, stream) == 10
    assert await redis.xlen(stream) == 0



async def test_trim_of_a_long_backlog_goes_in_bounded_steps(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No single XTRIM frees more than TRIM_STEP entries (one call blocks every other
    client while it frees memory), and the result is still exact: all acked entries
    gone, the first one still pending kept."""
    stream = f"{settings.prefix}:work"
    ids = await add(redis, stream, [b"x" * 200] * 3000)
    await _group_reads(redis, stream, "g", 3000, 2500)
    calls: list[int] = []

    async def counted(client: Redis, *args: object) -> object:
        reply = await real_command(client, *args)
        if args[0] == "XTRIM":
            calls.append(int(reply))  # type: ignore[call-overload]
        return reply

    real_command = trim_module.command
    monkeypatch.setattr(trim_module, "command", counted)
    monkeypatch.setattr(trim_module, "TRIM_STEP", 200)

    assert await trim(redis, stream) == 2500
    assert [i.decode() for i, _ in await redis.xrange(stream, count=1)] == [ids[2500]]
    assert await redis.xlen(stream) == 500
    assert max(calls) <= 200 and len(calls) > 2500 // 200

# --- batching: stages off the request path gather larger batches --------------------------


class HeldSleep:
    """Stands in for the worker's sleep: records each wait asked for and holds it until
    ``release`` is set, so a test sees the worker lingering without timing it."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.waiting.set()
        await self.release.wait()


class Lingering(Running):
    """A running worker whose waits go through a :class:`HeldSleep`; released at the end
    so that the worker can stop."""

    def __init__(self, worker: StageWorker, sleep: HeldSleep) -> None:
        super().__init__(worker)
        self.sleep = sleep

    async def __aexit__(self, *exc: object) -> None:
        self.sleep.release.set()
        await super().__aexit__(*exc)


def lingering_worker(stage: Ledger, redis: Redis, reader: Redis, settings: Settings,
                     keys: Keys, clock: ManualClock) -> Lingering:
    sleep = HeldSleep()
    return Lingering(StageWorker(stage, redis, reader, settings, clock, consumer="live",
                                 dead_stream=keys.dead, sleep=sleep), sleep)


def batches(stage: Ledger) -> list[list[bytes]]:
    return [[data for data, _ in call] for call in stage.calls]


async def test_a_lingering_stage_gets_what_arrived_meanwhile_in_one_batch(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    """After a batch that was not full the worker waits ``linger_ms`` before reading
    again: entries added meanwhile come as one batch, in order, each handled once."""
    stream = f"{settings.prefix}:work"
    stage = Ledger(redis, stream)
    stage.batching = Batching(size=100, linger_ms=400)  # type: ignore[attr-defined]
    async with lingering_worker(stage, redis, readers(), settings, keys, clock) as running:
        await add(redis, stream, [b"first"])
        await asyncio.wait_for(running.sleep.waiting.wait(), EVENT_TIMEOUT_S)
        assert running.sleep.waits == [0.4]  # after the short batch, for linger_ms
        assert batches(stage) == [[b"first"]]
        for payload in (b"a", b"b", b"c"):  # arrive while the worker lingers
            await add(redis, stream, [payload])
        running.sleep.release.set()
        await wait_until(lambda: _settled(redis, stream, stage, 4))
    assert batches(stage) == [[b"first"], [b"a", b"b", b"c"]]


async def test_a_full_batch_is_followed_by_the_next_read_at_once(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    """Only a batch that was not full makes the worker linger: a full one means more
    is waiting, so it reads again at once."""
    stream = f"{settings.prefix}:work"
    stage = Ledger(redis, stream)
    stage.batching = Batching(size=2, linger_ms=400)  # type: ignore[attr-defined]
    await add(redis, stream, [b"0", b"1", b"2"])
    async with lingering_worker(stage, redis, readers(), settings, keys, clock) as running:
        # the held linger never ends here: the second batch can only come without one
        await wait_until(lambda: _calls_at_least(stage, 2))
        await asyncio.wait_for(running.sleep.waiting.wait(), EVENT_TIMEOUT_S)
        assert batches(stage) == [[b"0", b"1"], [b"2"]]
        assert running.sleep.waits == [0.4]  # after the short batch only


async def test_a_stage_without_batching_reads_the_settings_batch_size(
    settings: Settings, redis: Redis, keys: Keys, clock: ManualClock,
    readers: Callable[[], Redis],
) -> None:
    stream = f"{settings.prefix}:work"
    stage = Ledger(redis, stream)
    await add(redis, stream, [str(i).encode() for i in range(settings.batch_size + 5)])
    w = worker(stage, redis, readers(), settings, keys, clock)
    await w.setup()
    assert len(await w.read(0)) == settings.batch_size
    assert len(await w.read(0)) == 5
