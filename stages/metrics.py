"""Prometheus metrics of the domain: what the stages and the producer client count.

The runtime's own metrics (per stage: consumed, handled, failed, pending, lag) are
in ``pipeline.metrics``; the metrics here name domain events. Counters only grow;
they are exported by the same server (DEVSCHED_METRICS_PORT) in a stage process,
and live in the default registry of any process that uses the client.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from pipeline.metrics import LATENCY_BUCKETS

AUTO_RELEASE = Counter("scheduler_auto_release_total", "Allocations closed by the system", ["reason"])
"""``reason``: expired, or the schemas.messages.EndReason of an event (device_failed, ...)."""
AUTO_REPLACE = Counter(
    "scheduler_auto_replace_total",
    "Allocations moved to an equivalent device instead of ended (replace_on_failure)", ["reason"],
)
"""``reason``: what the device's event would have ended the allocation for (device_failed,
device_deleted, device_maintenance, device_stopped, device_error)."""
EVENT_CONSUMED = Counter(
    "scheduler_event_consumed", "Events from other systems read by the events stage",
    ["type", "status"],
)
"""Exported as ``scheduler_event_consumed_total``. ``type``: one of the 15 event types, or
``unknown`` for an event whose type is not one; ``status``: applied, stale (its version
not above the last applied), duplicate (its event id applied before), ignored (unknown
device or user), invalid (did not decode: dead-lettered), failed (an informational event
whose application failed: dead-lettered and acked)."""
CLIENT_INVALID_REPLIES = Counter(
    "devsched_client_invalid_replies",
    "Replies the producer client could not decode (the waiting call, when its request id "
    "could be read, is answered with Failed(reason='invalid_reply'))",
)
"""Exported as ``devsched_client_invalid_replies_total``."""
JOB_RUNS = Counter("scheduler_job_runs_total", "Runs of the tracked timer jobs", ["job", "status"])
"""``job``: expire, trim, stats_snapshot, purge, prune_history; ``status``: succeeded, failed
(including a run found dead past its timeout)."""
CLIENT_ALLOCATE_SECONDS = Histogram(
    "devsched_client_allocate_seconds",
    "End-to-end latency of an allocate request as the producer client sees it (sent to "
    "answered)", ["outcome"], buckets=LATENCY_BUCKETS,
)
"""``outcome``: the reply's kind (``allocated``, ``allocated_batch``, ``failed``), or
``timed_out`` when no answer came within the client's timeout."""
POOL_DEVICES = Gauge(
    "devsched_pool_devices", "Devices of a pool by state (sampled by the timers stage)",
    ["pool", "state"], multiprocess_mode="livemostrecent",
)
"""``state``: free, allocated, out_of_service (maintenance, failed, stopped, error)."""
TIMER_LAST_TICK = Gauge(
    "devsched_timer_last_tick_seconds",
    "Unix time (s) of the period of the last tick the timers stage handled",
    multiprocess_mode="max",
)
SCHEDULE_TENANT_RUNS = Counter(
    "scheduler_schedule_tenant_runs_total", "Per-tenant runs of the global schedules",
    ["kind", "status"])
"""``kind``: interim_metering, usage_report; ``status``: succeeded, failed (to the retry
queue), retried_done, retried_retry (backed off again), retried_failed (permanently)."""
SCHEDULE_FILL = Gauge("scheduler_schedule_fill", "Tenants / capacity of a schedule's batches",
                      ["schedule"])
SCHEDULE_HEALTH = Gauge("scheduler_schedule_health",
                        "A schedule's health: 0 healthy, 1 warning, 2 critical (> 95% full)",
                        ["schedule"])
SCHEDULE_RETRY_QUEUE = Gauge("scheduler_schedule_retry_queue",
                             "Tenant runs in the schedules' retry queue", ["state"])
"""``state``: waiting (to be retried), failed (permanently)."""
SCHEDULE_RETRY_ALERT = Gauge(
    "scheduler_schedule_retry_alert",
    "1 when the schedules' retry queue (waiting + failed) holds more than "
    "DEVSCHED_SCHEDULE_RETRY_ALERT tenant runs")
