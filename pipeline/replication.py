"""Acknowledged means replicated: replies held back until WAIT says the replicas have them.

Redis replicates asynchronously: a reply a script adds to a producer's stream can reach
the producer before the change behind it reaches any replica, and a failover then loses
a change somebody was told about. An application that asks for ``replicas`` > 0 makes
its deciding script write each reply to a *held* stream instead (fields ``s``: the
reply stream, ``d``: the payload, ``t``: the reply stream's TTL in seconds), in the
same atomic call as its effects and its acks, and hands the ids it wrote (with their
reply streams) to :meth:`HeldReplies.release`, which:

1. sends ``WAIT replicas timeout`` (``WAITAOF 0 replicas timeout`` on a server of 7.2
   or later: the replicas have the change in their append-only file) on the very
   connection that ran the script, so the wait covers that script's writes;
2. when enough replicas answered, moves each held reply to its stream with the
   ``deliver_held`` script, which deletes it from the held stream in the same step:
   a reply is delivered at most once, however many callers try;
3. when fewer answered in time, raises :class:`NotReplicated`: the replies stay held
   (nothing is lost: the effects and acks are done, the answers wait), and the next
   :meth:`HeldReplies.sweep` delivers them once a WAIT succeeds.

:meth:`HeldReplies.sweep` (run periodically by every worker of the stage) delivers
whatever a crashed worker, a failed WAIT or a failover left held: it reads the oldest
``SWEEP_PAGE`` held entries, makes one small write (so that its own WAIT covers every
write before it: replication is in order) and waits, then delivers them. After a
failover the promoted replica holds exactly the held replies it had received; those
it never received belong to changes it never received either, so their producers were
never answered (they time out and ask again with the same request id).

With ``replicas`` = 0 none of this runs: replies go straight to their streams.
"""

from __future__ import annotations

import logging
import re
from typing import Any, NamedTuple

import msgspec

from pipeline.connections import RawChannel, text
from pipeline.scripts import Script, lua_source

log = logging.getLogger("devsched.replication")

SWEEP_PAGE = 500
"""Most held replies one sweep delivers."""
WAITAOF_SINCE = (7, 2)
"""The first server version with WAITAOF."""


class NotReplicated(Exception):
    """WAIT answered fewer replicas than asked for within the timeout: the replies stay
    held until a later WAIT succeeds (a sweep delivers them)."""


class HeldKeys(NamedTuple):
    held: str


class HeldEntry(msgspec.Struct, kw_only=True):
    entry_id: str
    stream: str
    """The reply stream the held entry names (its field ``s``)."""


class DeliverCall(msgspec.Struct, kw_only=True):
    entries: list[HeldEntry]


DELIVER_HELD = Script("deliver_held", HeldKeys, DeliverCall,
                      lua_source("pipeline", "deliver_held.lua"))
"""Move held replies to their streams, each once (see deliver_held.lua)."""


def held_entries(flat: Any) -> list[HeldEntry]:
    """The entries a script reports as ``{id1, stream1, id2, stream2, ...}``."""
    items = list(flat or [])
    return [HeldEntry(entry_id=text(items[i]), stream=text(items[i + 1]))
            for i in range(0, len(items) - 1, 2)]


class HeldReplies:
    """The held stream ``key`` of one stage, released after ``replicas`` acknowledged
    within ``timeout_ms``."""

    def __init__(self, key: str, replicas: int, timeout_ms: int) -> None:
        self.key = HeldKeys(held=key)
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self._waitaof: bool | None = None  # known after the first WAIT

    async def _uses_waitaof(self, channel: RawChannel) -> bool:
        if self._waitaof is None:
            info = text(await channel.call("INFO", "server"))
            found = re.search(r"redis_version:(\d+)\.(\d+)", info)
            version = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
            self._waitaof = version >= WAITAOF_SINCE
        return self._waitaof

    async def wait(self, channel: RawChannel) -> int:
        """WAIT (or WAITAOF) on ``channel`` for this stage's replicas; how many acknowledged.
        Covers every write ``channel``'s connection made before."""
        if await self._uses_waitaof(channel):
            local_and_replicas = await channel.call("WAITAOF", 0, self.replicas, self.timeout_ms)
            return int(local_and_replicas[1])
        return int(await channel.call("WAIT", self.replicas, self.timeout_ms))

    async def release(self, channel: RawChannel, entries: list[HeldEntry]) -> int:
        """Wait for the replicas, then deliver ``entries``; raises :class:`NotReplicated`
        (the entries stay held) when too few acknowledged. Returns replies delivered."""
        if not entries:
            return 0
        acked = await self.wait(channel)
        if acked < self.replicas:
            raise NotReplicated(f"{acked} of {self.replicas} replicas acknowledged within "
                                f"{self.timeout_ms} ms; {len(entries)} replies stay held")
        delivered: int = await DELIVER_HELD(channel, self.key, DeliverCall(entries=entries))
        return delivered

    async def sweep(self, channel: RawChannel) -> int:
        """Deliver the oldest held replies (left by a crash, a failed WAIT or a failover)
        once the replicas have them; 0 when none are held or too few replicas answer."""
        page = await channel.call("XRANGE", self.key.held, "-", "+", "COUNT", SWEEP_PAGE)
        entries: list[HeldEntry] = []
        for entry_id, fields in page or []:
            values = dict(zip(fields[::2], fields[1::2]))
            stream = values.get(b"s")
            if stream is not None:
                entries.append(HeldEntry(entry_id=text(entry_id), stream=text(stream)))
        if not entries:
            return 0
        # a write of our own, so that the WAIT below covers the held entries just read
        await channel.call("SET", self.key.held + ":swept", "1", "PX", 60_000)
        try:
            delivered = await self.release(channel, entries)
        except NotReplicated as exc:
            log.warning("held replies not released: %s", exc)
            return 0
        if delivered:
            log.info("delivered %d held replies", delivered)
        return delivered
