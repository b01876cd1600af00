"""The state marker: whether Redis holds a live state, and which one (its epoch).

Redis holds the live state; when it comes back without it (a lost append-only file,
FLUSHALL, a fresh server at the same address), nothing may answer from nothing: a
quota check on a user Redis no longer knows would refuse as ``quota_exceeded``, an
empty free pool as ``no_available_devices``, a re-added device would be free while a
user still holds it. So the state carries a marker, ``<prefix>:{pool}:state``
(:attr:`schemas.keys.Keys.state`), a hash of

- ``epoch``: 16 random hex digits, new each time a state is established;
- ``by``: what established it (``up`` for a fresh state, ``rebuild``, ``test``, ...);
- ``at_ms``: when.

It is written by `devsched up` / `run` on a fresh install (Redis and PostgreSQL both
empty; `demo` and the benchmark start from a fresh state the same way) and by
`devsched rebuild` as its very last write (after every device and user, so a worker
never serves from half a state). A rebuild first replaces it by ``rebuilding``
(``at_ms``, no epoch): a rebuild cut short leaves that, and `up` runs the rebuild
again instead of taking half a state for a whole one. The
epoch goes into every allocation id (stages/lua/select.lua), so ids made after a state
loss never repeat ids of before, whatever request ids producers re-send.

The request-path scripts (quota.lua, select.lua) and admin.lua read it once per call,
inside the call: the check and the work it guards are one atomic step, and it costs
one hash read per batch, not per request. Without an epoch a request-path script
changes nothing and acks nothing, and its stage raises :class:`StateMissing`, a
:class:`~pipeline.worker.Transient`: the worker keeps the batch, logs why ("dependency
down, retrying ... no state marker ..."), backs off (at most 5 s) and retries it until
the marker is back; entries not yet read stay in their stream. So requests wait,
they are not refused: a producer whose own time-out passes counts a ``timed_out``;
a request still in the stream when the state comes back is served then. Admin
changes are refused with :class:`StateMissing` (the command exits 1).

The marker lives in the ``{pool}`` slot: the select script already writes that slot;
the quota script, whose other keys are the user's ``{u:ID}``, reads it as one more key
of its call (one Redis today; on Redis Cluster, where a script's keys must share a
slot, quota's phase would read the marker before its call instead).
"""

from __future__ import annotations

import secrets

from redis.asyncio import Redis

from pipeline.connections import text
from pipeline.worker import Transient
from schemas.keys import Keys

EPOCH_HEX_DIGITS = 16
"""Length of an epoch: 64 random bits, never repeated in practice."""


class StateMissing(Transient):
    """Redis has no state marker with an epoch: it holds no live state (it came back
    empty, or a rebuild is under way), so nothing is served from it."""

    def __init__(self, keys: Keys, waiting: str = "serving requests waits") -> None:
        super().__init__(
            f"no state marker at {keys.state}: Redis holds no live state (it came back "
            f"empty, or a rebuild is running); {waiting} until `devsched up` or "
            "`devsched rebuild` brings it back")


NO_STATE_ERROR = "NOSTATE"
"""How admin.lua's refusal starts."""


def new_epoch() -> str:
    return secrets.token_hex(EPOCH_HEX_DIGITS // 2)


async def mark_state(redis: Redis, keys: Keys, *, by: str, now_ms: int,
                     epoch: str | None = None) -> str:
    """Write the marker with a new epoch (or ``epoch``), replacing what it held; returns
    the epoch."""
    epoch = epoch or new_epoch()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.state)
        pipe.hset(keys.state, mapping={"epoch": epoch, "by": by, "at_ms": now_ms})
        await pipe.execute()
    return epoch


async def mark_rebuilding(redis: Redis, keys: Keys, *, now_ms: int) -> None:
    """Replace the marker by ``rebuilding`` (no epoch: nothing is served) for a rebuild."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.state)
        pipe.hset(keys.state, "rebuilding", now_ms)
        await pipe.execute()


async def read_marker(redis: Redis, keys: Keys) -> dict[str, str]:
    """The marker's fields (empty when there is none)."""
    return {text(k): text(v) for k, v in (await redis.hgetall(keys.state)).items()}


async def state_epoch(redis: Redis, keys: Keys) -> str | None:
    """The epoch of the live state, or None when Redis holds no marker."""
    found = await redis.hget(keys.state, "epoch")
    return None if found is None else text(found)
