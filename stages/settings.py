"""The application's settings: the runtime's, plus what the stages read.

One frozen object built from the environment (``Settings.from_env()``), handed to
every stage through its context. Each field names its variable once (see
:func:`pipeline.settings.env`); the README's configuration table lists them all
and a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import RuntimeSettings, env


@dataclass(frozen=True)
class Settings(RuntimeSettings):
    """Runtime settings and the scheduler's own; see the README's configuration table."""

    write_batch_size: int = env("DEVSCHED_WRITE_BATCH_SIZE", 1_000, minimum=1)
    """Entries per XREADGROUP of the write-behind stages (persist, bill, notify)."""
    write_linger_ms: int = env("DEVSCHED_WRITE_LINGER_MS", 50)
    """After a batch that was not full, a write-behind stage waits this long before
    reading again, so it writes few large batches, not many small ones (its work is
    behind the reply, so waiting costs no request latency)."""
    idempotency_ttl_s: int = env("DEVSCHED_IDEMPOTENCY_TTL_S", 900, minimum=1)
    """How long a request id's answer is kept: the window in which a retried request gets
    its first answer (after it, the same id is a new request). Redis holds one answer per
    request for this long, so it bounds the memory that requests leave behind."""
    released_ttl_s: int = env("DEVSCHED_RELEASED_TTL_S", 900, minimum=1)
    """How long a closed allocation's small record (device, user, status, end, duration)
    stays in Redis to answer a second release (``already_released``); after it such a
    release answers ``not_found``. PostgreSQL keeps the allocation."""
    reply_ttl_s: int = env("DEVSCHED_REPLY_TTL_S", 3_600, minimum=1)
    """A reply stream nobody reads expires after this."""
    tick_ms: int = env("DEVSCHED_TICK_MS", 1_000, minimum=10)
    """Timer tick period (expiry runs every tick)."""
    expire_batch: int = env("DEVSCHED_EXPIRE_BATCH", 500, minimum=1)
    """Allocations expired per script call."""
    trim_every_ticks: int = env("DEVSCHED_TRIM_EVERY_TICKS", 10, minimum=1)
    """Streams are trimmed every N ticks."""
    quota_fail_open: bool = env("DEVSCHED_QUOTA_FAIL_OPEN", False)
    """Admit users with no quota record (default: refuse them as quota_exceeded)."""
    payment_failure_ttl_s: int = env("DEVSCHED_PAYMENT_FAILURE_TTL_S", 604_800, minimum=1)
    """A user's count of failed payments (billing.payment_failed) is forgotten this long
    after the last one (default 7 days); kept in Redis, shared by every worker."""
    payment_failure_threshold: int = env("DEVSCHED_PAYMENT_FAILURE_THRESHOLD", 3, minimum=1)
    """At this many failed payments the user's allocations end and the user is suspended
    until a payment succeeds; below it each failure is a warning."""
    rate_user_per_s: float = env("DEVSCHED_RATE_USER_PER_S", 0.0, minimum=0)
    """Allocate requests a user may make per second, on average (a token bucket checked
    at admission); 0: no limit."""
    rate_user_burst: int = env("DEVSCHED_RATE_USER_BURST", 0, minimum=0)
    """How many a user may make at once (the bucket's size); 0: one second's worth
    (at least 1)."""
    rate_tenant_per_s: float = env("DEVSCHED_RATE_TENANT_PER_S", 0.0, minimum=0)
    """Allocate requests all users of a tenant together may make per second (requests
    that name a tenant_id); 0: no limit."""
    rate_tenant_burst: int = env("DEVSCHED_RATE_TENANT_BURST", 0, minimum=0)
    """The tenant bucket's size; 0: one second's worth (at least 1)."""
    purge_retention_days: int = env("DEVSCHED_PURGE_RETENTION_DAYS", 30, minimum=1)
    """The purge job deletes released/expired allocation rows, and completed, cancelled or
    no-show reservation rows, that ended longer ago than this (never an active allocation
    nor a booked or active reservation)."""
    usage_report_retention_days: int = env("DEVSCHED_USAGE_REPORT_RETENTION_DAYS", 400,
                                           minimum=1)
    """The purge job deletes usage_reports rows whose period ended longer ago than this
    (kept apart from DEVSCHED_PURGE_RETENTION_DAYS: reports serve yearly comparisons)."""
    smart_history_days: int = env("DEVSCHED_SMART_HISTORY_DAYS", 14, minimum=1)
    """The ``refresh_model`` job learns the smart strategy's model from the allocations of
    this many days (stages/smart.py)."""
    job_history_retention_days: int = env("DEVSCHED_JOB_HISTORY_RETENTION_DAYS", 30, minimum=1)
    """A job's finished execution records are kept this long (the prune_history job)."""
    job_history_max_per_job: int = env("DEVSCHED_JOB_HISTORY_MAX_PER_JOB", 1_000, minimum=1)
    """At most this many execution records are kept per job (the newest)."""
    job_max_retries: int = env("DEVSCHED_JOB_MAX_RETRIES", 3, minimum=0)
    """A failed or killed scheduled run is retried this many times (at the next ticks)."""
    job_timeout_s: int = env("DEVSCHED_JOB_TIMEOUT_S", 300, minimum=1)
    """A run longer than this fails."""
    job_lease_s: int = env("DEVSCHED_JOB_LEASE_S", 15, minimum=3)
    """A run's claim holds this long unless renewed; the run renews it every third of
    it, so a claim not renewed this long belongs to a dead worker (recorded failed,
    retried): a worker killed in the middle of expire holds expiry off this long, not
    the job's timeout."""
    max_allocation_s: int = env("DEVSCHED_MAX_ALLOCATION_S", 2_592_000, minimum=1)
    """A renewal may not make an allocation last longer than this in all, from its
    allocated-at (default 30 days)."""
    queue_max_per_user: int = env("DEVSCHED_QUEUE_MAX_PER_USER", 10, minimum=0)
    """Most allocate requests (``wait_seconds``) of one user waiting in the queue at once;
    one more is refused ``queue_full``. 0: no request may wait."""
    queue_aging_step_ms: int = env("DEVSCHED_QUEUE_AGING_STEP_MS", 10_000, minimum=1)
    """Aging of the wait queue: a waiter's score is its arrival (ms) minus priority times
    this step, lowest served first; so no request arriving more than 9 steps after a
    waiter (90 s by default) is served before it, whatever the priorities."""
    billing_url: str = env("DEVSCHED_BILLING_URL", "")
    """Base URL of the billing service: the export stage POSTs usage to ``<base>/usage`` and
    reads standings from ``<base>/accounts/<user_id>``. Empty: no export, no balance check."""
    billing_token: str = env("DEVSCHED_BILLING_TOKEN", "")
    """Sent as ``Authorization: Bearer <token>`` to the billing service."""
    billing_fail_open: bool = env("DEVSCHED_BILLING_FAIL_OPEN", True)
    """When a user's billing standing is unknown or stale (the service unreachable): true,
    allocate on the last known standing; false, refuse ``billing_unavailable``."""
    billing_standing_ttl_s: int = env("DEVSCHED_BILLING_STANDING_TTL_S", 60, minimum=1)
    """A user's standing is fetched again when it is older than this (users seen on the
    changes stream within the last hour)."""
    billing_standing_max_age_s: int = env("DEVSCHED_BILLING_STANDING_MAX_AGE_S", 300, minimum=1)
    """Fail-closed only: a standing older than this counts as unknown."""
    billing_backfill_every_s: int = env("DEVSCHED_BILLING_BACKFILL_EVERY_S", 60, minimum=1)
    """The export stage sends ledger rows never exported (closed while the export was off,
    or whose export was never recorded) when it starts and then this often."""
    billing_backfill_grace_s: int = env("DEVSCHED_BILLING_BACKFILL_GRACE_S", 60, minimum=0)
    """A ledger row is backfilled only once it ended this long ago (the changes stream
    exports it first)."""
    webhook_url: str = env("DEVSCHED_WEBHOOK_URL", "")
    """Where the webhook stage POSTs batches of notifications; empty: off (the
    notifications stream stays either way)."""
    webhook_secret: str = env("DEVSCHED_WEBHOOK_SECRET", "")
    """Key of the HMAC-SHA256 of each webhook body (header ``X-Devsched-Signature``)."""
    http_timeout_s: float = env("DEVSCHED_HTTP_TIMEOUT_S", 5.0, minimum=0.01)
    """Timeout of each request of the HTTP sinks (billing, webhook)."""
    http_attempts: int = env("DEVSCHED_HTTP_ATTEMPTS", 3, minimum=1)
    """Tries of a batch before its items go to the sink's retry queue."""
    http_backoff_ms: int = env("DEVSCHED_HTTP_BACKOFF_MS", 200, minimum=1)
    """First back-off step of the HTTP sinks (doubles per attempt, with jitter)."""
    http_backoff_max_ms: int = env("DEVSCHED_HTTP_BACKOFF_MAX_MS", 60_000, minimum=1)
    """Longest back-off step."""
    http_retry_budget_s: int = env("DEVSCHED_HTTP_RETRY_BUDGET_S", 86_400, minimum=1)
    """An item failing for longer than this goes to the dead stream (an outage shorter than
    this loses and dead-letters nothing)."""
    http_breaker_failures: int = env("DEVSCHED_HTTP_BREAKER_FAILURES", 5, minimum=1)
    """Failures in a row that open a sink's circuit breaker."""
    http_breaker_open_ms: int = env("DEVSCHED_HTTP_BREAKER_OPEN_MS", 30_000, minimum=1)
    """How long an open breaker sends nothing before one probe (half-open)."""
    http_batch: int = env("DEVSCHED_HTTP_BATCH", 100, minimum=1)
    """Items per request of the HTTP sinks."""
    status_max_lag: int = env("DEVSCHED_STATUS_MAX_LAG", 10_000, minimum=1)
    """`devsched status` reports a consumer group unhealthy when it has more entries not
    yet done (lag + pending) than this."""
    status_max_behind_s: float = env("DEVSCHED_STATUS_MAX_BEHIND_S", 60.0, minimum=0)
    """... or when its oldest entry not yet acked is older than this (s): for the
    write-behind groups, how far PostgreSQL is behind."""
    status_dead_window_s: int = env("DEVSCHED_STATUS_DEAD_WINDOW_S", 300, minimum=1)
    """Dead letters newer than this (s) count as recent for `devsched status`."""
    status_dead_max: int = env("DEVSCHED_STATUS_DEAD_MAX", 0, minimum=0)
    """More recent dead letters than this (dead letters growing) is unhealthy."""
    status_stall_ticks: int = env("DEVSCHED_STATUS_STALL_TICKS", 5, minimum=1)
    """No timer tick for this many periods (DEVSCHED_TICK_MS) is unhealthy."""
    replicas_to_ack: int = env("DEVSCHED_REPLICAS_TO_ACK", 0, minimum=0)
    """The select stage answers a producer only once its batch has reached this many
    replicas (WAIT; WAITAOF on Redis 7.2+): an answered allocation survives the loss of
    the primary. 0: answers go out as the script decides (asynchronous replication)."""
    replicas_timeout_ms: int = env("DEVSCHED_REPLICAS_TIMEOUT_MS", 1_000, minimum=1)
    """How long one WAIT for DEVSCHED_REPLICAS_TO_ACK replicas may take; replies not
    acknowledged in time stay held and go out at a later sweep whose WAIT succeeds."""
    reservation_grace_s: int = env("DEVSCHED_RESERVATION_GRACE_S", 600, minimum=1)
    """A reservation that became an allocation at its start is cancelled as a no-show
    (its device freed) when its user has not claimed it (a claim_reservation request, or
    a renewal of that allocation) within this long."""
    plan_intervals: str = env("DEVSCHED_PLAN_INTERVALS",
                              "basic=24h,standard=6h,premium=1h,enterprise=15m")
    """Plans and the interval tier of each (``plan=duration``, comma separated; a duration
    is a whole number of ``s``, ``m``, ``h`` or ``d``): one global schedule per kind and
    tier (stages/schedules.py)."""
    schedule_batch_capacity: int = env("DEVSCHED_SCHEDULE_BATCH_CAPACITY", 500, minimum=1)
    """Tenants per batch of a schedule; a schedule whose batches are full opens another."""
    schedule_stagger_s: int = env("DEVSCHED_SCHEDULE_STAGGER_S", 60, minimum=0)
    """Start offset between consecutive batches of a schedule (batch n runs n x this after
    the period boundary, modulo the interval), so batches do not all fire at once."""
    schedule_retry_backoff_s: int = env("DEVSCHED_SCHEDULE_RETRY_BACKOFF_S", 300, minimum=1)
    """First back-off of a tenant whose scheduled run failed; multiplied by
    DEVSCHED_SCHEDULE_RETRY_FACTOR per further failure (5, 15, 45 minutes)."""
    schedule_retry_factor: int = env("DEVSCHED_SCHEDULE_RETRY_FACTOR", 3, minimum=1)
    """Growth of the back-off between a tenant's retries."""
    schedule_max_retries: int = env("DEVSCHED_SCHEDULE_MAX_RETRIES", 3, minimum=0)
    """Retries of a failed tenant run; one failing past them is permanently failed."""
    schedule_retry_alert: int = env("DEVSCHED_SCHEDULE_RETRY_ALERT", 10, minimum=0)
    """Retry-queue size (waiting plus permanently failed tenants) above which the alert
    metric ``scheduler_schedule_retry_alert`` is 1."""
    schedule_warning_fill: float = env("DEVSCHED_SCHEDULE_WARNING_FILL", 0.8, minimum=0)
    """A schedule whose batches are fuller than this (0 to 1) is ``warning``; above 0.95
    ``critical``."""
