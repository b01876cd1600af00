"""The scheduler as the runtime drives it: its stages by name, settings and scripts.

:data:`APP` is the one place that names the stages (the Procfile's
`devsched worker NAME`, `devsched run`, the tests' in-process pipeline): how each
is built from a :class:`~stages.context.StageContext`, which need PostgreSQL, and
how `devsched run` groups them into processes: the request path (quota, select)
in one process at normal priority, the stages behind the reply (persist, bill,
notify, timers) and the events from other systems (events) in another at nice 5,
so that on a few cores they yield the CPU to the request path. The timers stage
brings the ticker with it; the HTTP sinks (export: usage to the billing service and
users' billing standings back; webhook: notifications) bring their retry loops. `devsched up` rebuilds the live state from PostgreSQL
when Redis came back without it (``stages.tools.rebuild.recover``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pipeline.app import Application, StageSpec
from pipeline.clock import Clock
from pipeline.service import serve as serve_app
from schemas.keys import Keys
from sql import migrations
from stages.bill import BillStage
from stages.context import StageContext
from stages.events import EventsStage
from stages.export import export_stage, run_export_background
from stages.notify import NotifyStage
from stages.persist import PersistStage
from stages.quota import QuotaStage
from stages.scripts import ALL
from stages.select import SelectStage
from stages.settings import Settings
from stages.timers import TimersStage, run_ticker
from stages.tools.rebuild import recover
from stages.webhook import run_webhook_retries, webhook_stage

REQUEST_PATH = "request_path"
BEHIND = "behind"
BEHIND_NICE = 5
"""Niceness of the processes of the stages behind the reply."""

APP: Application[StageContext, Settings] = Application(
    name="devsched",
    module="stages.tools.cli",
    stages=(
        StageSpec("quota", QuotaStage, process_group=REQUEST_PATH),
        StageSpec("select", SelectStage, process_group=REQUEST_PATH),
        StageSpec("persist", PersistStage, needs_database=True, process_group=BEHIND,
                  nice=BEHIND_NICE),
        StageSpec("bill", BillStage, needs_database=True, process_group=BEHIND, nice=BEHIND_NICE),
        StageSpec("notify", NotifyStage, process_group=BEHIND, nice=BEHIND_NICE),
        StageSpec("timers", TimersStage, needs_database=True, process_group=BEHIND, nice=BEHIND_NICE,
                  background=run_ticker),
        StageSpec("events", EventsStage, process_group=BEHIND, nice=BEHIND_NICE),
        StageSpec("export", export_stage, needs_database=True, process_group=BEHIND,
                  nice=BEHIND_NICE, background=run_export_background,
                  off=lambda s: "" if s.billing_url else "DEVSCHED_BILLING_URL is unset"),
        StageSpec("webhook", webhook_stage, process_group=BEHIND, nice=BEHIND_NICE,
                  background=run_webhook_retries,
                  off=lambda s: "" if s.webhook_url else "DEVSCHED_WEBHOOK_URL is unset"),
    ),
    settings=Settings.from_env,
    context=StageContext,
    dead_stream=lambda settings: Keys(settings.prefix).dead,
    scripts=ALL,
    migrations=migrations,
    recover=recover,
)


async def serve(
    names: Sequence[str], settings: Settings, clock: Clock | None = None, *,
    stop: asyncio.Event | None = None, install_signals: bool = True,
) -> None:
    """Serve the named stages of the scheduler in this process (see pipeline.service)."""
    await serve_app(APP, names, settings, clock, stop=stop, install_signals=install_signals)
