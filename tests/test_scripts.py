"""Typed script calls on real Redis: fields read by name, and a name that is not a field
fails loudly.

The preamble pipeline.scripts generates from a script's keys and call types gives the
script KEY and CALL; every table of the call raises ``<what> has no field <name>`` for a
name its Struct does not declare, and reads an absent optional field as false. So a row
field renamed on the Python side only fails the first script call that reads it: the
stage scripts are called here with row types whose one field is renamed.
"""

from __future__ import annotations

import functools
import operator
import re
import typing
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pipeline.scripts import Script, lua_preamble
from schemas.keys import Keys
from schemas.messages import DeviceSpec
from schemas.rows import (
    AdmitRow,
    AllocateRow,
    DeadRow,
    ExpireCall,
    ForwardRow,
    RefuseRow,
    ReleaseRow,
)
from stages.scripts import ADMIN, EXPIRE, QUOTA, SELECT


class OneKey(NamedTuple):
    stream: str


class Inner(msgspec.Struct, kw_only=True):
    size: int
    label: str | None = None


class Echo(msgspec.Struct, tag_field="op", tag="echo", kw_only=True):
    text: str
    note: str | None = None


class Shout(msgspec.Struct, tag_field="op", tag="shout", kw_only=True):
    text: str


class Probe(msgspec.Struct, kw_only=True):
    name: str
    inner: Inner | None = None
    items: list[Echo | Shout] = []


def probe(body: str) -> Script[OneKey, Probe]:
    return Script("probe", OneKey, Probe, body)


CALL = Probe(name="n", inner=Inner(size=3), items=[Echo(text="a"), Shout(text="b")])


async def test_fields_keys_and_nested_rows_are_read_by_name(redis: Redis) -> None:
    script = probe("return {KEY.stream, CALL.name, CALL.inner.size, CALL.items[1].op,"
                   " CALL.items[1].text, CALL.items[2].op, CALL.items[2].text}")
    got = await script(redis, OneKey(stream="s"), CALL)
    assert got == [b"s", b"n", 3, b"echo", b"a", b"shout", b"b"]


async def test_an_absent_optional_field_reads_as_false(redis: Redis) -> None:
    script = probe("return {tostring(CALL.items[1].note), tostring(CALL.inner.label),"
                   " tostring(not CALL.inner)}")
    assert await script(redis, OneKey(stream="s"), CALL) == [b"false", b"false", b"false"]
    bare = probe("return tostring(CALL.inner)")
    assert await bare(redis, OneKey(stream="s"), Probe(name="n")) == b"false"


class Defaults(msgspec.Struct, kw_only=True, omit_defaults=True):
    size: int = 7
    label: str = "plain"
    on: bool = True


async def test_a_field_left_out_as_its_default_reads_as_that_default(redis: Redis) -> None:
    script = Script("defaults", OneKey, Defaults,
                    "return {CALL.size, CALL.label, tostring(CALL.on)}")
    assert msgspec.msgpack.encode(Defaults()) == msgspec.msgpack.encode({})  # all left out
    assert await script(redis, OneKey(stream="s"), Defaults()) == [7, b"plain", b"true"]


@pytest.mark.parametrize(("read", "message"), [
    ("CALL.nam", "Probe has no field nam"),
    ("CALL.inner.sise", "Inner has no field sise"),
    ("CALL.items[1].texts", "row echo has no field texts"),
    ("CALL.items[2].note", "row shout has no field note"),  # a field of the other kind
    ("KEY.streams", "keys has no field streams"),
])
async def test_a_name_that_is_not_a_field_raises_naming_it(
    redis: Redis, read: str, message: str
) -> None:
    script = probe(f"return {read}")
    with pytest.raises(ResponseError, match=re.escape(message)):
        await script(redis, OneKey(stream="s"), CALL)


async def test_a_row_of_a_kind_the_script_does_not_know_raises(redis: Redis) -> None:
    script = probe("return 1")
    packed = msgspec.msgpack.encode({"name": "n", "items": [{"op": "whisper", "text": "x"}]})
    await script.load(redis)
    with pytest.raises(ResponseError, match="no kind whisper"):
        await redis.evalsha(script.sha, 1, "s", packed)


class WithBytes(msgspec.Struct):
    payload: bytes


class WithArray(msgspec.Struct, array_like=True):
    size: int


class Untagged(msgspec.Struct):
    items: list[Inner | WithArray]


class Deep(msgspec.Struct):
    by_name: dict[str, Inner]


