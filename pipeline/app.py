"""What an application hands the runtime: its stages by name, and how to start it.

The runtime knows no stage by name. An application (the scheduler in ``stages``)
builds one :class:`Application`: its stages as :class:`StageSpec` (how to build
each from the application's context, whether it needs PostgreSQL, which process
it shares under ``run``, a background task such as a ticker), its Lua scripts
(loaded at start), its dead-letter stream, its settings type and migrations, and
the module whose command line starts it (for the worker processes the runner
spawns), and optionally how `up` brings its live state back into a Redis that
lost it. ``pipeline.service`` serves stages of it; ``pipeline.commands`` gives it
the generic commands (up, down, env, migrate, worker, run).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Any, Generic, TypeVar

import asyncpg
from redis.asyncio import Redis

from pipeline.clock import Clock
from pipeline.scripts import Script
from pipeline.settings import RuntimeSettings
from pipeline.worker import Stage


class RecoveryError(RuntimeError):
    """Raised by an application's ``recover`` when it cannot bring the live state back
    (the message says why and what to do); `up` and `run` print it and exit 1."""


C = TypeVar("C")
"""The application's context: what each of its stages is built from."""
S = TypeVar("S", bound=RuntimeSettings)
"""The application's settings type."""

StageTask = Callable[[C, asyncio.Event], Coroutine[Any, Any, None]]
"""A task that runs beside the workers of a process until the event is set."""


@dataclass(frozen=True)
class StageSpec(Generic[C]):
    """One stage as the runtime knows it."""

    name: str
    """Its name on the command line (`worker NAME`) and in the Procfile."""
    build: Callable[[C], Stage]
    needs_database: bool = False
    """Its process opens a PostgreSQL pool."""
    process_group: str = "main"
    """Under `run`, stages of one group share a process (unless `--split`)."""
    nice: int = 0
    """Niceness of its process under `run` (stages off the latency path yield the CPU)."""
    background: StageTask[C] | None = None
    """Runs in every process that serves this stage (e.g. a ticker)."""
    off: Callable[[Any], str] | None = None
    """Given the settings, why the stage has nothing to do ('' when it has): an off stage
    is not started (`run` leaves it out, `worker` serves the others, or waits for its
    signal when none is left), so it creates no consumer group and reads nothing."""

    def off_reason(self, settings: Any) -> str:
        """Why this stage is off under ``settings`` ('' when it runs)."""
        return self.off(settings) if self.off is not None else ""


@dataclass(frozen=True)
class Application(Generic[C, S]):
    name: str
    """The command's name (help texts, logs)."""
    module: str
    """`python -m MODULE ...` runs the application's command line."""
    stages: Sequence[StageSpec[C]]
    settings: Callable[[], S]
    """The settings from the environment."""
    context: Callable[[Redis, S, Clock, asyncpg.Pool | None], C]
    """Builds the context the stages of one process share."""
    dead_stream: Callable[[S], str]
    scripts: Sequence[Script[Any, Any]] = ()
    """Loaded into Redis when a process starts serving."""
    migrations: Callable[[], Traversable] | None = None
    """The folder of numbered SQL migrations, applied by `up`, `migrate` and `run`."""
    recover: Callable[[S], Coroutine[Any, Any, None]] | None = None
    """Run by `up` and `run` after migrating: makes sure Redis holds a live state the
    workers may serve from (brings it back when Redis came back without it, e.g. from
    the database; marks a fresh one); does nothing when it is there. May raise
    :class:`RecoveryError`."""

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def running_stages(self, names: Sequence[str], settings: S) -> list[str]:
        """``names`` without the stages that are off under ``settings``."""
        return [n for n in names if not self.stage(n).off_reason(settings)]

    def stage(self, name: str) -> StageSpec[C]:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(self.stage_names)}")

    def command(self, *args: str) -> list[str]:
        """The command line that runs this application's command with ``args``."""
        return [sys.executable, "-m", self.module, *args]
