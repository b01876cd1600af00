"""Lua scripts loaded once by SHA and called through one small typed wrapper.

A :class:`Script` is declared with its keys type (a ``NamedTuple`` of key names)
and its call type (a msgspec ``Struct``): ``await script(redis, keys, call)``.
The keys go to KEYS in the tuple's order; the whole call is encoded as ONE
msgpack value (one encoder, made once) and passed as ``ARGV[1]``.

What the script sees is generated from the two types, as a preamble put before
its source (:func:`lua_preamble`): ``KEY.<name>`` for each key, and ``CALL``,
the call decoded with ``cmsgpack.unpack``, whose fields are read by name
(``CALL.prefix``, ``row.request_id``). Every table of the call gets a metatable
under which a name its Struct does not declare raises ``error('row <tag> has no
field <name>')`` (``<Struct name> has no field`` for an untagged Struct). A field
renamed on one side therefore fails the first call that reads it, loudly,
instead of reading nil.

An optional field that is absent (None) reads as **false**, not nil: a plain
table read instead of a function call per absent field, which keeps the cost
per row down (a batch's rows are read in Redis's one thread). Lua tests
optional fields by truth (``if row.name then``, ``row.label or ''``), never
``== nil``; ``opt()`` in common.lua turns false into JSON null. A field left
out because it equals its default (``omit_defaults``) reads as that default. A
field that is present costs nothing extra.

Rules the types must follow (checked when a Script is made): Structs encode as
maps (no ``array_like``); a nested Struct sits directly in a field, in an
optional field, or in a list; a union of Structs (a batch's rows) is tagged by
one field and its members hold no Struct themselves; and no field carries
``bytes``: Redis's cmsgpack reads no msgpack bin, so text goes as
``str`` (stream payloads are UTF-8 JSON). Numbers arrive as Lua numbers
(doubles: integers are exact to 2^53), None as an absent field (read as
false), booleans as booleans.

On Redis 7 and later the script is a Redis Function (FUNCTION LOAD once, FCALL per
call): a library named ``<name>_<first 16 hex of the source's sha1>`` (so versions
of one script coexist during a deployment) whose top level runs once, at load,
and holds the preamble's strict metatables (made once, not per call) and every
line of the source above the marker line :data:`PER_CALL` (shared helpers:
closures and constant tables); the function runs the rest, from the marker on,
with ``KEYS`` and ``ARGV`` as its arguments. What sits above the marker must
therefore hold no state of one call, or reset it below the marker. A source
without the marker runs whole at every call (only the preamble's metatables are
made once). On a Redis without Functions (6.2: ``unknown command``) the script
is called with EVALSHA, preamble and whole source at every call, as before; a
Script learns which on its first call (or at :meth:`Script.load`) and goes back
to asking when the server answers otherwise. On ``Function not found`` / NOSCRIPT
(a restarted or failed-over Redis that lost them) it loads the library or the
source and retries once. Both the plain client and a
pipeline can be the target, so a script can join a batch that goes out in one
round trip (queued in a pipeline, a script is an FCALL once the Script knows the
server has Functions, else an EVALSHA: load it before the pipeline executes). Sources are package data, read with :func:`lua_source`.
"""

from __future__ import annotations

import hashlib
import re
from importlib.resources import files
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import msgspec
from msgspec import inspect
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, ResponseError


class ScriptTarget(Protocol):
    """Where a script can run: a ``redis.asyncio.Redis``, a pipeline or a ``RawChannel``."""

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    async def script_load(self, source: str) -> Any: ...

    async def execute_command(self, *args: Any) -> Any: ...


PER_CALL = "-- @per-call"
"""A line starting with this splits a script's source: above, what a Redis Function
library runs once at load (helpers); from it on, what runs at every call."""


KeysT = TypeVar("KeysT", bound=tuple[str, ...])
"""A script's keys: a NamedTuple whose field names are the names the script uses."""
CallT = TypeVar("CallT", bound=msgspec.Struct)
"""A script's call: one msgspec Struct, encoded as one msgpack value."""

_encoder = msgspec.msgpack.Encoder()


