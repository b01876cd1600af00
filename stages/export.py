"""export: closed allocations to the billing service, and users' billing standings back.

**Usage export.** The stage reads the ``changes`` stream in its own group (``export``).
Each closed allocation (``released`` or ``expired``) becomes one
:class:`~schemas.messages.UsageEntry`; its ledger row is written first if bill has not
written it yet (the same ``INSERT ... ON CONFLICT DO NOTHING``, so the row and the entry
hold the same numbers), then entries are POSTed in batches to
``<DEVSCHED_BILLING_URL>/usage`` as ``{"entries": [...]}`` with ``Authorization: Bearer
<DEVSCHED_BILLING_TOKEN>`` and an ``Idempotency-Key`` (a digest of the batch's allocation
ids: the same batch, the same key). When the service accepted a batch, ``exported_at``
is set on its rows (only where it is still NULL: the first acceptance counts). Timeouts,
retries with back-off and jitter, the circuit breaker, the retry queue and the dead
letters are pipeline.http_sink's: an entry the service could not take is parked in the
retry queue atomically with the ack of its change, so nothing is lost while the service
is down, and it is dead-lettered (with the last error) only after
DEVSCHED_HTTP_RETRY_BUDGET_S. Delivery is at least once: the receiver dedupes by
``entry_id`` (docs/wire-format.md): the allocation id for the final entry. Interim entries
(periodic metering, stages/schedules.py) reach the stage on its replay stream, each with
its own ``entry_id``; the final entry bills what they have not.

**Backfill.** A ledger row can miss the stream path: it was closed while
DEVSCHED_BILLING_URL was unset (the stage acked its change and sent nothing), or its
export was accepted but never recorded. So, at its start and then every
DEVSCHED_BILLING_BACKFILL_EVERY_S (on the injected clock), the stage reads up to
``BACKFILL_BATCH`` rows with ``exported_at IS NULL`` that ended at least
DEVSCHED_BILLING_BACKFILL_GRACE_S ago (oldest first) and sends them through the same
sender (batches, Idempotency-Key of the batch's allocation ids, breaker, retries);
accepted rows get ``exported_at`` as above. A row that fails stays NULL in the ledger
(the ledger is its queue: the next round offers it again; it is never dead-lettered
for an outage); a row the service rejects (4xx) is dead-lettered like any entry (a
replay sends it again) and not offered again by this process. One process per period
runs it (``<prefix>:billing:backfill`` holds when the next round is due; the process
that moves it on under WATCH takes the turn). A row still
on its way through the stream path may so be sent twice: harmless, the receiver dedupes
by ``allocation_id`` and ``exported_at`` keeps the first acceptance.

**Balance check.** No HTTP call is on the request path. The stage notes each user it
sees on the changes stream (allocated, refused) in ``<prefix>:billing:seen``; its
background task keeps the standing of those seen within the last hour fresh: every
DEVSCHED_BILLING_STANDING_TTL_S it GETs ``<base>/accounts/<user_id>`` and writes the
answer down: ``billing_balance`` and ``billing_checked_ms`` into the user's hash and,
only when the answer (``ok`` or ``overdue``) differs from the ok/overdue part of
``billing_status`` (a ``suspended`` set by failed payments is kept), a
``billing.standing`` event onto ``<prefix>:events`` in the same MULTI. The events stage
applies it as it applies the other billing events (events.lua: the newest observation
wins, ``status`` follows), so the user's ``status`` changes through the changes stream,
persisted and audited like any event's effect. quota.lua refuses an allocation of a user whose
``billing_status`` is ``overdue`` (``billing_overdue``) and, when failing closed
(DEVSCHED_BILLING_FAIL_OPEN=false), one whose standing is missing or older than
DEVSCHED_BILLING_STANDING_MAX_AGE_S (``billing_unavailable``). A user's standing is thus
learned after their first request. With DEVSCHED_BILLING_URL unset the stage acks what
it reads and does nothing else, and quota.lua reads no billing field.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from pipeline.connections import text
from pipeline.http_sink import HttpSender, SenderConfig, SinkItem, SinkKind, SinkStage
from pipeline.worker import Entry
from schemas.events import Standing
from schemas.keys import GROUP_EXPORT, Keys
from schemas.messages import (
    AccountStanding,
    AllocationChange,
    RequestRejected,
    UsageEntry,
    change_decoder,
)
from stages.bill import write_ledger
from stages.changes import pg_batch
from stages.context import StageContext
from stages.settings import Settings

log = logging.getLogger("devsched.export")

SEEN_WINDOW_MS = 3_600_000
"""Standings are kept fresh for users seen on the changes stream within this window."""
STANDING_BATCH = 200
"""Most standings fetched per round of the refresher (the rest wait for the next)."""
STANDING_POLL_S = 0.5
"""How often the refresher looks for standings to fetch."""
BACKFILL_BATCH = 500
"""Most never-exported ledger rows one backfill round sends."""
BACKFILL_POLL_S = 0.5
"""How often the backfill loop looks at the clock for its next round."""

UNEXPORTED = """
SELECT entry_id, kind, allocation_id::text AS allocation_id, user_id, tenant_id, device_id,
       round(extract(epoch FROM started_at) * 1000)::bigint AS started_at_ms,
       round(extract(epoch FROM ended_at) * 1000)::bigint AS ended_at_ms,
       round(extract(epoch FROM covered_from) * 1000)::bigint AS covered_from_ms,
       round(extract(epoch FROM covered_to) * 1000)::bigint AS covered_to_ms,
       duration_seconds, end_reason