@pytest.mark.parametrize(("call", "problem"), [
    (WithBytes, "bytes do not reach a script"),
    (WithArray, "not array_like"),
    (Untagged, "must be tagged"),
    (Deep, "not read"),
])
def test_a_call_type_a_script_cannot_read_by_name_is_refused(call: type[Any], problem: str) -> None:
    with pytest.raises(TypeError, match=problem):
        lua_preamble(OneKey, call)


# --- a field renamed in Python only fails the first call ---------------------------------


def renamed(cls: type[msgspec.Struct], old: str, new: str) -> type[msgspec.Struct]:
    """A copy of a Struct with one field renamed (same tag, same types)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(cls):
        name = new if f.name == old else f.name
        if f.required:
            fields.append((name, hints[f.name]))
        else:
            fields.append((name, hints[f.name], f.default))
    config = cls.__struct_config__
    return msgspec.defstruct(cls.__name__, fields, kw_only=True, tag_field=config.tag_field,
                             tag=config.tag, omit_defaults=config.omit_defaults)


def union(types: Iterable[Any]) -> Any:
    return functools.reduce(operator.or_, types)


def call_type_with(call: type[msgspec.Struct], old_row: type[Any], new_row: type[Any]) -> Any:
    """A copy of a call Struct whose rows (or nested record) use ``new_row`` for
    ``old_row``."""
    hints = typing.get_type_hints(call, include_extras=True)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(call):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if typing.get_origin(hint) is list:
            members = typing.get_args(args[0]) or (args[0],)
            hint = list[union(new_row if m is old_row else m for m in members)]
        elif old_row in args:
            hint = union(new_row if m is old_row else m for m in args)
        fields.append((f.name, hint) if f.required else (f.name, hint, f.default))
    return msgspec.defstruct(call.__name__, fields, kw_only=True)


def quota_call(row: msgspec.Struct) -> dict[str, Any]:
    # fail-open admits a user with no quota, so an admit row is read to its end
    return {"prefix": "x", "group": "quota", "now_ms": 1, "idempotency_ttl_s": 60,
            "reply_ttl_s": 60, "fail_open": True, "items": [row]}


def select_call(row: msgspec.Struct) -> dict[str, Any]:
    return {"prefix": "x", "group": "select", "now_ms": 1, "idempotency_ttl_s": 60,
            "reply_ttl_s": 60, "released_ttl_s": 60, "queue_max_per_user": 10,
            "queue_aging_step_ms": 10_000, "items": [row]}


ROW_FIELDS: dict[str, Any] = {
    "admit": (QUOTA, AdmitRow, quota_call, {
        "request_id": "r", "user_id": "u", "reply_to": "x:reply:c", "min_cpu_cores": 0,
        "min_memory_mb": 0, "payload": "{}"}),
    "forward": (QUOTA, ForwardRow, quota_call, {"payload": "{}"}),
    "refuse": (QUOTA, RefuseRow, quota_call, {
        "request_id": "r", "reply_to": "x:reply:c", "reason": "invalid_request", "message": "m"}),
    "dead": (QUOTA, DeadRow, quota_call, {"letter": "{}"}),
    "allocate": (SELECT, AllocateRow, select_call, {
        "request_id": "r", "user_id": "u", "reply_to": "x:reply:c", "min_cpu_cores": 0,
        "min_memory_mb": 0, "duration_seconds": 60, "hold": "0 0 0"}),
    "release": (SELECT, ReleaseRow, select_call, {
        "request_id": "r", "reply_to": "x:reply:c", "allocation_id": "a"}),
}
"""Each row kind: its script, its Struct, its call, and its fields (entry_id apart)."""


@pytest.mark.parametrize(("kind", "field"), [
    ("admit", "request_id"), ("admit", "payload"), ("forward", "payload"),
    ("refuse", "message"), ("dead", "letter"), ("allocate", "request_id"),
    ("allocate", "hold"), ("release", "request_id"), ("release", "allocation_id"),
])
async def test_a_row_field_renamed_in_python_only_fails_the_first_call(
    redis: Redis, keys: Keys, kind: str, field: str
) -> None:
    script, row_type, make_call, values = ROW_FIELDS[kind]
    new_row = renamed(row_type, field, field + "_renamed")
    new_call = call_type_with(script.call, row_type, new_row)
    stale = Script(script.name, script.keys, new_call, script.body)
    values = {(k + "_renamed" if k == field else k): v for k, v in values.items()}
    row = new_row(entry_id="1-0", **values)
    call = new_call(**make_call(row) | {"prefix": keys.prefix})
    script_keys = script.keys(*(getattr(keys, name) for name in script.keys._fields))
    with pytest.raises(ResponseError, match=re.escape(f"row {kind} has no field {field}")):
        await stale(redis, script_keys, call)


@pytest.mark.parametrize(("script", "call_type", "old", "field", "values"), [
    (ADMIN, DeviceSpec, DeviceSpec, "cpu_cores", {"id": "d1", "name": "d1"}),
    (EXPIRE, ExpireCall, None, "limit", {"now_ms": 1, "released_ttl_s": 60}),
])
async def test_a_header_or_record_field_renamed_in_python_only_fails_the_first_call(
    redis: Redis, keys: Keys, script: Script[Any, Any], call_type: type[Any], old: type[Any] | None,
    field: str, values: dict[str, Any],
) -> None:
    new_type = renamed(call_type, field, field + "_renamed")
    what = call_type.__name__
    if old is not None:  # a record inside the call
        new_call_type = call_type_with(script.call, old, new_type)
        call = new_call_type(prefix=keys.prefix, now_ms=1, device=new_type(**values))
    else:
        new_call_type = new_type
        call = new_type(prefix=keys.prefix, **{field + "_renamed": 10}, **values)
    stale = Script(script.name, script.keys, new_call_type, script.body)
    with pytest.raises(ResponseError, match=re.escape(f"{what} has no field {field}")):
        await stale(redis, script.keys(*(getattr(keys, n) for n in script.keys._fields)), call)



async def _has_functions(redis: Redis) -> bool:
    info = await redis.info("server")
    return int(str(info["redis_version"]).split(".")[0]) >= 7


async def test_a_script_is_a_function_on_redis_7_and_evalsha_on_older(redis: Redis) -> None:
    """How we know which path ran: ``functions`` is learned from the server's answer, and
    on Redis 7 the library is listed by FUNCTION LIST under the script's function name."""
    script = probe("-- a helper above the marker, run once at load\n"
                   "local function twice(n) return n * 2 end\n"
                   "-- @per-call\nreturn {CALL.name, twice(CALL.inner.size)}")
    assert await script(redis, OneKey(stream="s"), CALL) == [b"n", 6]
    functions = await _has_functions(redis)
    assert script.functions is functions
    if functions:
        listed = await redis.execute_command("FUNCTION", "LIST", "LIBRARYNAME", script.function)
        assert listed, "the library was loaded"
    # the EVALSHA path answers the same on any server (what Redis 6.2 runs)
    script.functions = False
    assert await script(redis, OneKey(stream="s"), CALL) == [b"n", 6]