def lua_source(package: str, *names: str) -> str:
    """The Lua files ``names`` of ``package``'s ``lua/`` folder (package data), joined in
    order (shared helpers first)."""
    folder = files(package).joinpath("lua")
    return "\n".join(folder.joinpath(name).read_text() for name in names)


class Script(Generic[KeysT, CallT]):
    """One Lua script: ``await script(redis, keys, call)``.

    ``body`` is the script's own source; ``source`` is what Redis runs: the preamble
    generated from ``keys`` and ``call`` (see the module docstring), then ``body``."""

    def __init__(self, name: str, keys: type[KeysT], call: type[CallT], body: str) -> None:
        self.name = name
        self.keys = keys
        self.call = call
        self.body = body
        self.source = lua_preamble(keys, call) + body
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self.function = re.sub(r"[^A-Za-z0-9_]", "_", name) + "_" + self.sha[:16]
        """The Redis Function (and its library's) name."""
        self.library = lua_library(self.function, keys, call, body)
        self.functions: bool | None = None
        """Whether the server has Functions (None: not known yet; found on first use)."""

    async def __call__(self, redis: Redis | ScriptTarget, keys: KeysT, call: CallT) -> Any:
        packed = _encoder.encode(call)
        if isinstance(redis, Pipeline):
            # queued: an error shows only at execute, so no learning here; FCALL once the
            # server is known to have Functions, else EVALSHA (load() also SCRIPT LOADs)
            if self.functions:
                return await redis.execute_command(
                    "FCALL", self.function, len(keys), *keys, packed)
            return await redis.evalsha(self.sha, len(keys), *keys, packed)
        if self.functions is not False:
            try:
                reply = await redis.execute_command(
                    "FCALL", self.function, len(keys), *keys, packed)
            except ResponseError as exc:
                if _no_functions(exc):
                    self.functions = False
                elif _function_missing(exc):
                    await self._load_library(redis)
                    return await redis.execute_command(
                        "FCALL", self.function, len(keys), *keys, packed)
                else:
                    raise
            else:
                self.functions = True
                return reply
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, packed)
        except NoScriptError:
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, packed)

    async def _load_library(self, redis: Redis | ScriptTarget) -> None:
        try:
            await redis.execute_command("FUNCTION", "LOAD", self.library)
        except ResponseError as exc:
            if "already exists" not in str(exc):  # loaded meanwhile: the same source
                raise
        self.functions = True

    async def load(self, redis: Redis) -> None:
        """Load the script: as a Function library where the server has Functions (and
        remember that); by SCRIPT LOAD too, so EVALSHA of ``sha`` works on any server."""
        try:
            await self._load_library(redis)
        except ResponseError as exc:
            if not _no_functions(exc):
                raise
            self.functions = False
        await redis.script_load(self.source)


def _no_functions(exc: ResponseError) -> bool:
    """The server has no Functions (Redis before 7)."""
    text = str(exc).lower()
    return text.startswith(("unknown command", "err unknown command"))


def _function_missing(exc: ResponseError) -> bool:
    """FCALL of a function the server does not hold (restarted, flushed, failed over)."""
    return str(exc).lower().startswith(("function not found", "err function not found"))


# --- the generated preamble ---------------------------------------------------------
#
# Straight-line Lua, cheap per call. A table of the call gets its kind's metatable, made
# on the first table of that kind in the call: its __index is a table holding `false`
# for each field that may be absent (and the kind's name at [0]), so reading an absent
# optional field costs a table read, not a function call; that table's own __index, one
# per call, is the function that raises for any other name. A present field never
# reaches either.

_PREAMBLE_HEAD = """\
-- Generated by pipeline.scripts from {keys} and {call}; not edited by hand.
-- KEY.<name>: the keys by name. CALL: ARGV[1] decoded; a table of it raises on a field
-- name its Struct does not declare; an absent optional field reads as false.
local KEY, CALL
do
  local no_field = {{__index = function(absent, name)
    error(rawget(absent, 0) .. ' has no field ' .. tostring(name), 2)
  end}}
  local function strict(what, absent)  -- absent: field name -> what it reads as
    absent[0] = what
    return {{__index = setmetatable(absent, no_field)}}
  end
"""


