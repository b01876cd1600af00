"""Trim streams without ever removing an entry some group still needs.

For a stream with consumer groups the cut is the smallest of, over all groups,
the oldest pending id and the first id after the last delivered one: every
entry below it has been delivered to and acked by every group. ``XTRIM MINID``
then removes only those. A stream with no group (an outbound stream read by
others) is capped by length instead.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pipeline.connections import command, text


def _id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = text(value).partition("-")
    return int(ms), int(seq or 0)


async def safe_cut(redis: Redis, stream: str) -> tuple[int, int] | None:
    """The id below which every group has acked, or None when the stream has no group."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return None
    if not groups:
        return None
    cut: tuple[int, int] | None = None
    for g in groups:
        ms, seq = _id(g["last-delivered-id"])
        bound = (ms, seq + 1)
        if int(g.get("pending", 0)) > 0:
            name = g["name"]
            summary = await redis.xpending(stream, name)
            low = summary.get("min")
            if low is not None:
                bound = min(bound, _id(low))
        cut = bound if cut is None else min(cut, bound)
    return cut


async def trim(redis: Redis, stream: str, *, maxlen_without_groups: int = 100_000) -> int:
    """Trim one stream safely; returns the number of entries removed."""
    cut = await safe_cut(redis, stream)
    if cut is None:
        if not await redis.exists(stream):
            return 0
        return int(await redis.xtrim(stream, maxlen=maxlen_without_groups, approximate=True))
    return int(await command(redis, "XTRIM", stream, "MINID", f"{cut[0]}-{cut[1]}"))
