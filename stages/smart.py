"""The model of the ``smart`` strategy: learnt from history, kept small in Redis.

``smart`` (select.lua, STRATEGY_PICKS.smart) chooses among the fitting devices with three
figures learnt from the closed allocations of the last ``DEVSCHED_SMART_HISTORY_DAYS``
days (:func:`build_model`):

- ``u:<user>``: the user's typical session (the median seconds held);
- ``d:<device>``: how often the device fails under use (failures per day held, with a
  one-day prior so that a device seldom used is not judged on one failure); a session's
  risk is that rate times its user's typical session;
- ``m:<model>``: how much of a model is wanted BY NAME (device-seconds of requests that
  named the model, over the model's capacity in the window): a request that names no
  model leaves the models others need by name to them.

The hash ``<prefix>:{pool}:smart`` (:attr:`schemas.keys.Keys.smart_model`) holds these
fields, replaced whole (one MULTI) by :func:`write_model`. The tracked job
``refresh_model`` (stages/jobs.py) computes it from PostgreSQL every 10 minutes
(:func:`refresh_model`); the simulator computes the same from the history of its own
replay. select.lua reads it with one HMGET per allocate decided by ``smart``: no
database read is ever on the request path, and with no model (never refreshed) smart
chooses as resource_based does.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from redis.asyncio import Redis

from schemas.keys import Keys
from stages.context import StageContext

DEVICE_DOWN_REASONS = frozenset({"device_failed", "device_error", "device_stopped"})
"""End reasons that count as a failure of the device under use."""
PRIOR_HELD_S = 86_400.0
"""The failure rate's prior: one day of use with no failure."""


@dataclass(frozen=True)
class HistoryRow:
    """One closed allocation, as the model needs it."""

    user_id: str
    device_id: str
    device_model: str
    held_s: float
    asked_model: str | None
    """The model the request named (None: any)."""
    end_reason: str | None


@dataclass
class SmartModel:
    user_hold_s: dict[str, int] = field(default_factory=dict)
    device_fail_per_day: dict[str, float] = field(default_factory=dict)
    model_demand: dict[str, float] = field(default_factory=dict)

    def fields(self) -> dict[str, str]:
        """The hash ``Keys.smart_model``'s fields."""
        out = {f"u:{u}": str(s) for u, s in self.user_hold_s.items()}
        out.update({f"d:{d}": f"{r:.4f}" for d, r in self.device_fail_per_day.items()})
        out.update({f"m:{m}": f"{x:.4f}" for m, x in self.model_demand.items()})
        return out


def build_model(rows: Iterable[HistoryRow], device_models: Mapping[str, str],
                window_s: float) -> SmartModel:
    """The model of ``rows`` (closed allocations over ``window_s`` seconds) for the devices
    ``device_models`` (id -> model)."""
    holds: dict[str, list[float]] = {}
    held_on: dict[str, float] = {}
    failures: dict[str, int] = {}
    named: dict[str, float] = {}
    for r in rows:
        holds.setdefault(r.user_id, []).append(r.held_s)
        held_on[r.device_id] = held_on.get(r.device_id, 0.0) + r.held_s
        if r.end_reason in DEVICE_DOWN_REASONS:
            failures[r.device_id] = failures.get(r.device_id, 0) + 1
        if r.asked_model:
            named[r.asked_model] = named.get(r.asked_model, 0.0) + r.held_s
    capacity: dict[str, float] = {}
    for model in device_models.values():
        capacity[model] = capacity.get(model, 0.0) + max(window_s, 1.0)
    return SmartModel(
        user_hold_s={u: int(statistics.median(h)) for u, h in holds.items()},
        device_fail_per_day={d: n * 86_400.0 / (held_on.get(d, 0.0) + PRIOR_HELD_S)
                             for d, n in failures.items()},
        model_demand={m: named.get(m, 0.0) / capacity[m] for m in capacity if named.get(m)},
    )


async def write_model(redis: Redis, keys: Keys, model: SmartModel) -> int:
    """Replace the model in Redis, whole (one MULTI); returns the fields written."""
    fields = model.fields()
    async with redis.pipeline(transaction=True) as tx:
        tx.delete(keys.smart_model)
        if fields:
            tx.hset(keys.smart_model, items=[x for kv in fields.items() for x in kv])
        await tx.execute()
    return len(fields)


HISTORY_SQL = """
SELECT a.user_id, a.device_id, d.model,
       COALESCE(a.duration_seconds, EXTRACT(EPOCH FROM (a.released_at - a.allocated_at)))
           AS held_s,
       a.metadata->>'requested_model' AS asked_model, a.end_reason
FROM device_allocations a JOIN devices d ON d.id = a.device_id
WHERE a.released_at IS NOT NULL AND a.allocated_at >= $1
"""


async def refresh_model(ctx: StageContext) -> int:
    """The ``refresh_model`` job: the model of the last DEVSCHED_SMART_HISTORY_DAYS days
    of PostgreSQL's history, written to Redis; returns the fields written."""
    from stages.jobs import ts

    if ctx.pg is None:
        raise RuntimeError("refresh_model needs PostgreSQL")
    window_s = ctx.settings.smart_history_days * 86_400
    since = ctx.clock.now_ms() - window_s * 1000
    async with ctx.pg.acquire() as conn:
        rows = await conn.fetch(HISTORY_SQL, ts(since))
        devices = await conn.fetch("SELECT id, model FROM devices")
    model = build_model((HistoryRow(r["user_id"], r["device_id"], r["model"],
                                    float(r["held_s"] or 0), r["asked_model"], r["end_reason"])
                         for r in rows), {d["id"]: d["model"] for d in devices}, window_s)
    return await write_model(ctx.redis, ctx.keys, model)