class _Preamble:
    """Writes the Lua that gives every table of a call its Struct's metatable. A
    metatable is made on the first table of its kind in a call, so a batch pays only for
    the kinds it holds."""

    def __init__(self) -> None:
        self.meta: dict[type[msgspec.Struct], tuple[str, str]] = {}
        self.body: list[str] = []

    def metatable(self, info: inspect.StructType) -> tuple[str, str]:
        """The Lua local for ``info``'s metatable, and the expression that makes it."""
        cls = info.cls
        if cls in self.meta:
            return self.meta[cls]
        if info.array_like:
            raise TypeError(f"{cls.__qualname__}: a script reads fields by name, not array_like")
        what = f"row {info.tag}" if info.tag is not None else cls.__name__
        absent = ", ".join(f"[{_lua_str(f.encode_name)}] = {_absent_value(cls, f)}"
                           for f in info.fields if _may_be_absent(cls, f))
        made = f"strict({_lua_str(what)}, {{{absent}}})"
        self.meta[cls] = (f"m{len(self.meta) + 1}", made)
        return self.meta[cls]

    def set_meta(self, var: str, info: inspect.StructType, indent: str) -> None:
        name, made = self.metatable(info)
        self.body.append(f"{indent}if {name} == nil then  -- {info.cls.__qualname__}")
        self.body.append(f"{indent}  {name} = {made}")
        self.body.append(f"{indent}end")
        self.body.append(f"{indent}setmetatable({var}, {name})")

    def bless(self, var: str, t: inspect.Type, where: str, indent: str, depth: int) -> None:
        """Lines that set the metatables of the value in ``var`` (of type ``t``, not nil)
        and of every table inside it. Fields are read before the table's own metatable
        is set, so a plain index is a raw read."""
        _check_plain(where, t)
        if isinstance(t, inspect.StructType):
            for f in t.fields:
                inner = _optional(f.type)
                if not _has_struct(inner):
                    continue
                x = f"x{depth}"
                self.body.append(f"{indent}do local {x} = {var}[{_lua_str(f.encode_name)}]")
                self.body.append(f"{indent}  if {x} ~= nil then")
                self.bless(x, inner, f"{where}.{f.name}", indent + "    ", depth + 1)
                self.body.append(f"{indent}  end")
                self.body.append(f"{indent}end")
            self.set_meta(var, t, indent)
        elif isinstance(t, inspect.ListType | inspect.VarTupleType):
            x, i = f"x{depth}", f"i{depth}"
            self.body.append(f"{indent}for {i} = 1, #{var} do local {x} = {var}[{i}]")
            self.bless(x, t.item_type, f"{where}[]", indent + "  ", depth + 1)
            self.body.append(f"{indent}end")
        elif isinstance(t, inspect.UnionType):
            kinds = [k for k in t.types if isinstance(k, inspect.StructType)]
            tag_field = kinds[0].tag_field if kinds else None
            if tag_field is None or any(k.tag_field != tag_field or k.tag is None for k in kinds):
                raise TypeError(f"{where}: a union of Structs must be tagged by one field")
            if any(_has_struct(f.type) for k in kinds for f in k.fields):
                raise TypeError(f"{where}: a tagged row holds no Struct (rows are flat)")
            tag = f"tag{depth}"
            self.body.append(f"{indent}local {tag} = {var}[{_lua_str(tag_field)}]")
            for n, k in enumerate(kinds):
                keyword = "if" if n == 0 else "elseif"
                self.body.append(f"{indent}{keyword} {tag} == {_lua_str(str(k.tag))} then")
                self.set_meta(var, k, indent + "  ")
            self.body.append(f"{indent}else")
            no_kind = _lua_str(where + ": no kind ")
            self.body.append(f"{indent}  error({no_kind} .. tostring({tag}))")
            self.body.append(f"{indent}end")


_NO_BYTES = "bytes do not reach a script (cmsgpack reads no msgpack bin); use str"


def _admits_none(t: inspect.Type) -> bool:
    return isinstance(t, inspect.NoneType) or (
        isinstance(t, inspect.UnionType) and any(isinstance(k, inspect.NoneType) for k in t.types))


