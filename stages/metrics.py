"""The scheduler's own Prometheus metrics (the runtime's per-stage ones are in
``pipeline.metrics``); all on the default registry, served by the same exporter."""

from __future__ import annotations

from prometheus_client import Counter

AUTO_RELEASE = Counter("scheduler_auto_release_total", "Allocations closed by the system", ["reason"])