FROM billing_ledger
WHERE exported_at IS NULL AND ended_at <= $1
  AND NOT (entry_id = ANY($2::text[]))
ORDER BY created_at
LIMIT $3
"""
"""The ledger rows the backfill offers (the partial index on created_at WHERE
exported_at IS NULL keeps it to the unexported rows)."""

MARK_EXPORTED = """
UPDATE billing_ledger SET exported_at = $2
WHERE entry_id = ANY($1::text[]) AND exported_at IS NULL
"""
FINAL_BILLED = """
SELECT allocation_id::text, entry_id, duration_seconds, covered_from, covered_to
FROM billing_ledger WHERE allocation_id = ANY($1::uuid[]) AND kind = 'final'
"""
"""The final rows' numbers: what an entry bills is what its ledger row bills (the
allocation's length less its interim rows)."""

_usage_entry = msgspec.json.Decoder(UsageEntry)
_standing = msgspec.json.Decoder(AccountStanding)


def sender_config(settings: Settings) -> SenderConfig:
    """The HTTP sinks' settings, as pipeline.http_sink takes them."""
    return SenderConfig(
        timeout_s=settings.http_timeout_s, attempts=settings.http_attempts,
        backoff_ms=settings.http_backoff_ms, backoff_max_ms=settings.http_backoff_max_ms,
        retry_budget_ms=settings.http_retry_budget_s * 1000,
        breaker_failures=settings.http_breaker_failures,
        breaker_open_ms=settings.http_breaker_open_ms, batch=settings.http_batch,
    )


def shared_sink_stage(ctx: StageContext, name: str, kind: Callable[[StageContext], SinkKind],
                      source: str, base_url: str) -> SinkStage:
    """The sink stage ``name`` of this process: one per context, built on first use and
    shared with its background task (the retry loop, the export's refresher)."""
    stage = ctx.shared.get(name)
    if stage is None:
        keys = ctx.keys
        stage = SinkStage(
            kind(ctx), redis=ctx.redis, clock=ctx.clock, source=source,
            replay=keys.sink_replay(name), retry_key=keys.sink_retry(name),
            dead_stream=keys.dead, base_url=base_url, config=sender_config(ctx.settings),
            states_key=keys.sink_states, batching=ctx.write_behind,
        )
        ctx.shared[name] = stage
    assert isinstance(stage, SinkStage)
    return stage


def usage_entry(change: AllocationChange, row: asyncpg.Record | None = None) -> UsageEntry:
    """The wire entry of a closed allocation, with the numbers of its final ledger row
    (``row``: what it bills after the interim rows, and the part it covers)."""
    ended = change.released_at_ms or change.at_ms
    return UsageEntry(
        entry_id=row["entry_id"] if row else change.allocation_id, kind="final",
        allocation_id=change.allocation_id, user_id=change.user_id, tenant_id=change.tenant_id,
        device_id=change.device_id, started_at_ms=change.allocated_at_ms, ended_at_ms=ended,
        billed_seconds=row["duration_seconds"] if row else change.duration_seconds or 0,
        reason=change.reason or change.status,
        covered_from_ms=int(row["covered_from"].timestamp() * 1000) if row and
        row["covered_from"] else change.allocated_at_ms,
        covered_to_ms=ended,
    )


