"""The rare path of `common.client_io`: what the caller of an enqueue that was not
taken gets, and when.

Redis down or refusing the write: a `ServiceUnavailable` naming the kind of failure
(`redis_failed`). The enqueue script refusing it: for "no live instance", a
`ServiceUnavailable` (503), or a `MethodNotFound` (404) for a service nobody knows
(one catalog lookup, shared by the calls failing meanwhile); for a backlog over its
bound, an `Overloaded`. "No live instance" just after the client lost touch with
Redis is first held by the rejoin grace (`common.rejoin`); just after Redis closed a
connection of the client's in order, once the client has asked whether Redis
restarted (`common.lost_touch`). What needs Redis runs off the writer's loop
(`_off_loop`), in tasks that `RpcClient.close()` ends.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from common import constants
from common.aio import SingleFlight, cancelling
from common.errors import MethodNotFound, Overloaded, ServiceUnavailable, quoted
from common.lost_touch import LostTouch
from common.protocol import NO_INSTANCE, OVER_BACKLOG
from common.redis_failures import REDIS_DOWN_OR_REFUSING, redis_failure, redis_failure_message
from common.rejoin import Rejoin

if TYPE_CHECKING:
    from common.client_io import Enqueue


def redis_failed(exc: Exception) -> Exception:
    """The caller's error for an enqueue Redis did not take: `ServiceUnavailable` when
    Redis is down or refusing (`common.redis_failures`), its message naming the kind
    only ("redis unreachable", "redis refused the write: out of memory"): redis-py's
    text names Redis's address, so it is the error's `__cause__` (for the logs) alone.
    An error reply of no known kind (a bug, bad data) is `exc` itself."""
    kind = redis_failure(exc)
    if kind is None:
        return exc
    error = ServiceUnavailable(redis_failure_message(exc, kind))
    error.__cause__ = exc
    return error


class ClientRefusals:
    """The refused enqueues' half of `ClientIO`; `RpcClient` sets the state declared here."""

    redis: aioredis.Redis
    _settling: dict[asyncio.Task[None], Enqueue]  # `_off_loop`'s tasks, and their enqueue
    _reached: set[str]  # services a call was enqueued to (never "unknown" after)
    _touch: LostTouch  # when this client last lost touch with Redis
    _rejoin: Rejoin  # calls told "no live instance" just after an outage
    _catalog_lookups: SingleFlight[bool]  # one catalog lookup per service at a time

    async def _raise_for(self, entry: Any, service: str, instance: str | None) -> None:
        error = await self._error_for(entry, service, instance)
        if error is not None:
            raise error

    async def _error_for(self, entry: Any, service: str, instance: str | None) -> Exception | None:
        """The error an enqueue script's result stands for, or None for an entry id."""
        if entry == NO_INSTANCE:
            if instance:
                return ServiceUnavailable(
                    f"instance {quoted(instance)} of {quoted(service)} is not live"
                )
            # A service reached before is not unknown, even with the catalog gone (Redis
            # restarted without its data, its workers not registered again yet): no
            # lookup, which a call given up just before its deadline has no time for.
            if service not in self._reached:
                try:
                    # Shared by the calls failing meanwhile (those a rejoin grace held
                    # end together): one lookup, not one per call.
                    lookup = functools.partial(self._cataloged, service)
                    known = await self._catalog_lookups.run(service, lookup)
                except REDIS_DOWN_OR_REFUSING as exc:
                    return redis_failed(exc)
                if not known:
                    return MethodNotFound(f"unknown service {quoted(service)}")
            return ServiceUnavailable(f"no live instance of {quoted(service)}")
        if entry == OVER_BACKLOG:
            return Overloaded(f"{quoted(service)} has more calls queued than its bound")
        return None

    async def _cataloged(self, service: str) -> bool:
        return bool(await self.redis.hexists(constants.CATALOG, service))

    async def _after_close(self, item: Enqueue) -> None:
        """Hold `item`, refused for "no live instance" just after Redis closed a connection
        of ours, if Redis restarted then (`common.lost_touch`); fail it at once otherwise,
        and if the check itself fails (a run cancelled under it): never left unsettled."""
        parked = False
        try:
            await self._touch.check_closes()
            parked = self._rejoin.park(item)
        finally:
            if not parked and not cancelling():  # cancelled: `close()` fails it
                self._give_up(item)

    def _give_up(self, item: Enqueue) -> None:
        """Fail a parked enqueue (`common.rejoin`) as its "no live instance" would have."""
        if item.future.done():
            return
        if item.awaits_reply:
            self._off_loop(item, self._fail_call(item, NO_INSTANCE))
        else:
            item.future.set_result(NO_INSTANCE)

    def _off_loop(self, item: Enqueue, settle: Coroutine[Any, Any, None]) -> None:
        """Run `settle` (what settles `item`'s future, refused by Redis: a rare path which
        may need a Redis lookup first) off the writer's loop, in a task held until it
        ends (or `close()` cancels it, and fails `item`)."""
        task = asyncio.create_task(settle)
        self._settling[task] = item
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        # From the dict held now: `close()` may have taken the one `task` went into.
        self._settling.pop(task, None)

    async def _fail_call(self, item: Enqueue, entry: Any) -> None:
        error = await self._error_for(entry, item.service, item.instance)
        if error is not None and not item.future.done():
            item.future.set_exception(error)
