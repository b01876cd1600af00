"""The stages by name, as the Procfile and `devsched worker NAME` know them."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.worker import Stage
from stages.bill import BillStage
from stages.context import StageContext
from stages.notify import NotifyStage
from stages.persist import PersistStage
from stages.quota import QuotaStage
from stages.select import SelectStage
from stages.timers import TimersStage

STAGES: dict[str, Callable[[StageContext], Stage]] = {
    "quota": QuotaStage,
    "select": SelectStage,
    "persist": PersistStage,
    "bill": BillStage,
    "notify": NotifyStage,
    "timers": TimersStage,
}
NEEDS_POSTGRES = frozenset({"persist", "bill"})
