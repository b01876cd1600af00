"""What each stage script is called with: its keys and its call, declared once.

A script call is a keys ``NamedTuple`` (the KEYS, by name) and one call Struct
(the header fields, then ``items``, the batch's rows). ``pipeline.scripts``
encodes the call as ONE msgpack value (``ARGV[1]``); the script reads
``KEY.<name>`` and ``CALL.<field>``, and each row by name (``row.request_id``),
from a preamble generated from these types: a field name the Struct does not
declare raises ``row <op> has no field <name>`` in Lua instead of reading nil.

Each row kind is one Struct tagged by ``op`` (``"admit"``, ``"forward"``,
``"refuse"``, ``"dead"``, ``"allocate"``, ``"release"``) and carries the id of
the stream entry it stands for (``entry_id``, acked by the same call). A new row
kind is one Struct here, one member of its script's row union, and one handler
in the script (``each_row`` in common.lua raises on a kind without a handler).

Text fields are ``str``: Redis's cmsgpack reads no msgpack bin, and every
payload a row carries (a request, a dead letter) is UTF-8 JSON. Absent
optional fields (None) read as false in Lua (test them by truth).
"""

from __future__ import annotations

from typing import NamedTuple

from msgspec import Struct

from schemas.messages import DeviceSpec, FailureReason, QuotaSpec


class Row(Struct, kw_only=True, tag_field="op", omit_defaults=True):
    """One item of a batch: the entry it stands for, acked by the same script call.
    Optional fields that are None are left out of the encoding (they read as false
    either way; a row is decoded faster without them)."""

    entry_id: str


class DeadRow(Row, tag="dead", kw_only=True):
    """Move the entry to the dead stream with ``letter`` (a DeadLetter, JSON)."""

    letter: str


# --- quota.lua ----------------------------------------------------------------------


class QuotaKeys(NamedTuple):
    requests: str
    admitted: str
    changes: str
    dead: str
    state: str
    """The state marker: without its epoch the call changes nothing (stages/state.py)."""


class AdmitRow(Row, tag="admit", kw_only=True):
    """An allocate request to check against the user's quota; admitted, it goes on to
    select as ``payload`` with its hold."""

    request_id: str
    user_id: str
    tenant_id: str | None = None
    reply_to: str
    min_cpu_cores: int
    min_memory_mb: int
    count: int = 1
    """Devices asked for (a batch above 1)."""
    best_effort: bool = False
    """A batch that takes what fits (else all or nothing)."""
    payload: str
    """The request as the producer sent it (JSON)."""


class ForwardRow(Row, tag="forward", kw_only=True):
    """A request that goes on to select unchanged, holding nothing (a release)."""

    payload: str


class RefuseRow(Row, tag="refuse", kw_only=True):
    """A request answered with a failure at once (it did not validate)."""

    request_id: str
    user_id: str | None = None
    tenant_id: str | None = None
    reply_to: str
    reason: FailureReason
    message: str


class RenewCheckRow(Row, tag="renew", kw_only=True):
    """A renew request: the user must be active with a quota not expired; admitted, it
    goes on to select as ``payload`` (holding nothing)."""

    request_id: str
    user_id: str
    reply_to: str
    payload: str


class ReserveCheckRow(Row, tag="reserve", kw_only=True):
    """A reserve request: checked as a renewal is (an active user, a quota not expired);
    admitted, it goes on to select as ``payload`` (holding nothing: a reservation takes
    its share of the quota when it becomes an allocation)."""

    request_id: str
    user_id: str
    reply_to: str
    payload: str


QuotaRow = AdmitRow | ForwardRow | RefuseRow | RenewCheckRow | ReserveCheckRow | DeadRow


class RateLimits(Struct, kw_only=True, omit_defaults=True):
    """The token buckets checked at admission (stages.settings: DEVSCHED_RATE_*); a
    bucket whose rate is None is off. ``*_burst`` is the bucket's size."""

    user_per_s: float | None = None
    user_burst: int = 1
    tenant_per_s: float | None = None
    tenant_burst: int = 1


class QuotaCall(Struct, kw_only=True, omit_defaults=True):
    prefix: str
    group: str
    now_ms: int
    idempotency_ttl_s: int
    reply_ttl_s: int
    fail_open: bool
    """Admit users with no quota record."""
    rate: RateLimits | None = None
    """None (left out) when no rate limit is on: the script does nothing for them."""
    billing_check: bool = False
    """The billing check is on (DEVSCHED_BILLING_URL set): an allocation of a user whose
    ``billing_status`` is ``overdue`` is refused ``billing_overdue``."""
    billing_max_age_ms: int | None = None
    """Set only when the billing check fails closed: an allocation of a user whose billing
    standing (``billing_checked_ms`` in the user's hash) is missing or older than this is
    refused ``billing_unavailable``. Left out, the script reads nothing more."""
    items: list[QuotaRow]