class UsageExport:
    """The billing export as a pipeline.http_sink.SinkKind."""

    name = GROUP_EXPORT
    path = "/usage"

    def __init__(self, ctx: StageContext) -> None:
        assert ctx.pg is not None, "export needs PostgreSQL"
        self.ctx = ctx
        self.pg = ctx.pg
        self.keys = ctx.keys
        self._seen: dict[str, int] = {}

    async def items(self, entries: Sequence[Entry]) -> list[SinkItem]:
        closed: dict[str, tuple[Entry, AllocationChange]] = {}
        for entry in entries:
            change = change_decoder.decode(entry.data)
            if isinstance(change, AllocationChange | RequestRejected) and change.user_id:
                self._seen[change.user_id] = change.at_ms
            if isinstance(change, AllocationChange) and change.status != "allocated":
                closed[change.allocation_id] = (entry, change)
        await write_ledger(self.pg, [c for _, c in closed.values()])
        rows: dict[str, asyncpg.Record] = {}
        if closed:
            async with pg_batch(self.pg, transaction=False) as conn:
                rows = {r[0]: r for r in await conn.fetch(FINAL_BILLED, list(closed))}
        usage = [usage_entry(c, rows.get(aid)) for aid, (_, c) in closed.items()]
        return [SinkItem(u.entry_id, msgspec.json.encode(u).decode(), e.stream, e.id)
                for u, (e, _) in zip(usage, closed.values(), strict=True)]

    def key_of(self, payload: str) -> str:
        return _usage_entry.decode(payload).entry_id

    def body(self, payloads: Sequence[str]) -> bytes:
        return ('{"entries":[' + ",".join(payloads) + "]}").encode()

    def headers(self, body: bytes, idempotency: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "Idempotency-Key": idempotency,
                "Authorization": f"Bearer {self.ctx.settings.billing_token}"}

    async def accepted(self, keys: Sequence[str]) -> None:
        at = datetime.fromtimestamp(self.ctx.clock.now_ms() / 1000, tz=UTC)
        async with pg_batch(self.pg, transaction=False) as conn:
            await conn.execute(MARK_EXPORTED, list(keys), at)

    def note(self, pipe: Pipeline, entries: Sequence[Entry]) -> None:
        if self._seen:
            pipe.zadd(self.keys.billing_seen, dict(self._seen), gt=True)
            self._seen.clear()


def export_stage(ctx: StageContext) -> SinkStage:
    """The stage of this process (one per context, shared with its background task)."""
    return shared_sink_stage(ctx, GROUP_EXPORT, UsageExport, ctx.keys.changes,
                             ctx.settings.billing_url)


def standing_event(user_id: str, standing: AccountStanding, now_ms: int) -> bytes:
    """The ``billing.standing`` event a fetched standing becomes (schemas/events.py): its
    ``event_id`` names the user and the time it was observed."""
    return msgspec.json.encode(Standing(
        event_id=f"standing-{user_id}-{now_ms}", occurred_at_ms=now_ms, user_id=user_id,
        status=standing.status, balance=standing.balance, observed_at_ms=now_ms))


async def apply_standing(redis: Redis, keys: Keys, user_id: str, standing: AccountStanding,
                         now_ms: int) -> bool | None:
    """Record a fetched standing, atomically with its read (WATCH): ``billing_balance``
    and ``billing_checked_ms`` in the user's hash and, only when the answer differs from
    the ok/overdue part of ``billing_status`` (a ``suspended`` one, from failed payments,
    is the payment events' and left alone), a ``billing.standing`` event on the events
    stream: events.lua applies it like the other billing events, so ``status`` changes
    through the changes stream (persisted, audited, rebuilt). Returns None for a user
    without a quota record (left alone), True when an event was sent, else False."""
    key = keys.user(user_id)
    while True:
        async with redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                status, billing = await pipe.hmget(key, "status", "billing_status")
                if status is None:
                    await pipe.reset()  # type: ignore[no-untyped-call]
                    return None
                current = text(billing) if billing is not None else (
                    "overdue" if text(status) == "overdue" else "ok")
                fields: dict[bytes | bytearray | memoryview | str | int | float,
                             bytes | bytearray | memoryview | str | int | float] = {
                    "billing_checked_ms": now_ms}
                if standing.balance is not None:
                    fields["billing_balance"] = standing.balance
                send = current in ("ok", "overdue") and current != standing.status
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hset(key, mapping=fields)
                if send:
                    pipe.xadd(keys.events, {"d": standing_event(user_id, standing, now_ms)})
                await pipe.execute()
                return send
            except WatchError:
                continue


async def refresh_standings(ctx: StageContext, accounts: HttpSender) -> int:
    """One round: fetch the standings that are due; returns how many were written."""
    s, keys, redis = ctx.settings, ctx.keys, ctx.redis
    now = ctx.clock.now_ms()
    await redis.zremrangebyscore(keys.billing_seen, "-inf", now - SEEN_WINDOW_MS)
    users = [text(u) for u in await redis.zrangebyscore(
        keys.billing_seen, now - SEEN_WINDOW_MS, "+inf", start=0, num=10 * STANDING_BATCH)]
    if not users:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for uid in users:
            pipe.hget(keys.user(uid), "billing_checked_ms")
        checked = await pipe.execute()
    due = [uid for uid, at in zip(users, checked, strict=True)
           if at is None or now - int(at) >= s.billing_standing_ttl_s * 1000][:STANDING_BATCH]
    written = 0
    headers = {"Authorization": f"Bearer {s.billing_token}"}
    for uid in due:
        if not accounts.breaker.ready():
            break
        result = await accounts.request("GET", f"/accounts/{uid}", headers=headers, attempts=1)
        if not result.ok or result.response is None:
            continue
        try:
            standing = _standing.decode(result.response.content)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("bad standing answer: %s", exc, extra={"user_id": uid})
            continue
        if await apply_standing(redis, keys, uid, standing, ctx.clock.now_ms()) is not None:
            written += 1
    return written