async def test_a_lost_function_is_loaded_again(redis: Redis) -> None:
    if not await _has_functions(redis):
        pytest.skip("Redis before 7 has no Functions")
    script = probe("return CALL.name")
    assert await script(redis, OneKey(stream="s"), CALL) == b"n"
    await redis.execute_command("FUNCTION", "DELETE", script.function)  # a server that lost it
    assert await script(redis, OneKey(stream="s"), CALL) == b"n"
    assert script.functions is True


async def test_state_above_the_marker_is_the_library_s_and_outlives_a_call(
        redis: Redis) -> None:
    """Why the helpers' per-call state is reset below the marker (begin_call): under
    Functions a table above it is made once, at load, and kept between calls."""
    script = probe("local seen = {}\n-- @per-call\n"
                   "seen[#seen + 1] = CALL.name\nreturn #seen")
    first = await script(redis, OneKey(stream="s"), CALL)
    second = await script(redis, OneKey(stream="s"), CALL)
    assert (first, second) == ((1, 2) if script.functions else (1, 1))


async def test_the_stage_scripts_load_as_functions_and_reset_their_call_state(
        redis: Redis) -> None:
    """Every stage script loads (as a library on Redis 7: nothing above the marker may
    call a global there), and begin_call (call.lua) sits right below its one marker;
    quota's source has none of allocations.lua (its calls do not make those helpers)."""
    from stages.scripts import ALL

    for script in ALL:
        await script.load(redis)
        assert script.functions is await _has_functions(redis)
    for script in (SELECT, QUOTA):
        assert script.body.count("\n-- @per-call\nbegin_call()\n") == 1
    assert "local function give_device" in SELECT.body
    assert "local function give_device" not in QUOTA.body
