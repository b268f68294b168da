"""Supervised background tasks: a task that fails is logged with its traceback, counted, and ends
the process (the systemd units restart it), instead of stopping replication silently.

A component spawns its long-running tasks (outbox, replicator, key follower, cache server,
housekeeping) through the process's :class:`Supervisor`; the role's main loop waits on
``supervisor.failed`` beside its stop signal and exits non-zero when it is set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from prometheus_client import Counter

from sessionbus.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = ["Supervisor"]


class Supervisor:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self._failures: Counter = (metrics or Metrics()).tasks.failures
        self.failed = asyncio.Event()
        self.failure: str | None = None  # "NAME failed: ExcType", the first failure
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task; ``name`` is a fixed label (a metric label value)."""
        task = asyncio.get_running_loop().create_task(coro, name=f"sessionbus:{name}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, name))
        return task

    def _done(self, task: asyncio.Task[Any], name: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self.fail(name, exc)

    def fail(self, name: str, exc: BaseException) -> None:
        """Report a failure of something that is not a task (a listener's callback)."""
        log.error("%s failed; stopping the process", name, exc_info=exc)
        self._failures.labels(name).inc()
        if self.failure is None:
            self.failure = f"{name} failed: {type(exc).__name__}"  # the log has the traceback
        self.failed.set()

    async def cancel_all(self) -> None:
        """Cancel every task still running and wait for them (shutdown)."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_stop(self, stop: asyncio.Event) -> bool:
        """Wait for ``stop`` or a failed task; True when a task failed."""
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.failed.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        return self.failed.is_set()
