"""asyncio helpers for long-running loops.

On Python 3.11, a `cancel()` that lands while redis-py finishes a command
through `asyncio.wait_for` can be swallowed (fixed in 3.12): the command returns
normally and the task keeps running. Background loops therefore check
`cancelling()` on every turn, and owners stop them with `cancel_and_wait`, which
repeats the cancel until the task is really done.

A background loop hands every failure to its `common.outage.Outage` and goes on; one
that ends anyway (a bug past its guard) must not do so silently: `background()`
starts a loop with a callback that logs its death (one error line, with the traceback).

`held()` keeps a task in its owner's set until it is done.

Also here: `SingleFlight`, one run of a lookup shared by every caller that asks for
it meanwhile, and `Backoff`, the delay between a loop's retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from common.log import get_logger

log = get_logger("switchboard.tasks")

T = TypeVar("T")


def cancelling() -> bool:
    """True when the current task has been asked to cancel."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(task: asyncio.Task[Any] | None, timeout: float = 10.0) -> None:
    """Cancel `task` (again and again if a cancel is swallowed) and wait for it to end."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait([task], timeout=0.2)
    if task.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()


def background(coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
    """Start a background loop as a task whose death by an exception is logged: an error
    line naming the task, with the traceback (a loop may also end by returning, as the
    worker's do when it stops, or be cancelled: both are quiet)."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_ended)
    return task


def held(
    tasks: set[asyncio.Task[Any]], work: Awaitable[Any], *, name: str | None = None
) -> asyncio.Task[Any]:
    """`work` run as a task held in `tasks` until it is done (asyncio holds tasks only
    weakly: one nobody holds may be collected mid-run); the owner cancels what `tasks`
    still holds when it stops."""
    task = asyncio.ensure_future(work)
    if name is not None:
        task.set_name(name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


def _ended(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()  # retrieved now: asyncio will not complain at exit
    if exc is not None:
        fields = {"task": task.get_name(), "error": repr(exc)}
        log.error("background task died", extra={"fields": fields}, exc_info=exc)


class SingleFlight(Generic[T]):
    """One run of a lookup per key at a time, its result (or error) shared by every
    caller that asks for the same key meanwhile; the first caller after the run ends
    starts a new one.

    The run is a task of its own: a caller cancelled leaves it to the others, and it
    goes on even when every caller has left (so a lookup is never cut midway by one
    caller's timeout). A run cancelled (or ending in `CancelledError`) cancels every
    caller waiting on it: they get `CancelledError`, as from any awaited task."""

    def __init__(self) -> None:
        self._runs: dict[Hashable, asyncio.Task[T]] = {}

    async def run(self, key: Hashable, lookup: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """`lookup()`'s result (or error), shared with the run for `key` under way."""
        run = self._runs.get(key)
        if run is None:
            run = self._runs[key] = asyncio.create_task(lookup())
            run.add_done_callback(functools.partial(self._ended, key))
        return await asyncio.shield(run)

    async def close(self) -> None:
        """Cancel the runs under way and wait for them to end (their callers get
        `CancelledError`): for an owner that is closing, so that no run outlives it."""
        for run in list(self._runs.values()):
            await cancel_and_wait(run)

    def _ended(self, key: Hashable, run: asyncio.Future[T]) -> None:
        del self._runs[key]
        if not run.cancelled():
            run.exception()  # retrieved: every caller may have left (asyncio would warn)


class Backoff:
    """Exponential delay between retries of a loop that talks to Redis.

    `await backoff.wait()` after a failure sleeps 50 ms, then 100 ms, ... up to
    `cap`; `backoff.reset()` after a success starts over. `wake()` is for another
    loop that just reached Redis, so that this one does not lag up to `cap` behind
    Redis's return: it ends the wait under way, or, if this loop is trying again
    right then, lets it try once more at once should that try fail (it may have
    begun before Redis answered).
    """

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base, self.cap = base, cap
        self.delay = base
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False  # the next wait is skipped

    def reset(self) -> None:
        self.delay = self.base
        self._woken = False

    @property
    def failing(self) -> bool:
        """The loop has failed since its last success (or `wake()`)."""
        return self.delay > self.base

    def wake(self) -> None:
        """Redis answers again: end the wait under way, or skip the next one if the
        loop failed since its last success; start the delays over."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        elif self.failing:
            self._woken = True
        self.delay = self.base

    async def wait(self) -> None:
        if self._woken:
            self._woken = False
            return
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(delay, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
