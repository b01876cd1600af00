"""The dead stream, read and worked: list, show, replay once, purge.

A dead letter (``schemas.runtime.DeadLetter``) is what a stage gave up on; its id is
its entry id on the dead stream. What this module promises:

* **A replay puts the entry back once.** :func:`replay` adds the letter's payload to
  the stream it came from and records ``<stream>/<entry id> -> new id`` in the hash
  ``<dead stream>:replayed`` in one script (``pipeline/lua/replay.lua``): a replay
  repeated, re-run after a crash, or asked for another letter of the same entry (every
  group of a stream that gave up on it wrote one) adds nothing and answers the id of
  the first. The entry then goes to every group of that stream again, as a new entry;
  the stages' effects are idempotent, so a group that had handled it changes nothing.
  If the replayed entry fails again it is dead-lettered again, under its new id, and
  can be replayed again once fixed.
* **Letters are kept until purged.** :func:`purge` removes letters older than a cut
  (the dead stream's ids are times) and forgets the replay records no remaining
  letter needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.asyncio import Redis

from pipeline.connections import text
from pipeline.scripts import REPLAY, ReplayCall, ReplayKeys
from schemas.runtime import DeadLetter, dead_decoder

READ_CHUNK = 1_000
"""Dead letters read per XRANGE."""


@dataclass(frozen=True)
class StoredLetter:
    """A dead letter as the dead stream holds it."""

    id: str
    """Its entry id on the dead stream."""
    letter: DeadLetter | None
    """None when the entry does not decode as a dead letter."""
    raw: str
    """The entry's ``d`` field as it is."""
    replayed_as: str | None = None
    """The entry id it was put back on its stream as, once replayed."""

    @property
    def source(self) -> str | None:
        return None if self.letter is None else source_of(self.letter)


def source_of(letter: DeadLetter) -> str:
    """The replay record's field for a letter: the entry it holds."""
    return f"{letter.stream}/{letter.entry_id}"


def replays_key(dead_stream: str) -> str:
    return f"{dead_stream}:replayed"


def _stored(entry_id: object, fields: Any) -> StoredLetter:
    raw: bytes = (fields or {}).get(b"d", b"")
    try:
        letter: DeadLetter | None = dead_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        letter = None
    return StoredLetter(text(entry_id), letter, raw.decode("utf-8", "replace"))


async def _with_replays(redis: Redis, dead_stream: str,
                        letters: list[StoredLetter]) -> list[StoredLetter]:
    sources = [s.source or "" for s in letters]
    if not sources:
        return letters
    done = await redis.hmget(replays_key(dead_stream), sources)
    return [StoredLetter(s.id, s.letter, s.raw, text(d) if d is not None else None)
            for s, d in zip(letters, done)]


async def read_letters(redis: Redis, dead_stream: str, *, stage: str | None = None,
                       before_ms: int | None = None) -> list[StoredLetter]:
    """Every dead letter, oldest first (``stage``: only that stage's; ``before_ms``:
    only those dead-lettered before that time), each with its replay."""
    out: list[StoredLetter] = []
    start = "-"
    end = "+" if before_ms is None else f"({before_ms}"
    while True:
        chunk: Any = await redis.xrange(dead_stream, start, end, count=READ_CHUNK)
        for entry_id, fields in chunk:
            stored = _stored(entry_id, fields)
            if stage is None or (stored.letter is not None and stored.letter.stage == stage):
                out.append(stored)
        if len(chunk) < READ_CHUNK:
            break
        start = "(" + text(chunk[-1][0])
    return await _with_replays(redis, dead_stream, out)


async def read_letter(redis: Redis, dead_stream: str, letter_id: str) -> StoredLetter | None:
    """One dead letter by its id, or None."""
    found: Any = await redis.xrange(dead_stream, letter_id, letter_id, count=1)
    if not found:
        return None
    return (await _with_replays(redis, dead_stream, [_stored(*found[0])]))[0]


@dataclass(frozen=True)
class Replayed:
    letter_id: str
    stream: str
    entry_id: str
    """The replayed entry's new id on ``stream``."""
    added: bool
    """False: it had been replayed before (nothing added now)."""


async def replay(redis: Redis, dead_stream: str, stored: StoredLetter) -> Replayed:
    """Put one dead letter's entry back on its stream, once (see the module's doc)."""
    letter = stored.letter
    if letter is None:
        raise ValueError(f"dead letter {stored.id} does not decode; it cannot be replayed")
    added, new_id = await REPLAY(redis, ReplayKeys(target=letter.stream,
                                                   replays=replays_key(dead_stream)),
                                 ReplayCall(source=source_of(letter), payload=letter.payload))
    return Replayed(stored.id, letter.stream, text(new_id), bool(added))


async def purge(redis: Redis, dead_stream: str, before_ms: int) -> int:
    """Remove the dead letters dead-lettered before ``before_ms``; returns how many.
    Replay records are forgotten only for entries no remaining letter holds."""
    gone = await read_letters(redis, dead_stream, before_ms=before_ms)
    if not gone:
        return 0
    kept = await read_letters(redis, dead_stream)
    gone_ids = {g.id for g in gone}
    still = {s.source for s in kept if s.id not in gone_ids}
    forget = sorted({s.source for s in gone if s.source is not None} - still)
    async with redis.pipeline(transaction=True) as tx:
        for first in range(0, len(gone), READ_CHUNK):
            tx.xdel(dead_stream, *[s.id for s in gone[first:first + READ_CHUNK]])
        if forget:
            tx.hdel(replays_key(dead_stream), *forget)
        await tx.execute()
    return len(gone)


def by_stage_and_error(letters: Sequence[StoredLetter], error_chars: int = 120
                       ) -> dict[str, dict[str, int]]:
    """Count of letters per stage, then per error (its first ``error_chars`` characters;
    ``undecodable`` for an entry that is no dead letter)."""
    out: dict[str, dict[str, int]] = {}
    for s in letters:
        stage = s.letter.stage if s.letter else "?"
        error = s.letter.error.splitlines()[0][:error_chars] if s.letter and s.letter.error \
            else ("undecodable" if s.letter is None else "")
        per = out.setdefault(stage, {})
        per[error] = per.get(error, 0) + 1
    return out
