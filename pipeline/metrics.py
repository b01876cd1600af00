"""Prometheus metrics of the stream runtime, labelled by stage.

Counters only grow; ``pending`` and ``lag`` are sampled by each worker on its
reclaim interval from XPENDING / XINFO GROUPS. The exporter is started by the
stage service when a metrics port is set. An application's own metrics live with
its stages, on the same default registry, so one exporter serves both.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

CONSUMED = Counter("devsched_stage_consumed_total", "Entries read by a stage", ["stage"])
HANDLED = Counter("devsched_stage_handled_total", "Entries handled and acked", ["stage"])
FAILED = Counter("devsched_stage_failed_total", "Failed deliveries (left pending)", ["stage"])
DEAD_LETTERED = Counter("devsched_stage_dead_lettered_total", "Entries moved to the dead stream", ["stage"])
RECLAIMED = Counter("devsched_stage_reclaimed_total", "Entries reclaimed from idle consumers", ["stage"])
BATCH_SECONDS = Histogram(
    "devsched_stage_batch_seconds",
    "Time to handle one batch",
    ["stage"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
PENDING = Gauge("devsched_stage_pending", "Entries delivered but not acked", ["stage", "stream"])
LAG = Gauge("devsched_stage_lag", "Entries not yet delivered to the group", ["stage", "stream"])


def serve(port: int) -> None:
    if port:
        start_http_server(port)
