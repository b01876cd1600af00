"""Run stage workers: several in one event loop, or one process per worker.

In one process, every worker gets its own blocking-read connection and shares
one command connection pool; SIGTERM or SIGINT sets each worker's stop flag,
every worker finishes the batch in hand, and the process exits. The process
supervisor starts the application's ``worker NAME...`` children (the command line
comes from the :class:`~pipeline.app.Application`), restarts one that crashes (with
a back-off), and on SIGTERM passes it on and waits for them to drain. A child that
refuses its configuration (exit status ``EX_CONFIG``, e.g. a Redis that may evict
keys) is not restarted: the supervisor stops the others and exits with that status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from pipeline.clock import Clock
from pipeline.connections import blocking_reader
from pipeline.durability import EX_CONFIG
from pipeline.settings import RuntimeSettings
from pipeline.worker import Stage, StageWorker

if TYPE_CHECKING:
    from pipeline.app import Application

log = logging.getLogger("devsched.runner")

Background = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
DRAIN_TIMEOUT_S = 15.0
"""How long the supervisor waits for children to drain before killing them."""


async def run_workers(
    stages: Sequence[Stage], redis: Redis, settings: RuntimeSettings, clock: Clock, *,
    dead_stream: str, background: Sequence[Background] = (), stop: asyncio.Event | None = None,
    install_signals: bool = True,
) -> None:
    stop = stop or asyncio.Event()
    readers = [blocking_reader(settings) for _ in stages]
    workers = [
        StageWorker(stage, redis, reader, settings, clock, dead_stream=dead_stream)
        for stage, reader in zip(stages, readers)
    ]
    if install_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    async def watch() -> None:
        await stop.wait()
        for w in workers:
            w.stop()

    tasks = [asyncio.create_task(w.run()) for w in workers]
    tasks += [asyncio.create_task(job(stop)) for job in background]
    if not tasks:  # every stage of this process is off: stay until told to stop
        async def idle() -> None:
            await stop.wait()
        tasks.append(asyncio.create_task(idle()))
    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await watcher
        for reader in readers:
            await reader.aclose()


def supervise(commands: Sequence[list[str]], *, restart: bool = True,
              exited: Callable[[int], None] | None = None) -> int:
    """Run child processes until SIGTERM/SIGINT; restart crashed ones. ``exited`` is
    told the pid of each child that ended (e.g. to forget its live gauges)."""
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children = [subprocess.Popen(cmd) for cmd in commands]
    backoff = [0.5] * len(children)
    status = 0
    while not stopping:
        time.sleep(0.2)
        for i, child in enumerate(children):
            code = child.poll()
            if code is not None and exited is not None:
                exited(child.pid)
            if code == EX_CONFIG:
                log.error("worker %s refused its configuration; stopping", commands[i])
                stopping, status = True, EX_CONFIG
            elif code is not None and not stopping and restart:
                log.error("worker %s exited with %s; restarting", commands[i], code)
                time.sleep(backoff[i])
                backoff[i] = min(backoff[i] * 2, 10.0)
                children[i] = subprocess.Popen(commands[i])
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return status


def child_env(settings: RuntimeSettings, **extra: str) -> dict[str, str]:
    """This process's environment with the resolved servers and prefix for children."""
    env = dict(os.environ, REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url,
               DEVSCHED_PREFIX=settings.prefix)
    env.update(extra)
    return env


def spawn_run(app: Application[Any, Any], settings: RuntimeSettings, workers: int,
              **extra_env: str) -> subprocess.Popen[bytes]:
    """Start the application's `run --workers N` (every stage) as a child on these servers."""
    return subprocess.Popen(
        app.command("run", "--workers", str(workers)),
        env=child_env(settings, **extra_env), stdout=subprocess.DEVNULL,
    )


def stop_run(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Stop a child started by spawn_run: SIGTERM (its workers finish their batches),
    then SIGKILL if it is still there after ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def worker_commands(app: Application[Any, Any], names: Sequence[str], *, workers: int = 1,
                    split: bool = False) -> list[list[str]]:
    """The worker processes that serve ``names``: stages of one process group share a
    process (one per stage with ``split``), ``workers`` copies of each, each at the
    lowest niceness among its stages."""
    specs = [app.stage(n) for n in names]
    groups: dict[str, list[str]] = {}
    for spec in specs:
        groups.setdefault(spec.name if split else spec.process_group, []).append(spec.name)
    commands = []
    for members in groups.values():
        nice = min(app.stage(n).nice for n in members)
        niceness = ["--nice", str(nice)] if nice else []
        commands += [app.command("worker", *niceness, *members) for _ in range(workers)]
    return commands
