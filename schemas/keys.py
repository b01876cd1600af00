"""Stream names, consumer-group names and Redis key names, in one place.

Device-side keys carry the hash tag ``{pool}``, user-side keys ``{u:ID}``, a
tenant's rate bucket ``{t:TENANT}``, so each family hashes to one slot. The Lua scripts build the same names from the
prefix (stages/lua/common.lua); this module is the reference both follow.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP_QUOTA = "quota"
GROUP_SELECT = "select"
GROUP_PERSIST = "persist"
GROUP_BILL = "bill"
GROUP_NOTIFY = "notify"
GROUP_TIMERS = "timers"
GROUP_EVENTS = "events"
GROUP_EXPORT = "export"
GROUP_WEBHOOK = "webhook"


@dataclass(frozen=True)
class Keys:
    prefix: str = "ds"

    # streams
    @property
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def admitted(self) -> str:
        return f"{self.prefix}:admitted"

    @property
    def changes(self) -> str:
        return f"{self.prefix}:changes"

    @property
    def ticks(self) -> str:
        return f"{self.prefix}:ticks"

    @property
    def events(self) -> str:
        """Inbound events from other systems (schemas/events.py), read by the events stage."""
        return f"{self.prefix}:events"

    @property
    def job_requests(self) -> str:
        """Manual job runs (schemas.messages.JobRunRequest), read by the timers stage."""
        return f"{self.prefix}:job_requests"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def notifications(self) -> str:
        return f"{self.prefix}:notifications"

    def sink_retry(self, sink: str) -> str:
        """An HTTP sink's retry queue: sorted set of schemas.runtime.RetryItem JSON, scored
        by when each is due."""
        return f"{self.prefix}:sink:{sink}:retry"

    def sink_replay(self, sink: str) -> str:
        """An HTTP sink's replay stream: a dead letter of the sink names it as its stream;
        its payload added here is sent again."""
        return f"{self.prefix}:sink:{sink}:replay"

    @property
    def sink_states(self) -> str:
        """Hash: HTTP sink name -> its circuit breaker's state (closed, open, half_open)."""
        return f"{self.prefix}:sink:breakers"

    @property
    def billing_backfill(self) -> str:
        """String: when the export stage's next backfill of never-exported ledger rows is
        due (ms of the clock); the process that moves it on runs the round."""
        return f"{self.prefix}:billing:backfill"

    @property
    def billing_seen(self) -> str:
        """Sorted set: user id -> when the export stage last saw it on the changes stream
        (ms); the users whose billing standing is kept fresh."""
        return f"{self.prefix}:billing:seen"

    def reply(self, client_id: str) -> str:
        return f"{self.prefix}:reply:{client_id}"

    def errors(self, group: str) -> str:
        """Hash entry id -> last error text of a failed delivery (with a TTL)."""
        return f"{self.prefix}:errors:{group}"

    # tracked jobs, tag {jobs}
    def job(self, name: str) -> str:
        """One hash per tracked job, its live state (stages/lua/jobs.lua): ``interval_ms``,
        ``next_run_ms``, ``paused``, ``running`` (the execution id holding the claim, or
        empty), ``started_ms``, ``deadline_ms``, ``manual``, ``attempt``, ``retries``,
        ``max_retries``, ``timeout_ms``, ``status``, ``last_run_ms``, ``last_status``."""
        return f"{self.prefix}:{{jobs}}:job:{name}"

    @property
    def jobs_known(self) -> str:
        """The names of the jobs whose hash (``job``) exists."""
        return f"{self.prefix}:{{jobs}}:known"

    def job_answer(self, request_id: str) -> str:
        """The answer to a manual job run, by request id (with a TTL)."""
        return f"{self.prefix}:{{jobs}}:answer:{request_id}"

    # global interval schedules, tag {sched} (stages/lua/schedules.lua names the rest)
    @property
    def sched_tenants(self) -> str:
        """Hash tenant id -> plan: the tenant registry. Beside it, under the same tag:
        ``tenant:<id>`` (plan, version, override, its batch per kind ``b:<kind>``),
        ``schedules`` (set of schedule ids ``<kind>:<tier>``), ``schedule:<id>`` (kind,
        tier, interval_ms, paused, tenants, fixed, last_run_ms),
        ``batches:<id>`` (its batch numbers), ``batch:<id>#<n>`` (size, offset_ms,
        next_run_ms, last_run_ms, running, started_ms, deadline_ms, period_end_ms, rerun,
        manual, last_status), ``members:<id>#<n>`` (its tenants), ``due`` (batch -> next
        run ms), ``running`` (claimed batch -> claim deadline ms), ``overrides`` (tenant ->
        until ms), ``retry`` (item ``<kind>|<tenant>`` -> due ms), ``retry:<item>`` (tries,
        error, period_end_ms), ``failed`` (item -> JSON), ``versions`` (tenant -> last
        event version), ``event:<id>``, ``change_version`` (the counter of the versions of
        TenantChange and ScheduleChange)."""
        return f"{self.prefix}:{{sched}}:tenants"

    def sched(self, name: str) -> str:
        """A key of the schedules' state (see ``sched_tenants``)."""
        return f"{self.prefix}:{{sched}}:{name}"

    # device side, tag {pool}
    @property
    def pools(self) -> str:
        return f"{self.prefix}:{{pool}}:pools"

    def free(self, pool: str) -> str:
        return f"{self.prefix}:{{pool}}:free:{pool}"

    def device(self, device_id: str) -> str:
        """One hash per device: its spec, ``status`` (available, allocated, or down:
        failed, maintenance, stopped, error, deleted), ``alloc`` (the active allocation,
        or empty), ``last_alloc``, ``version`` and the last applied ``event_version``. A
        deleted device keeps its hash (so older events stay stale) but leaves the
        ``devices`` set and its free pool."""
        return f"{self.prefix}:{{pool}}:dev:{device_id}"

    @property
    def devices(self) -> str:
        return f"{self.prefix}:{{pool}}:devices"

    @property
    def device_ids(self) -> str:
        """The ids of ``devices`` in a sorted set, every score 0 (so in id order): what
        ``devices list`` pages through, from a cursor, without reading the others."""
        return f"{self.prefix}:{{pool}}:device_ids"

    def allocation(self, allocation_id: str) -> str:
        return f"{self.prefix}:{{pool}}:alloc:{allocation_id}"

    @property
    def expiry(self) -> str:
        """Every active allocation scored by its expires-at: the expiry schedule, and the
        set of active allocations (every allocation has an expiry)."""
        return f"{self.prefix}:{{pool}}:expiry"

    def device_event(self, event_id: str) -> str:
        """A device event's id, once applied (with a TTL): a second delivery changes nothing."""
        return f"{self.prefix}:{{pool}}:evt:{event_id}"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:{{pool}}:stats"

    @property
    def strategy(self) -> str:
        """The allocation strategy in force: field ``*`` the global one, a pool's name
        that pool's (set by ``devsched strategy set``; select.lua reads it once per call).
        Configuration, not live state: a rebuild keeps it."""
        return f"{self.prefix}:{{pool}}:strategy"

    @property
    def smart_model(self) -> str:
        """The smart strategy's model (stages/smart.py): ``u:<user>`` typical seconds
        held, ``d:<device>`` failures per day held, ``m:<model>`` demand by name; written
        whole by the ``refresh_model`` job, read by select.lua."""
        return f"{self.prefix}:{{pool}}:smart"

    @property
    def host_active(self) -> str:
        """Host -> how many of its devices an active allocation holds (the load that
        least_loaded and bin_pack weigh), kept by the scripts that allocate and close."""
        return f"{self.prefix}:{{pool}}:host_active"

    @property
    def round_robin(self) -> str:
        """Scope (a pool, or ``*`` for requests without one) -> the device round_robin
        gave last."""
        return f"{self.prefix}:{{pool}}:round_robin"

    @property
    def state(self) -> str:
        """The state marker (a hash: ``epoch``, ``by``, ``at_ms``; see stages/state.py):
        present exactly when Redis holds a live state that `up`, a rebuild or a fresh
        start established. In the ``{pool}`` slot, beside the devices it vouches for."""
        return f"{self.prefix}:{{pool}}:state"

    @property
    def replies_held(self) -> str:
        """Replies select wrote but delivers only after WAIT said DEVSCHED_REPLICAS_TO_ACK
        replicas have the batch (fields ``s`` reply stream, ``d`` reply, ``t`` TTL s)."""
        return f"{self.prefix}:{{pool}}:replies_held"

    @property
    def queue(self) -> str:
        """The wait queue: ``<user id> <request id>`` scored by arrival ms minus priority
        times DEVSCHED_QUEUE_AGING_STEP_MS (lowest first)."""
        return f"{self.prefix}:{{pool}}:queue"

    @property
    def waiters(self) -> str:
        """``<user id> <request id>`` -> the waiting request's record (JSON: the request's
        fields, its hold, priority, queued_at_ms, wait_until_ms)."""
        return f"{self.prefix}:{{pool}}:waiters"

    @property
    def queue_deadline(self) -> str:
        """``<user id> <request id>`` scored by when its wait ends (timers time it out)."""
        return f"{self.prefix}:{{pool}}:queue_deadline"

    # reservations, device side (stages/lua/bookings.lua)
    def reservation(self, reservation_id: str) -> str:
        """One hash per reservation: ``reservation_id``, ``request_id``, ``user_id``,
        ``tenant_id``, ``device_id``, ``pool``, ``start_ms``, ``end_ms``, ``status``
        (booked, active, completed, cancelled, no_show), ``allocation_id`` (once active),
        ``reason``, ``created_at_ms``, ``claimed_at_ms``, ``claim_by_ms``,
        ``ended_at_ms``, ``version``. An ended one expires after DEVSCHED_RELEASED_TTL_S
        (PostgreSQL keeps it)."""
        return f"{self.prefix}:{{pool}}:rsv:{reservation_id}"

    def bookings(self, device_id: str) -> str:
        """The device's bookings (reservations booked or active), scored by start ms;
        never two overlapping."""
        return f"{self.prefix}:{{pool}}:bookings:{device_id}"

    @property
    def booked(self) -> str:
        """Device id -> how many bookings it has (only devices with some): select reads
        its length once per call and skips every booking check while it is 0."""
        return f"{self.prefix}:{{pool}}:booked"

    @property
    def reservation_starts(self) -> str:
        """Booked reservations scored by start ms (activate_reservations takes the due)."""
        return f"{self.prefix}:{{pool}}:rsv_starts"

    @property
    def reservation_claims(self) -> str:
        """Active reservations not yet claimed, scored by their claim deadline
        (cancel_no_shows ends the ones past it)."""
        return f"{self.prefix}:{{pool}}:rsv_grace"

    @property
    def reservations_active(self) -> str:
        """Active reservations scored by end ms (complete_reservations completes those
        whose allocation ended)."""
        return f"{self.prefix}:{{pool}}:rsv_active"

    # user side, tag {u:ID}
    def user(self, user_id: str) -> str:
        """One hash per user, read and written in one step by the scripts: the quota
        (``status``, ``expires_at_ms``, ``max_*``, ``total_*``, ``version``), the usage
        (``used_devices``, ``used_cpu``, ``used_mem``, ``used_sto``), a
        ``hold:<request id>`` per admitted request select has not decided yet, an
        ``alloc:<allocation id>`` ("cpu mem sto") per active allocation, and the device
        and host of the user's last allocation (``last_device``, ``last_host``: the
        affinity strategy's memory). Events add
        ``user_status`` (active/suspended/deleted, from user.* events) and
        ``billing_status`` (ok/overdue/suspended, from billing.* events), of which
        ``status`` is the effect, the last applied ``user_event_version`` and
        ``billing_event_version``, and ``billing_observed_ms`` (the newest observation
        of the ok/overdue part: docs/wire-format.md, "Which billing source wins"); the
        export stage adds ``billing_balance`` and ``billing_checked_ms``."""
        return f"{self.prefix}:{{u:{user_id}}}:user"

    def user_event(self, user_id: str, event_id: str) -> str:
        """A user or billing event's id, once applied (with a TTL)."""
        return f"{self.prefix}:{{u:{user_id}}}:evt:{event_id}"

    def payment_failures(self, user_id: str) -> str:
        """The user's count of failed payments (billing.payment_failed), expiring
        DEVSCHED_PAYMENT_FAILURE_TTL_S after the last one."""
        return f"{self.prefix}:{{u:{user_id}}}:payfail"

    def user_rate(self, user_id: str) -> str:
        """The user's token bucket of allocate requests (``tokens`` in thousandths of a
        token, ``at_ms`` when they were counted), while
        DEVSCHED_RATE_USER_PER_S is set; it expires once it would be full again."""
        return f"{self.prefix}:{{u:{user_id}}}:rate"

    # tenant side, tag {t:TENANT}

    def tenant_rate(self, tenant_id: str) -> str:
        """The tenant's token bucket (DEVSCHED_RATE_TENANT_PER_S), as ``user_rate``. Its
        own slot: see quota.lua for how the check splits on Redis Cluster."""
        return f"{self.prefix}:{{t:{tenant_id}}}:rate"

    @property
    def users(self) -> str:
        return f"{self.prefix}:users"