# --- select.lua ---------------------------------------------------------------------


class SelectKeys(NamedTuple):
    admitted: str
    changes: str
    dead: str
    state: str
    """The state marker: its epoch goes into every new allocation id; without it the
    call changes nothing."""
    replies_held: str
    """The held replies' stream (``Keys.replies_held``): with ``hold_replies`` every reply
    is written there, to be delivered after WAIT (pipeline/replication.py)."""


class AllocateRow(Row, tag="allocate", kw_only=True):
    """An admitted allocate request: pick a device, settle the hold, answer."""

    request_id: str
    user_id: str
    tenant_id: str | None = None
    reply_to: str
    min_cpu_cores: int
    min_memory_mb: int
    duration_seconds: int
    pool: str | None = None
    model: str | None = None
    hold: str
    """What quota held for it ("cpu mem sto"), from the admitted entry's ``c``."""
    replace_on_failure: bool | None = None
    """The request's replace_on_failure (None when false: left out of the encoding);
    kept on the allocation's hash for events.lua."""
    wait_seconds: int | None = None
    """The request's wait_seconds: with no fitting device, it waits in the queue."""
    priority: int | None = None
    """The request's priority (0..9; None for 0): its place in the queue."""


class AllocateBatchRow(Row, tag="allocate_batch", kw_only=True):
    """An admitted allocate request for ``count`` > 1 devices: the fields of an
    AllocateRow and the batch's mode. select.lua gives device i the id it would give
    request ``<request id>#<i>`` (``#`` is not allowed in request ids)."""

    request_id: str
    user_id: str
    tenant_id: str | None = None
    reply_to: str
    min_cpu_cores: int
    min_memory_mb: int
    duration_seconds: int
    pool: str | None = None
    model: str | None = None
    hold: str
    """What quota held for it ("cpu mem sto n": n devices)."""
    count: int
    best_effort: bool = False


class ReleaseBatchRow(Row, tag="release_batch", kw_only=True):
    """A release request naming several allocations."""

    request_id: str
    reply_to: str
    allocation_ids: list[str]
    user_id: str | None = None
    """When set, only this user's allocations may be released."""


class ReleaseRow(Row, tag="release", kw_only=True):
    """A release request: close the allocation named by id, or the one on the device."""

    request_id: str
    reply_to: str
    allocation_id: str | None = None
    device_id: str | None = None
    user_id: str | None = None
    """When set, only this user's allocation may be released."""


class RenewRow(Row, tag="renew", kw_only=True):
    """An admitted renew request: extend the allocation atomically, or refuse it."""

    request_id: str
    user_id: str
    reply_to: str
    allocation_id: str
    extend_seconds: int
    max_total_s: int
    """DEVSCHED_MAX_ALLOCATION_S: the longest an allocation may last in all."""


class CancelRow(Row, tag="cancel", kw_only=True):
    """A cancel request: take the user's waiting request out of the queue."""

    request_id: str
    reply_to: str
    cancel_request_id: str
    user_id: str


class ReserveRow(Row, tag="reserve", kw_only=True):
    """An admitted reserve request: book the device (or the best fitting one free over
    the interval) in one atomic step with the interval check (stages/lua/bookings.lua)."""

    request_id: str
    user_id: str
    tenant_id: str | None = None
    reply_to: str
    start_ms: int
    end_ms: int
    device_id: str | None = None
    min_cpu_cores: int = 0
    min_memory_mb: int = 0
    pool: str | None = None
    model: str | None = None
    max_total_s: int
    """DEVSCHED_MAX_ALLOCATION_S: the longest a reservation may last."""


class CancelReservationRow(Row, tag="cancel_reservation", kw_only=True):
    """A cancel_reservation request."""

    request_id: str
    reply_to: str
    reservation_id: str
    user_id: str


class ClaimReservationRow(Row, tag="claim_reservation", kw_only=True):
    """A claim_reservation request."""

    request_id: str
    reply_to: str
    reservation_id: str
    user_id: str


SelectRow = (AllocateRow | ReleaseRow | AllocateBatchRow | ReleaseBatchRow | RenewRow | CancelRow
             | ReserveRow | CancelReservationRow | ClaimReservationRow | RefuseRow | DeadRow)
