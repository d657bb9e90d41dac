"""`TrimmedPool`: redis-py's blocking pool, shrinking again after a burst.

redis-py's pools never close an idle connection (redis/redis-py#3430): a burst of
concurrent commands opens up to `max_connections` of them and every one stays open
for the life of the process, so a worker restarted into a backlog held ~51 idle
connections to Redis from then on (Redis's `maxclients`, and memory on both sides).
`TrimmedPool` closes the connections left idle for longer than `idle_timeout`, as
nginx's and pgbouncer's pools do, keeping the `min_idle` most recently used.

It costs the pool's checkout and release nothing: no stamp is taken per command.
A connection's last use is read from redis-py's health-check clock, which every
reply read moves on to `loop.time() + health_check_interval` (`connect()` always
sets an interval); a connection without one (an interval of 0 in the URL) is never
taken for idle. The check runs from a loop timer, armed when the pool makes a
connection and only while it holds more than `min_idle`; so a pool at rest has none.

Only connections in the pool's free list are closed: one handed out (a command
under way, a pub/sub subscription, a blocking BLMOVE or XREADGROUP, a pipeline) is
in its in-use set until released, and released after its last reply. The free list
is a stack (the last connection released is the next handed out), so its bottom
holds the least recently used connections, and the top stays warm under steady use.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.observability.recorder import record_connection_count
from redis.exceptions import RedisError
from redis.observability.attributes import ConnectionState, get_pool_name

from common.aio import held

# A loop timer may fire up to its clock's resolution early: a connection due this
# close to now counts as due (else the check would be armed again for the same time).
_EARLY = 0.001


class TrimmedPool(aioredis.BlockingConnectionPool):
    """A `BlockingConnectionPool` that closes connections idle for `idle_timeout`
    seconds (0: never), keeping at least `min_idle` of them open."""

    def __init__(self, *, idle_timeout: float, min_idle: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.idle_timeout = idle_timeout
        self.min_idle = min_idle
        self._trim_timer: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[Any]] = set()

    def make_connection(self) -> AbstractConnection:
        """A new connection (the pool grows): the idle check starts if it is not on."""
        connection: AbstractConnection = super().make_connection()  # type: ignore[no-untyped-call]
        if self._trim_timer is None and self.idle_timeout > 0:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # made outside a loop: the next one made arms it
                return connection
            self._arm(loop, loop.time() + self.idle_timeout)
        return connection

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        # Through a weak reference: a timer must not keep a dropped pool alive.
        self._trim_timer = loop.call_at(when, _check, weakref.ref(self))

    def _trim(self) -> None:
        """Take the connections idle past `idle_timeout` out of the free list (all but
        the `min_idle` most recently used) and close them; arm the next check while the
        pool holds more than `min_idle` connections."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        free = self._available_connections
        # Whoever holds the pool's lock (a MOVING notification, a re-authentication)
        # may be walking the free list across awaits: try again later.
        spare = 0 if self._lock.locked() else len(free) - self.min_idle
        idle: list[AbstractConnection] = []
        wake = now + self.idle_timeout
        for connection in free[: max(spare, 0)]:  # least recently used first
            if not connection.health_check_interval:
                continue  # no clock to tell its last use
            used_at = connection.next_health_check - connection.health_check_interval
            if used_at + self.idle_timeout <= now + _EARLY:
                idle.append(connection)
            else:
                wake = min(wake, used_at + self.idle_timeout)
        if idle:
            closing = set(idle)
            free[:] = [connection for connection in free if connection not in closing]
            held(self._closing, self._close(idle), name="redis pool trim")
        if len(free) + len(self._in_use_connections) > self.min_idle:
            self._arm(loop, wake)

    async def _close(self, connections: list[AbstractConnection]) -> None:
        await asyncio.gather(
            *(connection.disconnect(nowait=True) for connection in connections),
            return_exceptions=True,  # a connection already broken is closed all the same
        )
        # redis-py's own count of idle connections (its metrics, when enabled).
        await record_connection_count(
            pool_name=get_pool_name(self),
            connection_state=ConnectionState.IDLE,
            counter=-len(connections),
        )

    async def aclose(self) -> None:
        """Close the pool: its connections, and the idle check (the client's `aclose()`
        calls this: `connect()`). A connection that does not close cleanly (a timeout,
        an error) is dropped all the same, as a trimmed one is: closing never raises."""
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None
        await asyncio.gather(*self._closing, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):  # every connection was tried first
            await super().aclose()


def _check(ref: weakref.ref[TrimmedPool]) -> None:
    """The idle check's timer: trim the pool unless it is gone."""
    pool = ref()
    if pool is not None:
        pool._trim_timer = None
        pool._trim()
