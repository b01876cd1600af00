"""What the stages behind the changes stream share: reading changes, PostgreSQL
timestamps, and which PostgreSQL errors mean "try the batch again later".

persist, bill and notify each read the whole ``changes`` stream in their own
consumer group. An entry that does not decode raises here, so the worker retries
it alone and dead-letters it with the error after the delivery limit; it never
stops the stage. A PostgreSQL outage, a deadlock or a serialization failure
raised inside :func:`pg_batch` becomes the worker's ``Transient``: the batch is
kept and retried whole, nothing acked before commit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg

from pipeline.worker import Entry, Transient
from schemas.messages import Change, change_decoder

TRANSIENT_PG_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    TimeoutError,
    # the transaction was rolled back and is to be tried again, whole
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
"""PostgreSQL errors after which a batch is retried whole, later (the worker's Transient)."""


def ts(ms: int | None) -> datetime | None:
    """A wire time (ms since the epoch) as a timestamptz value."""
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


def decode_changes(entries: Sequence[Entry]) -> list[Change]:
    """Decode the batch; an undecodable change is an error for the worker to dead-letter."""
    return [change_decoder.decode(e.data) for e in entries]


@asynccontextmanager
async def pg_batch(pg: asyncpg.Pool, *, transaction: bool = True) -> AsyncIterator[asyncpg.Connection]:
    """A connection for one batch's writes (in one transaction unless told otherwise);
    a transient PostgreSQL failure leaves as the worker's ``Transient``."""
    try:
        async with pg.acquire() as conn:
            if transaction:
                async with conn.transaction():
                    yield conn
            else:
                yield conn
    except TRANSIENT_PG_ERRORS as exc:
        raise Transient(f"PostgreSQL: {exc!r}; retrying the batch") from exc
