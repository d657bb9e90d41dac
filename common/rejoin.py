"""Calls that find no live instance just after a Redis outage: held until the workers
renew their leases, for a bounded grace.

A worker's heartbeat lease (`common.registry`) lapses during an outage longer than
`HEARTBEAT_TTL`, however alive the worker, and is renewed only once its next heartbeat
reaches Redis (a worker retries every 0.1 s after a failed heartbeat, so within a
fraction of a second of Redis answering). The enqueue script, which checks liveness
in Redis, would answer "no live instance" meanwhile, and a caller that came back
from the outage with the workers would get a 503 for a service that never stopped.

So a client that has itself lost touch with Redis within the last grace (one
heartbeat lease, held by `common.lost_touch`: a live worker has renewed by then)
does not fail a call (or task) refused for "no live instance" at once: it parks it,
and one probe per service (or per instance, for a call addressed to one) asks Redis
every `step` whether a live instance is back. When one is, the parked calls are
enqueued again; when the grace ends first, each fails as it would have at once (503,
or 404 for a service nobody knows); a call whose deadline comes first fails with 503
just before it, not with a timeout. Outside the grace nothing changes: a dead
service's callers get their 503 at once. "Lost touch" is anything the client saw of
the outage: a Redis call that failed or was refused, a connection found broken
(reset), or Redis restarted: a connection Redis closed meanwhile, found at the
client's first call after it (which covers a client that was idle throughout), if
Redis started less than one lease before (its uptime, asked once, only when such a
close is followed by "no live instance": `common.lost_touch`). The grace is measured
from the last such failure (from Redis's start after a restart), so an outage that
goes on keeps it. A connection closed by a Redis up for longer (an idle timeout, a
client kill, a proxy's) is no loss: every live worker has renewed its lease since,
and a dead service's 503 comes at once. (Not told apart: a failover to a replica up
for longer that lost the newest leases. Comparing Redis's `run_id` would tell; a
single Redis, as today, cannot fail over.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from common.aio import background
from common.redis_failures import REDIS_DOWN_OR_REFUSING


class Parkable(Protocol):
    """What a parked enqueue is: a call (or task) for `service` (`instance`, if
    addressed to one), its caller's future, and its deadline (epoch seconds)."""

    service: str
    instance: str | None
    future: asyncio.Future[Any]
    deadline: float


Key = tuple[str, str | None]


class Rejoin:
    """The calls parked until a live instance is back, and one probe per target."""

    def __init__(
        self,
        *,
        holding: Callable[[], bool],
        live_ids: Callable[[str], Awaitable[list[str]]],
        retry: Callable[[Any], None],
        give_up: Callable[[Any], None],
        step: float = 0.05,
    ) -> None:
        """`holding()`: whether this client is within the grace after it last lost touch
        with Redis (`common.lost_touch.LostTouch.within_grace`, which holds the grace:
        one heartbeat lease); `live_ids(service)`: the ids of its live instances;
        `retry(item)`: enqueue it again; `give_up(item)`: fail it as "no live instance"
        (without waiting: it starts what it needs)."""
        self._holding = holding
        self._live_ids = live_ids
        self._retry = retry
        self._give_up = give_up
        self.step = step
        self._parked: dict[Key, list[Any]] = {}
        self._probes: dict[Key, asyncio.Task[None]] = {}
        self.parked_total = 0  # calls (and tasks) ever parked: for tests and the curious
        self._closed = False

    def park(self, item: Parkable) -> bool:
        """Hold `item`, refused for "no live instance", if within the grace (True);
        False, holding nothing, otherwise (and after `close()`): the caller fails it."""
        if self._closed or not self._holding():
            return False
        key = (item.service, item.instance)
        self._parked.setdefault(key, []).append(item)
        self.parked_total += 1
        if key not in self._probes:
            self._probes[key] = background(self._probe(key), name=f"rpc-rejoin-{key[0]}")
        return True

    def close(self) -> list[Any]:
        """Stop the probes and return the calls still parked (for the owner to fail);
        park nothing from now on."""
        self._closed = True
        for task in self._probes.values():
            task.cancel()
        self._probes.clear()
        items = [item for items in self._parked.values() for item in items]
        self._parked.clear()
        return items

    async def _probe(self, key: Key) -> None:
        service, instance = key
        back = False
        try:
            while not back:
                await asyncio.sleep(self.step)
                waiting = self._waiting(key)
                if not waiting or not self._holding():
                    break
                try:
                    live = await self._live_ids(service)
                except REDIS_DOWN_OR_REFUSING:
                    continue  # a failure the client saw as well: the grace goes on
                back = bool(live) and (instance is None or instance in live)
        finally:
            items = self._parked.pop(key, [])
            self._probes.pop(key, None)
        for item in items:
            if item.future.done():
                continue
            if back:
                self._retry(item)
            else:
                self._give_up(item)

    def _waiting(self, key: Key) -> list[Any]:
        """The calls parked for `key` still awaited; those whose deadline comes before
        the next probe are given up now (a 503 rather than their caller's timeout)."""
        before = time.time() + self.step
        waiting: list[Any] = []
        for item in self._parked.get(key, ()):
            if item.future.done():
                continue
            if item.deadline <= before:
                self._give_up(item)
            else:
                waiting.append(item)
        self._parked[key] = waiting
        return waiting
