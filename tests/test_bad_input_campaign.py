"""Bad input at scale: a hypothesis campaign of malformed entries on the requests stream.

At least ``CAMPAIGN_ENTRIES`` generated entries, in batches (one hypothesis example
each), are XADDed to the requests stream of a running request path (quota and
select, real Redis): wrong types, missing and unknown fields, huge and negative
numbers, invalid UTF-8, oversized payloads, foreign ``reply_to`` keys (the pipeline's
own streams and state keys, another prefix, names too long), entries whose fields
are other than ``d``, values nested thousands deep, JSON that is no object.

Each entry must get exactly one outcome at its FIRST delivery: one ``invalid_request``
reply on its own reply stream (every entry that names one of ours names a stream of
its own, so replies are counted per entry), or one dead letter for its entry id whose
error starts ``invalid_request:`` with ``deliveries == 1``. Entries that name a reply
stream of ours where quota can read it (also inside JSON nested thousands deep, or
beside invalid UTF-8 in a field it skips) must get the reply. Nothing else is written:
the keys outside the reply namespace and the dead stream are the same before and
after (values compared for every non-stream key; the admitted stream gets nothing;
the changes stream only the ``rejected`` record of each reply), no foreign key is
created, no error was recorded for a retry. No worker dies, nothing stays pending,
and a valid request after the campaign is allocated. The figures are printed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from redis.asyncio import Redis

from pipeline.clock import ManualClock
from pipeline.connections import redis_client, text
from pipeline.embedded import ServerUrls
from schemas.keys import GROUP_QUOTA, GROUP_SELECT, Keys
from schemas.messages import Allocated, DeviceSpec, Failed, QuotaSpec, reply_decoder
from schemas.runtime import dead_decoder
from stages.app import serve
from stages.settings import Settings
from stages.state import mark_state
from stages.tools.admin import add_devices, delete_keys, set_quotas
from stages.tools.client import Client
from tests.conftest import EVENT_TIMEOUT_S, wait_until

CAMPAIGN_ENTRIES = 2_000
"""Entries the campaign sends at least."""
BATCH = 100
"""Entries per hypothesis example (sent together, checked together)."""
EXAMPLES = CAMPAIGN_ENTRIES // BATCH
REPLY = b"@REPLY@"
"""Stands for the entry's own reply stream in a generated payload."""

ALLOCATE_FIELDS = ("type", "request_id", "user_id", "reply_to", "tenant_id", "duration_minutes",
                   "duration_seconds", "min_cpu_cores", "min_memory_mb", "pool", "model",
                   "priority")
NUMBERS = ("duration_minutes", "duration_seconds", "min_cpu_cores", "min_memory_mb", "priority")


class Case:
    """One generated entry: its fields (``REPLY`` where its reply stream goes), its kind,
    and whether it must be answered (it names a reply stream of ours where quota can read
    it: "reply") or dead-lettered ("dead")."""

    def __init__(self, kind: str, fields: dict[str, bytes], answer: str) -> None:
        self.kind = kind
        self.fields = fields
        self.answer = answer  # "reply" or "dead"

    def __repr__(self) -> str:  # payloads cut short: a failure report stays readable
        cut = {k: v[:160] + (b"..." if len(v) > 160 else b"") for k, v in self.fields.items()}
        return f"Case({self.kind!r}, {cut!r}, {self.answer!r})"


def base_request(kind: str, reply: object) -> dict[str, object]:
    if kind == "release":
        return {"type": "release", "request_id": "r-1", "allocation_id": "a-1", "reply_to": reply}
    return {"type": "allocate", "request_id": "r-1", "user_id": "u1", "reply_to": reply,
            "duration_minutes": 5}


def encode(request: dict[str, object]) -> bytes:
    """JSON of a request; a ``@REPLY@`` reply_to stays a placeholder."""
    return json.dumps(request).encode()


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
wrong_values = st.one_of(scalars, st.lists(scalars, max_size=3),
                         st.dictionaries(st.text(max_size=5), scalars, max_size=3))