"""A select row. ``refuse``: a release a producer sent straight to the admitted stream
that did not validate (stages/select.py direct_item), answered ``invalid_request``."""


class SelectCall(Struct, kw_only=True):
    prefix: str
    group: str
    now_ms: int
    idempotency_ttl_s: int
    reply_ttl_s: int
    released_ttl_s: int
    queue_max_per_user: int
    """Most requests of one user waiting at once (DEVSCHED_QUEUE_MAX_PER_USER)."""
    queue_aging_step_ms: int
    """A waiter's score is its arrival minus priority times this
    (DEVSCHED_QUEUE_AGING_STEP_MS)."""
    hold_replies: bool | None = None
    """True when DEVSCHED_REPLICAS_TO_ACK > 0: replies go to the held stream, and the stage
    delivers them once WAIT says the replicas have the batch (None: straight out)."""
    items: list[SelectRow]


# --- expire.lua ---------------------------------------------------------------------


class ExpireKeys(NamedTuple):
    changes: str


class ExpireCall(Struct, kw_only=True):
    prefix: str
    now_ms: int
    limit: int
    """Most allocations closed by one call (and most waiters timed out)."""
    released_ttl_s: int


# --- reservations.lua -----------------------------------------------------------------


class ReservationsKeys(NamedTuple):
    changes: str


class ReservationsCall(Struct, kw_only=True):
    """One step of one reservations job: ``op`` is ``activate`` (booked ones whose start
    came), ``no_show`` (active ones not claimed by their deadline) or ``complete``
    (active ones whose allocation ended)."""

    prefix: str
    now_ms: int
    op: str
    limit: int
    """Most reservations handled by one call (a full call means: call again)."""
    grace_ms: int
    """DEVSCHED_RESERVATION_GRACE_S in ms: how long an activated one waits for its claim."""
    released_ttl_s: int


# --- admin.lua ----------------------------------------------------------------------


class AdminKeys(NamedTuple):
    changes: str
    state: str
    """The state marker: without its epoch the call is refused."""


class AdminCall(Struct, kw_only=True):
    """Exactly one of ``device`` (its ``name`` set) and ``quota``."""

    prefix: str
    now_ms: int
    device: DeviceSpec | None = None
    quota: QuotaSpec | None = None


# --- rebuild.lua --------------------------------------------------------------------


class RebuildKeys(NamedTuple):
    users: str
    """The set of users with a quota."""
    stats: str
    """The pool's counters."""
    changes: str
    """The changes stream: a device written free is offered to the restored wait queue,
    and a waiter it serves (or whose wait is over) is recorded as select records one."""
    jobs_known: str
    """The names of the tracked jobs whose hash exists (Keys.jobs_known)."""


class RebuildAllocation(Struct, kw_only=True, omit_defaults=True):
    """An allocation's hash as select and close_allocation write it: an active one goes
    into the expiry schedule, a closed one expires from Redis after ``ttl_s``."""

    allocation_id: str
    device_id: str
    user_id: str
    tenant_id: str | None = None
    request_id: str
    status: str
    allocated_at_ms: int
    expires_at_ms: int
    duration_minutes: int
    cpu_cores: int
    memory_mb: int
    storage_mb: int
    pool: str
    version: int
    released_at_ms: int | None = None
    duration_seconds: int | None = None
    end_reason: str | None = None
    """Why a closed one ended (released, expired, or the event's reason)."""
    replace_on_failure: bool | None = None
    """Moved to an equivalent device when its device goes down (see events.lua)."""
    ttl_s: int


class RebuildAnswer(Struct, kw_only=True):
    """An allocation's reply, stored as its request id's answer for ``ttl_s``."""

    user_id: str
    request_id: str
    answer: str
    ttl_s: int


class RebuildWaiter(Struct, kw_only=True, omit_defaults=True):
    """A request that was waiting (schemas.messages.WaiterChange, as PostgreSQL keeps it):
    the record select.lua keeps for a waiter, and its place in the queue."""

    request_id: str
    user_id: str
    tenant_id: str | None = None
    reply_to: str
    min_cpu_cores: int
    min_memory_mb: int
    duration_seconds: int
    pool: str | None = None
    model: str | None = None
    hold: str
    allocation_id: str
    replace_on_failure: bool | None = None
    priority: int
    wait_seconds: int
    queued_at_ms: int
    wait_until_ms: int
    idem_ttl: int
    reply_ttl: int
    queue_score: int