def _may_be_absent(cls: type[msgspec.Struct], f: inspect.Field) -> bool:
    """Whether a decoded table may lack field ``f``: a None value decodes to nothing, and
    a Struct that omits defaults leaves out a field equal to its default."""
    omits = bool(cls.__struct_config__.omit_defaults) and not f.required
    return _admits_none(f.type) or omits


def _absent_value(cls: type[msgspec.Struct], f: inspect.Field) -> str:
    """What a script reads for field ``f`` when it is absent: false for None, else the
    field's default (a Struct that omits defaults leaves it out)."""
    omitted = bool(cls.__struct_config__.omit_defaults) and not f.required
    default = f.default
    if not omitted or default is None:
        return "false"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, int | float):
        return repr(default)
    if isinstance(default, str):
        return _lua_str(default)
    raise TypeError(f"{cls.__qualname__}.{f.name}: an omitted default a script cannot read")


def _lua_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _optional(t: inspect.Type) -> inspect.Type:
    """``X | None`` as ``X``."""
    if isinstance(t, inspect.UnionType):
        rest = [k for k in t.types if not isinstance(k, inspect.NoneType)]
        if len(rest) == 1:
            return rest[0]
    return t


def _has_struct(t: inspect.Type) -> bool:
    """Whether a value of type ``t`` holds a table that gets a metatable."""
    if isinstance(t, inspect.StructType):
        return True
    if isinstance(t, inspect.UnionType):
        return any(_has_struct(k) for k in t.types)
    if isinstance(t, inspect.ListType | inspect.VarTupleType):
        return _has_struct(t.item_type)
    return False


def _check_plain(where: str, t: inspect.Type) -> None:
    """Refuse what a script cannot read as declared."""
    kinds = t.types if isinstance(t, inspect.UnionType) else (t,)
    for k in kinds:
        if isinstance(k, inspect.BytesType | inspect.ByteArrayType | inspect.MemoryViewType):
            raise TypeError(f"{where}: {_NO_BYTES}")
        if isinstance(k, inspect.StructType):
            for f in k.fields:
                _check_field(f"{where}.{f.name}", f.type)


def _check_field(where: str, t: inspect.Type) -> None:
    kinds = t.types if isinstance(t, inspect.UnionType) else (t,)
    for k in kinds:
        if isinstance(k, inspect.BytesType | inspect.ByteArrayType | inspect.MemoryViewType):
            raise TypeError(f"{where}: {_NO_BYTES}")
        if isinstance(k, inspect.ListType | inspect.VarTupleType):
            _check_field(f"{where}[]", k.item_type)
        elif isinstance(k, inspect.DictType | inspect.TupleType | inspect.SetType
                        | inspect.FrozenSetType):
            inner = [getattr(k, a) for a in ("key_type", "value_type", "item_type")
                     if hasattr(k, a)] + list(getattr(k, "item_types", ()))
            if any(_has_struct(i) for i in inner):
                # a Struct there would get no metatable: refuse rather than miss it
                raise TypeError(f"{where}: a Struct inside {type(k).__name__} is not read")


def _preamble_parts(keys: type[tuple[str, ...]],
                    call: type[msgspec.Struct]) -> tuple[str, str, str]:
    """The metatable locals, the lines that decode and bless the call, and the keys
    table's constructor."""
    key_names: tuple[str, ...] = getattr(keys, "_fields", ())
    if not key_names:
        raise TypeError(f"{keys.__qualname__}: the keys of a script are a NamedTuple")
    info = inspect.type_info(call)
    if not isinstance(info, inspect.StructType):
        raise TypeError(f"{call!r}: the call of a script is a msgspec Struct")
    builder = _Preamble()
    builder.bless("call", info, call.__name__, "  ", 1)
    key_table = ", ".join(f"[{_lua_str(k)}] = KEYS[{i}]" for i, k in enumerate(key_names, 1))
    metas = ", ".join(name for name, _ in builder.meta.values())
    blessing = "  local call = cmsgpack.unpack(ARGV[1])\n" + "\n".join(builder.body) + "\n"
    return metas, blessing, "{" + key_table + "}"