async def run_standings(ctx: StageContext, stop: asyncio.Event) -> None:
    """The refresher loop: until ``stop``, a round every STANDING_POLL_S."""
    s = ctx.settings
    accounts = HttpSender("accounts", s.billing_url, sender_config(s), ctx.clock,
                          redis=ctx.redis, states_key=ctx.keys.sink_states)
    try:
        while not stop.is_set():
            try:
                await refresh_standings(ctx, accounts)
            except Exception as exc:  # noqa: BLE001 - Redis down: the next round tries again
                log.warning("standing refresher: %r", exc)
            try:
                await asyncio.wait_for(stop.wait(), STANDING_POLL_S)
            except TimeoutError:
                pass
    finally:
        await accounts.aclose()


async def backfill_once(ctx: StageContext, stage: SinkStage, skip: set[str]) -> int:
    """One backfill round (see the module docstring): the rows accepted now. ``skip``:
    rows rejected before (this process offers them no more; it adds the new ones)."""
    assert ctx.pg is not None
    grace_ms = ctx.settings.billing_backfill_grace_s * 1000
    until = datetime.fromtimestamp((ctx.clock.now_ms() - grace_ms) / 1000, tz=UTC)
    async with pg_batch(ctx.pg, transaction=False) as conn:
        rows = await conn.fetch(UNEXPORTED, until, list(skip), BACKFILL_BATCH)
    if not rows:
        return 0
    items = [SinkItem(r["entry_id"], msgspec.json.encode(UsageEntry(
        entry_id=r["entry_id"], kind=r["kind"],
        allocation_id=r["allocation_id"], user_id=r["user_id"], tenant_id=r["tenant_id"],
        device_id=r["device_id"], started_at_ms=int(r["started_at_ms"]),
        ended_at_ms=int(r["ended_at_ms"]), billed_seconds=int(r["duration_seconds"]),
        reason=r["end_reason"], covered_from_ms=r["covered_from_ms"],
        covered_to_ms=r["covered_to_ms"])).decode(), stage.replay, "0-0") for r in rows]
    outcome = await stage.send_backlog(items)
    skip.update(item.key for item, _ in outcome.rejected)
    if outcome.failed:
        log.warning("backfill: %d of %d ledger rows not accepted (offered again next "
                    "round): %s", len(outcome.failed), len(items), outcome.failed[0][1])
    else:
        log.info("backfill: %d ledger rows exported", len(outcome.delivered))
    return len(outcome.delivered)


async def backfill_turn(ctx: StageContext) -> bool:
    """Is a backfill round due, and is it this process's? ``<prefix>:billing:backfill``
    holds when the next round is due (ms of the clock); the process that moves it on
    (WATCH, so only one does) runs the round."""
    key, now = ctx.keys.billing_backfill, ctx.clock.now_ms()
    every_ms = ctx.settings.billing_backfill_every_s * 1000
    async with ctx.redis.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(key)
            due = await pipe.get(key)
            if due is not None and now < int(due):
                await pipe.reset()  # type: ignore[no-untyped-call]
                return False
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.set(key, now + every_ms)
            await pipe.execute()
        except WatchError:
            return False  # another process took this turn
    return True


async def run_backfill(ctx: StageContext, stop: asyncio.Event) -> None:
    """The backfill loop: a round at start, then every DEVSCHED_BILLING_BACKFILL_EVERY_S
    of the clock, in the one process that takes the period's turn."""
    stage = export_stage(ctx)
    skip: set[str] = set()
    while not stop.is_set():
        try:
            if await backfill_turn(ctx):
                await backfill_once(ctx, stage, skip)
        except Exception as exc:  # noqa: BLE001 - Redis or PostgreSQL down: next poll
            log.warning("backfill: %r", exc)
        try:
            await asyncio.wait_for(stop.wait(), BACKFILL_POLL_S)
        except TimeoutError:
            pass


async def run_export_background(ctx: StageContext, stop: asyncio.Event) -> None:
    """Beside the export workers: the retry loop, the standing refresher and the
    backfill of never-exported ledger rows."""
    if not ctx.settings.billing_url:
        return
    await asyncio.gather(export_stage(ctx).run_retries(stop), run_standings(ctx, stop),
                         run_backfill(ctx, stop))