huge_or_negative = st.sampled_from([-1, -(2**31), 2**31, 2**53 + 1, 2**63, 2**64, 10**30,
                                    -(10**30), 1e308, -1e308, 0.5, 525_601, 31_536_001, 4097])
invalid_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82",
                                b"\xf8\x88\x80\x80\x80", b"\x80abc"])
request_kinds = st.sampled_from(["allocate", "allocate", "release"])


def would_be_valid(request: dict[str, object]) -> bool:
    """A request quota would take as valid (so not malformed): what the campaign avoids."""
    from schemas.messages import AllocateRequest, ReleaseRequest, request_decoder

    payload = encode({**request, "reply_to": "x:reply:c"} if request.get("reply_to") == "@REPLY@"
                     else request)
    try:
        got = request_decoder.decode(payload)
    except Exception:  # noqa: BLE001 - any decode failure: malformed, as wanted
        return False
    if isinstance(got, ReleaseRequest):
        return bool(got.allocation_id or got.device_id)
    return isinstance(got, AllocateRequest)


@st.composite
def field_cases(draw: st.DrawFn) -> Case:
    """A JSON object request with one thing wrong; its reply_to ours or not."""
    kind = draw(request_kinds)
    mode = draw(st.sampled_from(["ours", "ours", "ours", "absent", "wrong_type"]))
    request = base_request(kind, "@REPLY@")
    if mode == "absent":
        del request["reply_to"]
    elif mode == "wrong_type":
        request["reply_to"] = draw(wrong_values.filter(lambda v: not isinstance(v, str)))
    fault = draw(st.sampled_from(["wrong_type", "missing", "unknown", "number"]))
    if fault == "wrong_type":
        name = draw(st.sampled_from([f for f in request if f != "reply_to"]))
        request[name] = draw(wrong_values)
    elif fault == "missing":
        name = draw(st.sampled_from([f for f in request if f != "reply_to"]))
        del request[name]
    elif fault == "unknown":
        name = draw(st.text(min_size=1, max_size=10).filter(lambda n: n not in ALLOCATE_FIELDS))
        request[name] = draw(wrong_values)
    else:
        request[draw(st.sampled_from(NUMBERS))] = draw(huge_or_negative)
    if would_be_valid(request):
        request["type"] = "borrow"  # never a valid request: the campaign is of bad input
    answer = "reply" if mode == "ours" else "dead"
    return Case(f"{fault}/{mode}", {"d": encode(request)}, answer)