class RebuildJob(Struct, kw_only=True, omit_defaults=True):
    """A tracked job's hash (jobs.lua) from ``job_info``: its interval, paused or not, its
    next run, its limits; no claim (a run Redis lost is over)."""

    name: str
    interval_ms: int
    paused: bool
    next_run_ms: int
    max_retries: int
    timeout_ms: int
    status: str
    last_run_ms: int | None = None


class RebuildUser(Struct, kw_only=True, omit_defaults=True):
    """A user's hash: the quota (``status`` None: the user has none), and the usage
    recomputed from those of ``allocations`` that are active in Redis now."""

    user_id: str
    allocations: list[str]
    status: str | None = None
    expires_at_ms: int | None = None
    max_devices: int | None = None
    max_cpu_per_device: int | None = None
    max_memory_mb_per_device: int | None = None
    total_cpu_cores: int | None = None
    total_memory_gb: int | None = None
    total_storage_gb: int | None = None
    version: int | None = None
    last_device: str | None = None
    """The device of the user's newest allocation (the affinity strategy's memory)."""
    last_host: str | None = None
    user_status: str | None = None
    """The parts of the status events keep (events.lua), as PostgreSQL recorded them."""
    billing_status: str | None = None
    user_event_version: int | None = None
    billing_event_version: int | None = None
    payment_failures: int | None = None
    """Failed payments counted, kept for ``payment_failures_ttl_ms`` more."""
    payment_failures_ttl_ms: int | None = None
    waiters: list[RebuildWaiter] | None = None
    """The user's requests waiting in the queue: each holds its hold again, counts in
    'waiting' and joins the queue with its score."""


class RebuildDevice(Struct, kw_only=True, omit_defaults=True):
    """A device's hash: held by ``allocation_id`` when that allocation is active in Redis
    now, else in ``status`` (an available device goes into its pool's free set)."""

    device_id: str
    name: str
    pool: str
    model: str
    host: str
    adb_host: str
    adb_port: int
    cpu_cores: int
    memory_mb: int
    storage_mb: int
    status: str
    version: int
    allocation_id: str | None = None
    last_allocation_id: str | None = None


class RebuildStats(Struct, kw_only=True):
    """The pool's counters, set (not added to)."""

    allocated: int
    released: int
    expired: int


class RebuildReservation(Struct, kw_only=True, omit_defaults=True):
    """A reservation that is booked or active (``reservations`` in PostgreSQL): its hash,
    its booking of the device and its place in the timers' schedules."""

    reservation_id: str
    request_id: str
    user_id: str
    tenant_id: str | None = None
    device_id: str
    pool: str
    start_ms: int
    end_ms: int
    status: str
    allocation_id: str | None = None
    created_at_ms: int
    claimed_at_ms: int | None = None
    claim_by_ms: int | None = None
    version: int


class RebuildCall(Struct, kw_only=True, omit_defaults=True):
    """One chunk of the live state; the caller sends stats, then allocations, answers,
    users and devices, in that order, then reservations (see rebuild.lua)."""

    prefix: str
    now_ms: int | None = None
    """The time a waiter served (or timed out) while the state is written gets."""
    stats: RebuildStats | None = None
    jobs: list[RebuildJob] | None = None
    allocations: list[RebuildAllocation] | None = None
    answers: list[RebuildAnswer] | None = None
    users: list[RebuildUser] | None = None
    devices: list[RebuildDevice] | None = None
    reservations: list[RebuildReservation] | None = None


# --- events.lua ---------------------------------------------------------------------


class EventsKeys(NamedTuple):
    events: str
    changes: str
    dead: str


class DeviceEventRow(Row, tag="device", kw_only=True):
    """A device.* event (schemas.events): ``type`` says which; the fields of other types
    are absent. device.created carries the whole spec (its defaults filled in)."""

    type: str
    event_id: str
    version: int | None = None
    device_id: str
    reason: str | None = None
    status: str | None = None
    """device.status_changed: running, stopped or error."""
    info: str | None = None
    expected_end_ms: int | None = None
    name: str | None = None
    pool: str | None = None
    model: str | None = None
    host: str | None = None
    adb_host: str | None = None
    adb_port: int | None = None
    cpu_cores: int | None = None
    memory_mb: int | None = None
    storage_mb: int | None = None


