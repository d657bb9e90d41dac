"""When the RPC client last lost touch with Redis: what `common.rejoin`'s grace is
measured from.

Lost touch is anything the client saw of an outage: a Redis call that failed or was
refused (each of the client's connections notes its own failures,
`RawConnection.failed_at`, including a connection found broken by a write that then
succeeded; an error reply is noted here, `failed`), or Redis restarted. A connection
Redis closed in order (`RedisClosedConnection`: a restart, a client kill, an idle
timeout, a proxy's) says nothing by itself, so when a call is refused for "no live
instance" within one grace of such a close, the client asks Redis its uptime
(`check_closes`: one check at a time, shared by the calls refused meanwhile) and
counts itself out of touch until Redis started only if that was less than one grace
ago: a restart, whose workers may not have renewed their leases yet.
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis

from common.aio import SingleFlight
from common.connection import RawConnection


class LostTouch:
    """The RPC client's record of losing touch with Redis, and its restart check."""

    def __init__(
        self, redis: aioredis.Redis, connections: tuple[RawConnection, ...], *, grace: float
    ) -> None:
        """`connections`: the client's own, whose closes and failures count; `grace`:
        how long after losing touch a refused call is held (`within_grace`), and after
        a close asks whether it was a restart (one heartbeat lease)."""
        self._redis = redis
        self._connections = connections
        self.grace = grace
        self._failed_at = -math.inf  # time.monotonic() when Redis last failed us
        self._checked_at = -math.inf  # time.monotonic() when the last check done began
        self._checks: SingleFlight[None] = SingleFlight()  # one check at a time

    def at(self) -> float:
        """When (time.monotonic) this client last saw Redis fail it (on one of its
        connections, which note it, or with an error reply: `failed`), or break one of
        its connections (a reset, noticed by the next read or write on it), or restart
        (`check_closes`)."""
        failed_at = max(conn.failed_at for conn in self._connections)
        return max(self._failed_at, failed_at)

    def within_grace(self) -> bool:
        """Within one grace after this client last lost touch with Redis (`at`): when
        `common.rejoin` holds a call refused for "no live instance"."""
        return time.monotonic() < self.at() + self.grace

    def failed(self) -> None:
        """Redis failed the client where its connections did not see it: an error reply
        (a refused enqueue or BLPOP), or the restart check's own call; or the grace is
        to count from now (an enqueue answered by its retry, after a failure its
        connection noted earlier). (A connection Redis merely closed in order is no
        failure: `check_closes` tells.)"""
        self._failed_at = time.monotonic()

    def closes_unchecked(self) -> bool:
        """Redis closed a connection of ours in order, within the grace, since the last
        check done began (or one is under way)."""
        closed_at = max(conn.found_closed_at for conn in self._connections)
        return closed_at > self._checked_at and time.monotonic() < closed_at + self.grace

    async def check_closes(self) -> None:
        """Whether the connections Redis closed were closed by a restart: returns once a
        check begun after the last close found has ended (or that close's grace is
        over). The check under way, if any, is shared; but one begun before a close
        may have read the uptime of the Redis before a restart, so another follows."""
        while self.closes_unchecked():
            await self._checks.run(None, self._check)

    async def close(self) -> None:
        """Cancel the check under way (its waiters get `CancelledError`)."""
        await self._checks.close()

    async def _check(self) -> None:
        """One lease after Redis started, every live worker has renewed its lease, so the
        client counts itself out of touch until Redis started only if that was within one
        lease (its uptime: whole seconds of Redis's clock since it started, so up to a
        second off either way; a worker renews within a fraction of a second of Redis
        answering, so that last second matters little). A close by a Redis up for longer (an
        idle timeout, a client kill, a proxy's) is no loss. If Redis does not say (it fails,
        or its answer holds no uptime: a proxy or a Redis-like server before it), the close
        counts as one."""
        began = time.monotonic()
        try:
            uptime = float((await self._redis.info("server"))["uptime_in_seconds"])
        except Exception:  # any: an error here must not cost the waiting calls their answer
            self.failed()
        else:
            if uptime < self.grace:
                self._failed_at = max(self._failed_at, time.monotonic() - uptime)
        # Only now: a call refused meanwhile must wait for this check, not go without it.
        self._checked_at = began
