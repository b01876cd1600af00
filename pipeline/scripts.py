"""Lua scripts loaded once by SHA and called through one small typed wrapper.

A :class:`Script` is built from one or more source files (shared helpers first,
then the script itself), hashed locally, and called with EVALSHA; on NOSCRIPT
(a restarted or failed-over Redis) it loads the source and retries once. Both
the plain client and a pipeline can be the target, so a script can join a
batch that goes out in one round trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

ScriptArg = str | int | float | bytes


class ScriptTarget(Protocol):
    """Where a script can run: a ``redis.asyncio.Redis``, a pipeline or a ``RawChannel``."""

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    async def script_load(self, source: str) -> Any: ...


class Script:
    """One Lua script: ``await script(redis, keys, args)``."""

    def __init__(self, name: str, *paths: Path) -> None:
        self.name = name
        self.source = "\n".join(p.read_text() for p in paths)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(
        self, redis: Redis | ScriptTarget, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)

    async def load(self, redis: Redis) -> None:
        await redis.script_load(self.source)


HANDOFF = Script("handoff", Path(__file__).parent / "lua" / "handoff.lua")
"""Ack a batch and add each entry's output, atomically and once (see handoff.lua)."""
APPEND = Script("append", Path(__file__).parent / "lua" / "append.lua")
"""Add a batch of payloads to one stream in one call (producers)."""