class UserEventRow(Row, tag="user", kw_only=True):
    """A user.* or billing.* event (schemas.events): ``type`` says which; the fields of
    other types are absent (a user.quota_updated limit left out keeps its value)."""

    type: str
    event_id: str
    version: int | None = None
    user_id: str
    reason: str | None = None
    amount: float | None = None
    days: int | None = None
    balance: float | None = None
    status: str | None = None
    """billing.standing: ok or overdue."""
    observed_at_ms: int | None = None
    """billing.standing: when the service was asked; the others: ``occurred_at_ms``."""
    max_devices: int | None = None
    max_cpu_per_device: int | None = None
    max_memory_mb_per_device: int | None = None
    total_cpu_cores: int | None = None
    total_memory_gb: int | None = None
    total_storage_gb: int | None = None
    expires_at_ms: int | None = None


EventsRow = DeviceEventRow | UserEventRow | DeadRow


class EventsCall(Struct, kw_only=True):
    prefix: str
    group: str
    now_ms: int
    event_ttl_s: int
    """How long an applied event id is remembered."""
    released_ttl_s: int
    payment_failure_ttl_s: int
    payment_failure_threshold: int
    quota_defaults: QuotaSpec
    """The limits a user.quota_updated gives a user without a quota record, for the
    limits it leaves out (``user_id`` unused)."""
    items: list[EventsRow]


# --- jobs.lua -----------------------------------------------------------------------


class JobsKeys(NamedTuple):
    """jobs.lua names each job's hash from the prefix and the job's name
    (``<prefix>:{jobs}:job:<name>``, schemas.keys.Keys.job)."""

    known: str
    """The set of the names of the jobs whose hash exists (Keys.jobs_known)."""


class JobClaim(Struct, kw_only=True):
    """Claim one job for a run: a scheduled one when it is due (``manual`` false), or a
    manual one now. The defaults initialise the job's hash the first time it is seen."""

    name: str
    execution_id: str
    """The id the run gets when this call claims it."""
    interval_ms: int
    first_run_ms: int
    """The first run of a job never seen before (expire: now; the others: the end of
    the current interval, so a new worker does not purge or snapshot at once)."""
    max_retries: int
    timeout_ms: int
    lease_ms: int | None = None
    """The claim's deadline is now + lease_ms (the run renews it while it works: a dead
    worker's claim is found stale a lease after its last renewal); None: now +
    timeout_ms."""
    manual: bool = False


class JobFinish(Struct, kw_only=True):
    """The end of the run ``execution_id`` of job ``name``: ``succeeded`` or ``failed``."""

    name: str
    execution_id: str
    status: str


class JobRenew(Struct, kw_only=True):
    """The run ``execution_id`` of job ``name`` is alive: its claim's deadline moves to
    now + ``lease_ms``."""

    name: str
    execution_id: str
    lease_ms: int


class JobControl(Struct, kw_only=True, omit_defaults=True):
    """An operator's change to a job: ``pause``, ``resume`` or ``set_interval``
    (``interval_ms``); the defaults initialise the job's hash when it is new."""

    name: str
    action: str
    default_interval_ms: int
    first_run_ms: int
    max_retries: int
    timeout_ms: int
    interval_ms: int | None = None


class JobsCall(Struct, kw_only=True, omit_defaults=True):
    """One of: ``claim`` (the jobs to claim, in order), ``finish``, ``renew``,
    ``control``."""

    prefix: str
    now_ms: int
    claim: list[JobClaim] | None = None
    finish: JobFinish | None = None
    renew: JobRenew | None = None
    control: JobControl | None = None


# --- schedules.lua (stages/schedules.py): tenants, global schedules, batches, retries ----


class SchedulesKeys(NamedTuple):
    """schedules.lua names every other key from the prefix, all under the hash tag
    ``{sched}`` (schemas.keys.Keys.sched); the events stream is only acked."""

    tenants: str
    """Hash tenant id -> plan: the registry (Keys.sched_tenants)."""
    events: str
    """The events stream whose entries a tenant-event call acks (group ``events``)."""
    changes: str
    """The changes stream: each change of a tenant (TenantChange) or of a schedule's pause
    (ScheduleChange) is added there, for persist to write behind."""


class PlanTier(Struct, kw_only=True):
    """A plan and the interval of its tier."""

    plan: str
    interval_ms: int


class TenantOp(Struct, kw_only=True, omit_defaults=True):
    """Create or change (``set``) a tenant's plan, or ``delete`` it. From an event:
    ``event_id`` (applied once), ``version`` (ignored unless above the last applied) and
    ``entry_id`` (acked in the same call)."""

    action: str
    tenant_id: str
    plan: str | None = None
    event_id: str | None = None
    version: int | None = None
    entry_id: str | None = None