def lua_preamble(keys: type[tuple[str, ...]], call: type[msgspec.Struct]) -> str:
    """The Lua put before a script's source: ``KEY`` (the keys by name) and ``CALL`` (the
    call, decoded from ``ARGV[1]``, every table of it strict by its Struct)."""
    metas, blessing, key_table = _preamble_parts(keys, call)
    return (
        _PREAMBLE_HEAD.format(keys=keys.__qualname__, call=call.__qualname__)
        + f"  local {metas}\n"
        + blessing
        + "  CALL = call\n"
        + f"  KEY = setmetatable({key_table}, "
        + "strict('keys', {}))\n"
        + "end\n"
    )


def lua_library(function: str, keys: type[tuple[str, ...]], call: type[msgspec.Struct],
                body: str) -> str:
    """The Redis Function library of a script (see the module docstring): the preamble's
    helpers and metatables and the source above the :data:`PER_CALL` line at its top
    level (run once, at FUNCTION LOAD), one function ``function`` that gives ``KEY`` and
    ``CALL`` for the call and runs the rest."""
    metas, blessing, key_table = _preamble_parts(keys, call)
    helpers, per_call = "", body
    at = body.find("\n" + PER_CALL)
    if body.startswith(PER_CALL):
        at = 0
    elif at >= 0:
        at += 1
    if at >= 0:
        helpers, per_call = body[:at], body[at:]
    head = _PREAMBLE_HEAD.format(keys=keys.__qualname__, call=call.__qualname__)
    head = head.replace("local KEY, CALL\ndo\n", "local KEY, CALL\n")
    return (
        f"#!lua name={function}\n"
        + head
        + f"  local {metas}\n"
        + "  local keys_meta  -- made at the first call: a load runs with no globals\n"
        + "  local function _call_begins(KEYS, ARGV)\n"
        + blessing.replace("\n  ", "\n    ").replace("  local call", "    local call", 1)
        + "    CALL = call\n"
        + "    if keys_meta == nil then keys_meta = strict('keys', {}) end\n"
        + f"    KEY = setmetatable({key_table}, keys_meta)\n"
        + "  end\n"
        + helpers + "\n"
        + f"redis.register_function{{function_name = '{function}', "
        + "callback = function(KEYS, ARGV)\n"
        + "_call_begins(KEYS, ARGV)\n"
        + per_call + "\n"
        + "end}\n"
    )


# --- the runtime's own scripts ------------------------------------------------------


class HandoffKeys(NamedTuple):
    target: str
    """The stream the outputs are added to."""
    source: str
    """The stream whose entries are acked."""


class HandOn(msgspec.Struct, kw_only=True):
    """One source entry to ack, and what to add to the target for it (None: nothing)."""

    entry_id: str
    output: str | None = None


class HandoffCall(msgspec.Struct, kw_only=True):
    group: str
    maxlen: int
    """Approximate max length of the target (0 = unbounded)."""
    entries: list[HandOn]


class AppendKeys(NamedTuple):
    stream: str


class AppendCall(msgspec.Struct, kw_only=True):
    payloads: list[str]


HANDOFF = Script("handoff", HandoffKeys, HandoffCall, lua_source("pipeline", "handoff.lua"))
"""Ack a batch and add each entry's output, atomically and once (see handoff.lua)."""
APPEND = Script("append", AppendKeys, AppendCall, lua_source("pipeline", "append.lua"))
"""Add a batch of payloads to one stream in one call (producers)."""


class ReplayKeys(NamedTuple):
    target: str
    """The stream the dead letter's entry came from."""
    replays: str
    """Hash: ``<stream>/<entry id>`` of each entry replayed -> the id it was replayed as."""


class ReplayCall(msgspec.Struct, kw_only=True):
    source: str
    """``<stream>/<entry id>`` of the entry the dead letter holds."""
    payload: str


REPLAY = Script("replay", ReplayKeys, ReplayCall, lua_source("pipeline", "replay.lua"))
"""Put a dead letter's payload back on its stream and record it, once (see replay.lua)."""
