"""Traces of a device farm's demand: read, write, generate, record (``devsched trace``).

A trace (docs/trace-format.md, records in :mod:`schemas.trace`) is JSON lines: a header,
the devices, then requests, releases, device events and reservations in time order.

``generate`` makes a synthetic one from a seed alone (:class:`GenerateOptions`): arrivals
follow a diurnal rate (quiet nights, busier weekdays) by thinning a Poisson process,
session lengths are lognormal per user (heavy tailed), a few heavy users send most
requests, devices are of mixed sizes and models with a rare model some users ask for by
name, a few flaky devices fail often (and come back), and some users book reservations.
The same options and seed give a byte-identical file (one ``random.Random`` drawn in a
fixed order, records sorted with a stable key, JSON written field by field).

``record`` reads what a running system kept in PostgreSQL: every device, each allocation
as a request at its allocation time (or at the time it joined the wait queue, from
``waiting_requests``) with the size and model it asked for (the allocation's metadata;
without it the size of the device it got) and the length asked, its release at the time
its user released it (none when it expired), a device event for an allocation a device
failure ended (failed then, recovered before its next allocation), the requests that
waited in the queue and timed out, and the reservations (the ``reservations`` table): each
booked at its ``created_at`` for its interval, of its device's size (the specs asked are
not kept: the size of the device booked, which the booking's best fit chose, stands for
them), ``showed_up`` unless it ended ``no_show``, ``cancelled_at_ms`` when its user
cancelled it, ``released_at_ms`` when its allocation was released before the end; the
allocations reservations became are not requests. Refused requests (allocate or reserve)
leave no row in PostgreSQL (a refusal is a RequestRejected change that only notify reads,
for the web notification and the outbound events) and are not in a recorded trace.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from schemas.trace import (
    TimedRecord,
    TraceDevice,
    TraceDeviceEvent,
    TraceHeader,
    TraceRecord,
    TraceRelease,
    TraceRequest,
    TraceReservation,
    trace_decoder,
    trace_encoder,
)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


class TraceError(ValueError):
    """A trace file that does not follow the format (the line is named)."""


@dataclass
class Trace:
    header: TraceHeader
    devices: list[TraceDevice]
    records: list[TimedRecord]
    """In time order."""


def write_trace(path: str | Path, trace: Trace) -> None:
    """Write ``trace`` as JSON lines (header, devices, timed records)."""
    lines: list[bytes] = [trace_encoder.encode(trace.header)]
    lines += [trace_encoder.encode(d) for d in trace.devices]
    lines += [trace_encoder.encode(r) for r in trace.records]
    Path(path).write_bytes(b"\n".join(lines) + b"\n")


def parse_trace(lines: Iterable[bytes]) -> Trace:
    """A trace from its lines; :class:`TraceError` naming the first bad line."""
    header: TraceHeader | None = None
    devices: list[TraceDevice] = []
    records: list[TimedRecord] = []
    last = -1
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec: TraceRecord = trace_decoder.decode(line)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise TraceError(f"line {n}: {exc}") from exc
        if isinstance(rec, TraceHeader):
            if header is not None:
                raise TraceError(f"line {n}: a second header")
            header = rec
            continue
        if header is None:
            raise TraceError(f"line {n}: the first record must be the header")
        if isinstance(rec, TraceDevice):
            if records:
                raise TraceError(f"line {n}: devices come before the timed records")
            devices.append(rec)
            continue
        if rec.at_ms < last:
            raise TraceError(f"line {n}: at_ms {rec.at_ms} before the previous record's {last}")
        last = rec.at_ms
        records.append(rec)
    if header is None:
        raise TraceError("empty trace: no header")
    if not devices:
        raise TraceError("a trace needs at least one device")
    return Trace(header, devices, records)


def read_trace(path: str | Path) -> Trace:
    with open(path, "rb") as f:
        return parse_trace(f)


def _sorted(records: list[TimedRecord]) -> list[TimedRecord]:
    """Time order; ties keep the order they were made in (a stable sort)."""
    return sorted(records, key=lambda r: r.at_ms)


# --- generate -------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateOptions:
    days: float = 7.0
    seed: int = 1
    hosts: int = 10
    devices_per_host: int = 4
    users: int = 40
    heavy_users: int = 4
    load: float = 1.0
    """Scales the arrival rate (1.0: the busiest hours offer about the farm's capacity)."""
    start_ms: int = 1_767_225_600_000
    """Midnight UTC, a Thursday (2026-01-01)."""


SIZES = ((2, 0.5), (4, 0.3), (8, 0.2))
"""Device CPU cores and their share; memory is 2 GB per core."""
MODELS = (("pixel", 0.45), ("galaxy", 0.4), ("tablet", 0.15))
"""Device models and their share: ``tablet`` is the rare one some users need."""


RESERVATIONS_PER_DAY = 6
NO_SHOW_SHARE = 0.15
"""Of the generated reservations: never claimed (they end ``no_show``) ..."""
CANCEL_SHARE = 0.1
"""... cancelled before their start ..."""
EARLY_RELEASE_SHARE = 0.3
"""... and released before their end; the others run to their end."""


def _choice(rng: random.Random, weighted: tuple[tuple[Any, float], ...]) -> Any:
    x, acc = rng.random(), 0.0
    for value, weight in weighted:
        acc += weight
        if x < acc:
            return value
    return weighted[-1][0]


def diurnal(t_ms: int, start_ms: int) -> float:
    """The arrival rate's shape at ``t_ms``, 0..1: low at night, highest mid afternoon,
    weekends at 40%."""
    hour = ((t_ms - start_ms) % DAY_MS) / HOUR_MS
    day = ((t_ms - start_ms) // DAY_MS + 3) % 7  # day 0 is a Thursday: 5, 6 are the weekend
    shape = 0.1 + 0.9 * max(0.0, math.sin(math.pi * (hour - 7) / 13)) if 7 <= hour <= 20 else 0.1
    return shape * (0.4 if day >= 5 else 1.0)


@dataclass
class _User:
    id: str
    weight: float
    cpu: int
    model: str | None
    median_s: float
    waits: int | None


def _users(rng: random.Random, o: GenerateOptions) -> list[_User]:
    users = []
    for i in range(o.users):
        heavy = i < o.heavy_users
        cpu = _choice(rng, ((2, 0.65), (4, 0.25), (8, 0.1)))
        model = _choice(rng, ((None, 0.8), ("tablet", 0.1), ("pixel", 0.05), ("galaxy", 0.05)))
        users.append(_User(
            id=f"user-{i:03d}", weight=6.0 if heavy else rng.uniform(0.5, 1.5), cpu=cpu,
            model=model, median_s=rng.uniform(900, 3600) * (1.5 if heavy else 1.0),
            waits=rng.choice((300, 600, 1800)) if rng.random() < 0.5 else None))
    return users


def generate(o: GenerateOptions) -> Trace:
    """A synthetic trace from ``o`` alone (see the module docstring)."""
    rng = random.Random(o.seed)
    start, end = o.start_ms, o.start_ms + int(o.days * DAY_MS)
    devices: list[TraceDevice] = []
    for h in range(o.hosts):
        for k in range(o.devices_per_host):
            cpu = _choice(rng, SIZES)
            devices.append(TraceDevice(id=f"dev-{h:02d}-{k}", host=f"host-{h:02d}",
                                       model=_choice(rng, MODELS), cpu_cores=cpu,
                                       memory_mb=cpu * 2048))
    users = _users(rng, o)
    total_weight = sum(u.weight for u in users)
    cum = []
    acc = 0.0
    for u in users:
        acc += u.weight / total_weight
        cum.append(acc)
    # the busiest hour offers about the farm's capacity: arrivals x mean length = devices
    mean_len = sum(u.weight * u.median_s * math.exp(0.5) for u in users) / total_weight
    peak_per_ms = o.load * len(devices) / (mean_len * 1000)
    records: list[TimedRecord] = []
    t, n = float(start), 0
    while True:
        t += rng.expovariate(peak_per_ms)
        if t >= end:
            break
        if rng.random() > diurnal(int(t), start):
            continue  # thinned: the rate is lower now
        x = rng.random()
        user = users[next(i for i, c in enumerate(cum) if x < c or i == len(cum) - 1)]
        hold_s = min(12 * 3600, max(60, int(rng.lognormvariate(math.log(user.median_s), 1.0))))
        asked = math.ceil(hold_s * rng.uniform(1.1, 2.0) / 60) * 60
        if rng.random() < 0.05:
            asked = max(60, math.ceil(hold_s * 0.7 / 60) * 60)  # it expires before release
        at = int(t)
        rid = f"r{n:06d}"
        n += 1
        records.append(TraceRequest(at_ms=at, request_id=rid, user_id=user.id,
                                    min_cpu_cores=user.cpu, min_memory_mb=user.cpu * 1024,
                                    model=user.model, duration_seconds=asked,
                                    wait_seconds=user.waits))
        records.append(TraceRelease(at_ms=at + hold_s * 1000, request_id=rid))
    flaky = set(rng.sample(range(len(devices)), max(1, len(devices) // 10)))
    for i, d in enumerate(devices):
        mtbf_h = 8.0 if i in flaky else 24.0 * 14
        t = float(start)
        while True:
            t += rng.expovariate(1.0 / (mtbf_h * HOUR_MS))
            if t >= end:
                break
            down = max(60_000, int(rng.lognormvariate(math.log(20 * 60_000), 0.7)))
            records.append(TraceDeviceEvent(at_ms=int(t), device_id=d.id, event="failed"))
            if t + down < end:
                records.append(TraceDeviceEvent(at_ms=int(t) + down, device_id=d.id,
                                                event="recovered"))
            t += down
    for k in range(int(o.days * RESERVATIONS_PER_DAY)):
        user = rng.choice(users)
        at = start + int(rng.random() * (end - start))
        begin = at + int(rng.uniform(1, 24) * HOUR_MS)
        length = int(rng.uniform(1, 3) * HOUR_MS)
        fate = rng.random()
        early = rng.uniform(0.3, 0.9)
        records.append(TraceReservation(
            at_ms=at, reservation_id=f"b{k:04d}", user_id=user.id, start_ms=begin,
            end_ms=begin + length, min_cpu_cores=user.cpu,
            min_memory_mb=user.cpu * 1024, model=user.model,
            showed_up=fate >= NO_SHOW_SHARE,
            cancelled_at_ms=(at + int((begin - at) * early)
                             if NO_SHOW_SHARE <= fate < NO_SHOW_SHARE + CANCEL_SHARE
                             else None),
            released_at_ms=(begin + int(length * early)
                            if fate >= 1 - EARLY_RELEASE_SHARE else None)))
    header = TraceHeader(source="generated", start_ms=start, end_ms=end, seed=o.seed,
                         description=f"devsched trace generate: {o.days:g} days, "
                                     f"{len(devices)} devices, {o.users} users, load {o.load:g}")
    return Trace(header, devices, [r for r in _sorted(records) if r.at_ms < end])


# --- record ---------------------------------------------------------------------------


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


ALLOCATIONS_SQL = """
SELECT a.id, a.device_id, a.user_id, a.allocated_at, a.released_at, a.expires_at,
       a.end_reason, a.metadata, w.queued_at, w.request AS waited
FROM device_allocations a
LEFT JOIN waiting_requests w
  ON w.user_id = a.user_id AND w.request_id = a.metadata->>'request_id'
WHERE a.allocated_at >= $1 AND a.allocated_at < $2
  AND NOT EXISTS (SELECT 1 FROM reservations r WHERE r.allocation_id = a.id)
ORDER BY a.allocated_at, a.id
"""
RESERVATIONS_SQL = """
SELECT r.id, r.user_id, r.device_id, r.pool, r.start_at, r.end_at, r.status, r.reason,
       r.created_at, r.ended_at, a.released_at, a.end_reason
FROM reservations r LEFT JOIN device_allocations a ON a.id = r.allocation_id
WHERE r.created_at >= $1 AND r.created_at < $2
ORDER BY r.created_at, r.id
"""
TIMED_OUT_SQL = """
SELECT user_id, request_id, queued_at, request FROM waiting_requests
WHERE status = 'left' AND reason = 'timed_out' AND queued_at >= $1 AND queued_at < $2
ORDER BY queued_at, user_id, request_id
"""
DEVICE_ENDS = ("device_failed", "device_error", "device_stopped", "device_maintenance")
"""End reasons that mean the device went down."""


def _loads(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        loaded: dict[str, Any] = msgspec.json.decode(value)
        return loaded
    return dict(value)


async def record(pg: asyncpg.Pool, *, since_ms: int | None = None,
                 until_ms: int | None = None) -> Trace:
    """The trace of what PostgreSQL holds between ``since_ms`` and ``until_ms`` (default:
    from the first allocation to the last event it knows)."""
    from stages.jobs import ts

    async with pg.acquire() as conn:
        devs = await conn.fetch("SELECT id, host, pool, model, cpu_cores, memory_mb,"
                                " storage_mb FROM devices ORDER BY id")
        bounds = await conn.fetchrow(
            "SELECT least(min(a.lo), min(r.lo)) AS lo, greatest(max(a.hi), max(r.hi)) AS hi"
            " FROM (SELECT min(allocated_at) AS lo,"
            "       max(greatest(allocated_at, released_at)) AS hi FROM device_allocations) a,"
            " (SELECT min(created_at) AS lo, max(greatest(created_at, ended_at)) AS hi"
            "  FROM reservations) r")
        lo = since_ms if since_ms is not None else (
            _ms(bounds["lo"]) if bounds and bounds["lo"] else 0)
        hi = until_ms if until_ms is not None else (
            _ms(bounds["hi"]) + 1 if bounds and bounds["hi"] else lo + 1)
        rows = await conn.fetch(ALLOCATIONS_SQL, ts(lo), ts(hi))
        timed_out = await conn.fetch(TIMED_OUT_SQL, ts(lo), ts(hi))
        booked = await conn.fetch(RESERVATIONS_SQL, ts(lo), ts(hi))
    devices = [TraceDevice(id=r["id"], host=r["host"], pool=r["pool"], model=r["model"],
                           cpu_cores=r["cpu_cores"], memory_mb=r["memory_mb"],
                           storage_mb=r["storage_mb"]) for r in devs]
    sizes = {d.id: d for d in devices}
    records: list[TimedRecord] = []
    downs: list[tuple[int, str]] = []
    starts: dict[str, list[int]] = {}
    for r in rows:
        meta = _loads(r["metadata"])
        waited = _loads(r["waited"])
        got = sizes.get(r["device_id"])
        allocated = _ms(r["allocated_at"])
        starts.setdefault(r["device_id"], []).append(allocated)
        arrival = _ms(r["queued_at"]) if r["queued_at"] is not None else allocated
        rid = str(meta.get("request_id") or r["id"])
        asked = (_ms(r["expires_at"]) - allocated) // 1000 if r["expires_at"] else 3600
        records.append(TraceRequest(
            at_ms=arrival, request_id=rid, user_id=r["user_id"],
            min_cpu_cores=int(meta.get("min_cpu_cores", got.cpu_cores if got else 0)),
            min_memory_mb=int(meta.get("min_memory_mb", got.memory_mb if got else 0)),
            model=meta.get("requested_model") or waited.get("model"),
            pool=waited.get("pool"), duration_seconds=max(1, asked),
            wait_seconds=waited.get("wait_seconds"), priority=waited.get("priority") or None))
        if r["released_at"] is None:
            continue
        released = _ms(r["released_at"])
        if r["end_reason"] in DEVICE_ENDS:
            downs.append((released, r["device_id"]))
        elif r["end_reason"] != "expired":
            # the user kept it this long once served
            records.append(TraceRelease(at_ms=arrival + (released - allocated),
                                        request_id=rid))
    for at, device in downs:
        records.append(TraceDeviceEvent(at_ms=at, device_id=device, event="failed"))
        later = [s for s in starts.get(device, []) if s > at]
        records.append(TraceDeviceEvent(at_ms=min(later) - 1 if later else hi - 1,
                                        device_id=device, event="recovered"))
    for w in timed_out:
        req = _loads(w["request"])
        records.append(TraceRequest(
            at_ms=_ms(w["queued_at"]), request_id=w["request_id"], user_id=w["user_id"],
            min_cpu_cores=int(req.get("min_cpu_cores") or 0),
            min_memory_mb=int(req.get("min_memory_mb") or 0), model=req.get("model"),
            pool=req.get("pool"), duration_seconds=max(1, int(req.get("duration_seconds") or 60)),
            wait_seconds=req.get("wait_seconds"), priority=req.get("priority") or None))
    for b in booked:
        got = sizes.get(b["device_id"])
        end_at = _ms(b["end_at"])
        let_go = _ms(b["released_at"]) if b["released_at"] is not None else None
        records.append(TraceReservation(
            at_ms=_ms(b["created_at"]), reservation_id=str(b["id"]), user_id=b["user_id"],
            start_ms=_ms(b["start_at"]), end_ms=end_at,
            min_cpu_cores=got.cpu_cores if got else 0,
            min_memory_mb=got.memory_mb if got else 0, pool=b["pool"],
            showed_up=b["status"] != "no_show",
            cancelled_at_ms=(_ms(b["ended_at"]) if b["status"] == "cancelled"
                             and b["reason"] == "cancelled" and b["ended_at"] is not None
                             else None),
            released_at_ms=(let_go if let_go is not None and let_go < end_at
                            and b["end_reason"] == "released" else None)))
    records = [r for r in _sorted(records) if lo <= r.at_ms < hi]
    header = TraceHeader(source="recorded", start_ms=lo, end_ms=hi,
                         description=f"devsched trace record: {len(rows)} allocations, "
                                     f"{len(timed_out)} timed-out waits, "
                                     f"{len(booked)} reservations")
    return Trace(header, devices, records)


def summary(trace: Trace) -> dict[str, Any]:
    """What the trace holds (the ``trace`` object of ``devsched simulate --json``)."""
    kinds: dict[str, int] = {}
    for r in trace.records:
        kind = type(r).__struct_config__.tag
        kinds[str(kind)] = kinds.get(str(kind), 0) + 1
    return {"source": trace.header.source, "seed": trace.header.seed,
            "start_ms": trace.header.start_ms, "end_ms": trace.header.end_ms,
            "hours": round((trace.header.end_ms - trace.header.start_ms) / HOUR_MS, 2),
            "devices": len(trace.devices),
            "hosts": len({d.host for d in trace.devices}),
            "users": len({r.user_id for r in trace.records if isinstance(r, TraceRequest)}),
            "records": kinds}


def iter_lines(trace: Trace) -> Iterator[bytes]:
    yield trace_encoder.encode(trace.header)
    for d in trace.devices:
        yield trace_encoder.encode(d)
    for r in trace.records:
        yield trace_encoder.encode(r)