class TenantOverride(Struct, kw_only=True, omit_defaults=True):
    """A custom interval for a tenant until ``until_ms`` (then its tier again);
    ``every_ms`` absent: the override is removed now."""

    tenant_id: str
    every_ms: int | None = None
    until_ms: int | None = None


class BatchClaim(Struct, kw_only=True, omit_defaults=True):
    """Claim the due batches (at most ``limit``), or with ``schedule`` every batch of that
    schedule now (a manual trigger). ``execution_prefix``: each claimed batch's execution
    id is this prefix and a number."""

    execution_prefix: str
    limit: int
    timeout_ms: int
    lease_ms: int | None = None
    """A claim's deadline is now + lease_ms (the run renews it while it works, BatchRenew);
    None: now + timeout_ms."""
    schedule: str | None = None


class BatchRenew(Struct, kw_only=True):
    """The run ``execution_id`` of batch ``batch`` is alive: its claim's deadline moves to
    now + ``lease_ms``."""

    batch: str
    execution_id: str
    lease_ms: int


class TenantFailure(Struct, kw_only=True):
    tenant_id: str
    error: str


class BatchFinish(Struct, kw_only=True, omit_defaults=True):
    """The end of the run ``execution_id`` of batch ``batch``: its failed tenants go to
    the retry queue (``period_end_ms``: the period a retry of a usage report covers)."""

    batch: str
    execution_id: str
    status: str
    period_end_ms: int
    failed: list[TenantFailure] | None = None


class RetryClaim(Struct, kw_only=True, omit_defaults=True):
    """Take the due retry items (at most ``limit``) for ``lease_ms``; ``item`` names one
    (a retry by command, due or not)."""

    limit: int
    lease_ms: int
    token: str
    item: str | None = None


class RetryFinish(Struct, kw_only=True, omit_defaults=True):
    """The end of a retry: ``succeeded`` (the item leaves the queue) or ``failed``
    (back-off, or permanently failed past ``max_retries``)."""

    item: str
    token: str
    status: str
    error: str | None = None


class ScheduleControl(Struct, kw_only=True, omit_defaults=True):
    """``pause``, ``resume`` or ``rebalance`` a schedule (``schedule`` absent with
    ``rebalance``: every schedule); ``requeue``: a failed or waiting ``item`` due now with
    its tries reset."""

    action: str
    schedule: str | None = None
    item: str | None = None


class TenantRecord(Struct, kw_only=True, omit_defaults=True):
    """A tenant as PostgreSQL's ``tenants`` row keeps it, restored by ``devsched rebuild``
    (an override already past ``override_until_ms`` is left out by the script)."""

    tenant_id: str
    plan: str
    override_ms: int | None = None
    override_until_ms: int | None = None
    event_version: int | None = None
    created_at_ms: int | None = None


class ScheduleRestore(Struct, kw_only=True, omit_defaults=True):
    """A chunk of the schedules' state from PostgreSQL (``devsched rebuild``): each tenant
    registered and placed in a batch of each kind's schedule of its interval, as a new
    tenant would be (the batches are made anew, not restored as they were); each
    schedule in ``paused`` that exists paused; the change counter raised to ``version``
    at least. Emits no change (PostgreSQL has them)."""

    tenants: list[TenantRecord] | None = None
    paused: list[str] | None = None
    version: int = 0


class SchedulesCall(Struct, kw_only=True, omit_defaults=True):
    """One of: ``tenants``, ``override``, ``claim``, ``renew``, ``finish``, ``retry_claim``,
    ``retry_finish``, ``control``, ``restore``, ``dump``. Every call carries the tiers, the batch
    capacity, the stagger and the retry policy, so that the schedules of every tier exist
    and expired overrides are settled first."""

    prefix: str
    now_ms: int
    tiers: list[PlanTier]
    kinds: list[str]
    capacity: int
    stagger_ms: int
    backoff_ms: int
    backoff_factor: int
    max_retries: int
    event_ttl_s: int
    group: str
    tenants: list[TenantOp] | None = None
    override: TenantOverride | None = None
    claim: BatchClaim | None = None
    renew: BatchRenew | None = None
    finish: BatchFinish | None = None
    retry_claim: RetryClaim | None = None
    retry_finish: RetryFinish | None = None
    control: ScheduleControl | None = None
    restore: ScheduleRestore | None = None
    dump: bool = False
    members: bool = False