@st.composite
def raw_cases(draw: st.DrawFn, max_bytes: int) -> Case:
    """Entries broken below the level of fields: bytes, size, nesting, entry fields."""
    fault = draw(st.sampled_from(["utf8", "oversized", "deep", "not_object", "other_fields",
                                  "foreign_reply_to"]))
    if fault == "utf8":
        bad = draw(invalid_utf8)
        where = draw(st.sampled_from(["user_id", "model", "whole"]))
        if where == "whole":
            return Case("utf8/whole", {"d": bad + b'{"type":"allocate"}'}, "dead")
        text_ = encode(base_request("allocate", "@REPLY@")).replace(
            b'"u1"' if where == "user_id" else b'"duration_minutes": 5',
            b'"u' + bad + b'"' if where == "user_id" else b'"model": "m' + bad + b'"')
        # in user_id the envelope does not decode (dead letter); in model, a field the
        # envelope skips unread, it does (the reply)
        return Case(f"utf8/{where}", {"d": text_}, "dead" if where == "user_id" else "reply")
    if fault == "oversized":
        extra = draw(st.integers(1, 5_000))
        request = {**base_request("allocate", "@REPLY@"), "model": "x" * (max_bytes + extra)}
        return Case("oversized", {"d": encode(request)}, "reply")
    if fault == "deep":
        depth = draw(st.integers(2_000, 6_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        value = opener * depth + b"1" + closer * depth
        where = draw(st.sampled_from(["model", "colour", "user_id"]))
        text_ = encode(base_request("allocate", "@REPLY@"))[:-1] + b', "' + where.encode() \
            + b'": ' + value + b"}"
        return Case(f"deep/{where}", {"d": text_}, "reply")  # its reply_to read from the text
    if fault == "not_object":
        payload = draw(st.sampled_from([b"[]", b"[1, 2]", b'"allocate"', b"42", b"null", b"true",
                                        b"", b"{", b'{"type": "allocate", "request_id": ',
                                        b"\x00\x01\x02", b"{}"]))
        return Case("not_object", {"d": payload}, "dead")
    if fault == "other_fields":
        name = draw(st.text(min_size=1, max_size=8).filter(lambda n: n != "d"))
        value = draw(st.binary(max_size=30))
        valid = encode(base_request("allocate", "@REPLY@"))
        fields = draw(st.sampled_from([{name: value}, {name: valid}, {"D": valid}, {"d ": valid}]))
        return Case("other_fields", {k: v for k, v in fields.items()}, "dead")
    return Case("foreign_reply_to", {"d": b"@FOREIGN@"}, "dead")  # filled in when sent


def foreign_targets(keys: Keys) -> list[str]:
    """reply_to values that are not a reply stream of ours."""
    return [keys.requests, keys.admitted, keys.changes, keys.dead, keys.ticks, keys.stats,
            keys.state, keys.user("u1"), keys.device("d1"), keys.expiry, "",
            f"other{keys.prefix}:reply:x", f"{keys.prefix}:replyx", f"{keys.prefix}:reply:" + "z" * 300]


async def snapshot(redis: Redis, keys: Keys) -> dict[str, Any]:
    """Every key of the prefix: a non-stream key with its value, a stream as its name."""
    out: dict[str, Any] = {}
    async for raw in redis.scan_iter(match=f"{keys.prefix}:*", count=1000):
        name = text(raw)
        kind = text(await redis.type(name))
        if kind == "stream":
            out[name] = "stream"
        elif kind == "hash":
            out[name] = await redis.hgetall(name)
        elif kind == "zset":
            out[name] = await redis.zrange(name, 0, -1, withscores=True)
        elif kind == "set":
            out[name] = sorted(await redis.smembers(name))
        else:
            out[name] = await redis.get(name)
    return out


def test_a_campaign_of_malformed_entries_each_gets_one_answer_at_first_delivery(
    servers: ServerUrls,
) -> None:
    base = Settings.from_env().with_urls(servers.redis_url, servers.database_url)
    settings = replace(base, prefix=f"bad{int(time.time() * 1000) % 10**9}", block_ms=50,
                       claim_idle_ms=300, claim_every_ms=100, batch_size=64)
    keys, clock, stop = Keys(settings.prefix), ManualClock(), asyncio.Event()
    foreign = foreign_targets(keys)
    counts: Counter[str] = Counter()
    outcome: Counter[str] = Counter()
    sent = [0]

    with asyncio.Runner() as runner:
        redis = redis_client(settings)

        async def start() -> asyncio.Task[None]:
            await mark_state(redis, keys, by="test", now_ms=clock.now_ms())
            await add_devices(redis, keys, clock, [DeviceSpec(id="d1"), DeviceSpec(id="d2")])
            await set_quotas(redis, keys, clock, [QuotaSpec(user_id="u1")])
            task = asyncio.create_task(serve(["quota", "select"], settings, clock, stop=stop,
                                             install_signals=False))
            async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:  # workers up
                first = await client.allocate("u1", request_id="warm-up")
            assert isinstance(first, Allocated)
            return task

        task = runner.run(start())
        before = runner.run(snapshot(redis, keys))
        changes_before = runner.run(redis.xlen(keys.changes))
        admitted_before = runner.run(redis.xlen(keys.admitted))
        started = time.perf_counter()

        async def send_and_check(cases: list[Case]) -> None:
            pipe = redis.pipeline(transaction=False)
            sent_as: list[tuple[Case, str, int]] = []
            for case in cases:
                n = sent[0] = sent[0] + 1
                stream = keys.reply(f"c{n}")
                fields = {k: v.replace(REPLY, stream.encode()) for k, v in case.fields.items()}
                if fields.get("d") == b"@FOREIGN@":
                    target = foreign[n % len(foreign)]
                    fields["d"] = orjson.dumps({**base_request("allocate", target),
                                                "request_id": f"f{n}"})
                pipe.xadd(keys.requests, fields)  # type: ignore[arg-type]
                sent_as.append((case, stream, n))
            ids = [text(i) for i in await pipe.execute()]

            async def all_answered() -> bool:
                groups = {text(g["name"]): g for g in await redis.xinfo_groups(keys.requests)}
                g = groups[GROUP_QUOTA]
                return int(g["pending"]) == 0 and text(g["last-delivered-id"]) == ids[-1]

            await wait_until(all_answered)
            letters = {}
            for _id, f in await redis.xrange(keys.dead):
                letter = dead_decoder.decode(f[b"d"])
                letters[letter.entry_id] = letter
            for (case, stream, _n), entry_id in zip(sent_as, ids):
                got = [reply_decoder.decode(f[b"d"]) for _i, f in await redis.xrange(stream)]
                letter = letters.get(entry_id)
                assert len(got) + (letter is not None) == 1, (case, got, letter)
                counts[case.kind.split("/")[0]] += 1
                if got:
                    reply = got[0]
                    assert isinstance(reply, Failed) and reply.reason == "invalid_request", case
                    assert case.answer == "reply", (case, reply)
                    outcome["reply"] += 1
                else:
                    assert letter is not None
                    assert case.answer == "dead", (case, letter)
                    assert letter.error.startswith("invalid_request: "), letter
                    assert letter.deliveries == 1 and letter.stage == GROUP_QUOTA, letter
                    outcome["dead_letter"] += 1
            assert not task.done(), "a worker stopped"

        # no shrinking: each example is a batch through a live pipeline, and a failure's
        # message names the entry that failed
        @hsettings(max_examples=EXAMPLES, deadline=None, database=None,
                   phases=[Phase.explicit, Phase.generate],
                   suppress_health_check=list(HealthCheck))
        @given(cases=st.lists(st.one_of(field_cases(), raw_cases(settings.max_message_bytes)),
                              min_size=BATCH, max_size=BATCH))
        def campaign(cases: list[Case]) -> None:
            runner.run(send_and_check(cases))

        try:
            campaign()
            seconds = time.perf_counter() - started
            assert sent[0] >= CAMPAIGN_ENTRIES

            after = runner.run(snapshot(redis, keys))
            new = set(after) - set(before)
            assert all(n.startswith(f"{keys.prefix}:reply:") or n == keys.dead for n in new), \
                sorted(n for n in new if not n.startswith(f"{keys.prefix}:reply:"))[:5]
            assert {k: v for k, v in after.items() if k in before} == before  # nothing changed
            untouched = [t for t in foreign if t and t not in before and t != keys.dead]
            assert not runner.run(redis.exists(*untouched))  # no foreign key was made
            assert runner.run(redis.xlen(keys.admitted)) == admitted_before  # nothing admitted
            added = runner.run(redis.xrange(keys.changes, min="-"))[changes_before:]
            assert [orjson.loads(f[b"d"])["kind"] for _i, f in added] == \
                ["rejected"] * outcome["reply"]
            assert not runner.run(redis.exists(keys.errors(GROUP_QUOTA)))  # no retried failure
            assert runner.run(redis.xpending(keys.admitted, GROUP_SELECT))["pending"] == 0

            async def valid_after() -> object:
                async with Client(settings, timeout_s=EVENT_TIMEOUT_S) as client:
                    return await client.allocate("u1", request_id="after-campaign")

            assert isinstance(runner.run(valid_after()), Allocated)
            print(f"\nbad-input campaign: {sent[0]} entries in {seconds:.1f} s "
                  f"({sent[0] / seconds:.0f}/s incl. checks): {outcome['reply']} invalid_request "
                  f"replies, {outcome['dead_letter']} dead letters, 0 lost, 0 doubled, "
                  f"0 redelivered; by kind: {dict(sorted(counts.items()))}")
        finally:
            stop.set()
            runner.run(asyncio.wait_for(task, EVENT_TIMEOUT_S))
            runner.run(delete_keys(redis, settings.prefix))
            runner.run(redis.aclose())
