"""Prometheus metrics of the stream runtime, labelled by stage, and how they are served.

Counters only grow; ``pending``, ``lag`` and ``behind_seconds`` are sampled by each
worker on its reclaim interval from XPENDING / XINFO GROUPS. An application's own metrics live
with its stages, on the same default registry, so one exporter serves both.

Latency on the request path is measured without adding work per entry that a batch
would not pay anyway: ``queue_wait`` (how long an entry sat in its stream before a
worker read it: the read time minus the time in its entry id) is computed per entry
but recorded per batch (:func:`observe_many`: one bucket search per value, then one
increment per bucket touched); ``batch_seconds`` is the handling time, per batch,
which is also the handling time of each entry in it (a batch is handled and acked
as one).

**Across processes.** A process alone (``worker``, ``run --in-process``) serves its
own registry on ``DEVSCHED_METRICS_PORT``. Under ``run`` (several worker processes)
the supervisor owns the port: it points every child at one folder
(``PROMETHEUS_MULTIPROC_DIR``, emptied when ``run`` starts, see :func:`multiprocess_dir`),
where prometheus-client's multiprocess mode keeps each process's values in a small
memory-mapped file, and serves their sum (:func:`serve_multiprocess`); children bind
no port. Counters and histograms add up over processes (a restarted child's counts
stay counted); the sampled gauges show the most recent sample of a live process.
"""

from __future__ import annotations

import os
import shutil
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""The variable prometheus-client reads (at import) to keep values in shared files."""

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                   2.5, 10.0)
"""Seconds; from a fraction of a millisecond (the request path) to a backlog's wait."""

CONSUMED = Counter("devsched_stage_consumed_total", "Entries read by a stage", ["stage"])
HANDLED = Counter("devsched_stage_handled_total", "Entries handled and acked", ["stage"])
FAILED = Counter("devsched_stage_failed_total", "Failed deliveries (left pending)", ["stage"])
DEAD_LETTERED = Counter("devsched_stage_dead_lettered_total", "Entries moved to the dead stream", ["stage"])
RECLAIMED = Counter("devsched_stage_reclaimed_total", "Entries reclaimed from idle consumers", ["stage"])
BATCH_SECONDS = Histogram(
    "devsched_stage_batch_seconds",
    "Time to handle one batch (each entry of it is handled in that time)",
    ["stage"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
QUEUE_WAIT = Histogram(
    "devsched_stage_queue_wait_seconds",
    "Time an entry waited in its stream before the stage read it (read time - entry id time)",
    ["stage"], buckets=LATENCY_BUCKETS,
)
PENDING = Gauge("devsched_stage_pending", "Entries delivered but not acked", ["stage", "stream"],
                multiprocess_mode="livemostrecent")
LAG = Gauge("devsched_stage_lag", "Entries not yet delivered to the group", ["stage", "stream"],
            multiprocess_mode="livemostrecent")
BEHIND = Gauge(
    "devsched_stage_behind_seconds",
    "Age of the oldest entry the group has not acked (pending or not yet delivered)",
    ["stage", "stream"], multiprocess_mode="livemostrecent",
)
BREAKER_STATE = Gauge(
    "devsched_breaker_state",
    "State of a circuit breaker: 0 closed, 1 half-open, 2 open", ["breaker"],
    multiprocess_mode="livemax",
)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
"""The values of ``devsched_breaker_state``."""


def set_breaker_state(breaker: str, state: str) -> None:
    """Publish the state (``closed``, ``half_open``, ``open``) of the breaker ``breaker``."""
    BREAKER_STATE.labels(breaker).set(BREAKER_STATES[state])


class OutcomeCounter:
    """A counter of things done, by ``type`` and ``outcome`` (events by event type and
    status, job runs by job and status, exports by kind and result): the children are
    bound once per pair, so counting costs one dict lookup and one increment."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self._children: dict[tuple[str, str], Any] = {}

    def count(self, type_: str, outcome: str, amount: float = 1) -> None:
        child = self._children.get((type_, outcome))
        if child is None:
            child = self._children[type_, outcome] = self.counter.labels(type_, outcome)
        child.inc(amount)


def outcome_counter(name: str, documentation: str, type_label: str = "type",
                    outcome_label: str = "status") -> OutcomeCounter:
    """A new :class:`OutcomeCounter` exported as ``<name>_total{type_label, outcome_label}``."""
    return OutcomeCounter(Counter(name, documentation, [type_label, outcome_label]))


def observe_many(child: Any, values: Iterable[float]) -> None:
    """Record ``values`` in the histogram child ``child`` as ``observe`` would, one by
    one, but with one increment per bucket touched and one of the sum: a batch's
    values cost a bucket search each, not a (locked, in multiprocess mode) write each."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None:  # another client version
        for value in values:
            child.observe(value)
        return
    counts: dict[int, int] = {}
    added = 0.0
    for value in values:
        i = bisect_left(bounds, value)
        counts[i] = counts.get(i, 0) + 1
        added += value
    if not counts:
        return
    total.inc(added)
    for i, n in counts.items():
        buckets[i].inc(n)


def serve(port: int) -> None:
    """Serve this process's metrics on ``port`` (0: not at all). A child of ``run``
    (``PROMETHEUS_MULTIPROC_DIR`` set) binds nothing: the supervisor serves the sum."""
    if port and not os.environ.get(MULTIPROC_ENV):
        start_http_server(port)


def multiprocess_dir(data_dir: Path) -> Path:
    """The folder the processes of one ``run`` share their values in, emptied: what a
    previous run left there must not be summed with this one."""
    folder = data_dir.absolute() / "metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    return folder


def serve_multiprocess(port: int, folder: Path) -> None:
    """Serve, on ``port``, the sum of what every process writing to ``folder`` counted
    (prometheus-client's multiprocess collector, read at each scrape)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    start_http_server(port, registry=registry)


def process_exited(folder: Path, pid: int) -> None:
    """Forget the live gauges of a worker process that exited (its counters stay summed)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path=str(folder))  # type: ignore[no-untyped-call]
