"""Background tasks that must live as long as their process.

A control tail that died silently left an instance serving but deaf to rollbacks. Every
long-lived task (control tail, heartbeats, ramp ticks, the committer) is started through a
:class:`Supervisor`: if one ends for any reason but our own shutdown, the cause is logged, the
owner is told (it stops and reports not ready), and the process exits non-zero so that an
orchestrator restarts it. Half alive is worse than dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..errors import SidecarError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """Which background task ended, and why."""

    task: str
    reason: str
    at: float
    #: The exception that ended it (None when it returned or was cancelled).
    error: BaseException | None = None

    def __str__(self) -> str:
        return f"background task {self.task} died: {self.reason}"


class BackgroundTaskFailed(SidecarError):
    """A background task the process needs died; the process stops and exits non-zero (the
    orchestrator restarts it, which is the fix: state is rebuilt from Kafka at start-up)."""

    retriable = True

    def __init__(self, failure: TaskFailure) -> None:
        super().__init__(f"{failure}; stopped so that it can be restarted")
        self.failure = failure


class Supervisor:
    """Starts named tasks and reports the first one that ends on its own."""

    def __init__(self, component: str, on_failure: Callable[[TaskFailure], None]) -> None:
        self.component = component
        self._on_failure = on_failure
        self._tasks: list[asyncio.Task[Any]] = []
        #: Tasks we cancelled ourselves: their end is no failure.
        self._retired: set[asyncio.Task[Any]] = set()
        #: Tasks allowed to return (see :meth:`spawn`).
        self._finite: set[asyncio.Task[Any]] = set()
        #: The first failure (None while every task runs).
        self.failure: TaskFailure | None = None

    def spawn(
        self, coro: Coroutine[Any, Any, Any], name: str, *, finite: bool = False
    ) -> asyncio.Task[Any]:
        """Start ``coro`` as task ``name``. A ``finite`` task (a restore, a catch-up) may
        return: only an exception (or a cancellation not ours) is a failure."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        if finite:
            self._finite.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if task in self._retired:
            self._retired.discard(task)
            return
        if task in self._finite:
            self._finite.discard(task)
            self._tasks = [t for t in self._tasks if t is not task]
            if not task.cancelled() and task.exception() is None:
                return
        if task.cancelled():
            reason = "cancelled"
            error: BaseException | None = None
        else:
            error = task.exception()
            reason = (
                f"{type(error).__name__}: {error}"
                if error is not None
                else "returned (it should run until the process stops)"
            )
        failure = TaskFailure(task.get_name(), reason, time.time(), error)
        # Our own errors say what happened and what to do: their traceback (one per task, e.g.
        # every task's store on a full disk) would bury that line; it stays at debug level.
        ours = isinstance(error, SidecarError)
        log.error(
            "%s: %s; stopping so that the process is restarted",
            self.component,
            failure,
            exc_info=None if ours else error,
        )
        if ours:
            log.debug("%s: %s failed", self.component, task.get_name(), exc_info=error)
        if self.failure is None:
            self.failure = failure
            self._on_failure(failure)

    async def cancel(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Cancel ``tasks`` (their ends are not failures) and wait for them."""
        for task in tasks:
            if not task.done():
                self._retired.add(task)
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = [t for t in self._tasks if t not in tasks]

    async def stop(self) -> None:
        """Cancel every task and wait for them."""
        await self.cancel(list(self._tasks))

    def raise_failure(self) -> None:
        """Raise if a task died: its own error when it is one of ours (it says what to do),
        else :class:`BackgroundTaskFailed`."""
        failure = self.failure
        if failure is None:
            return
        if isinstance(failure.error, SidecarError):
            raise failure.error
        raise BackgroundTaskFailed(failure)
