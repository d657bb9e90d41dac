"""Revoked credentials: the store in Redis and the local view every verifier keeps.

```
sb:{auth}:revoked       zset     member -> expires_at (unix seconds)
sb:{auth}:revocations   pub/sub  message = the member just revoked
```

Members: `sid:<session id>` (a session's access tokens), `jti:<token id>`
(one access token), `key:<api key id>` (one API key) and `user:<user id>`
(every credential of a user). An entry only has to outlive the credentials it
revokes (an access token lives `JWT_TTL` at most), so entries expire and the
set stays small.

Verifiers never ask Redis per request: `RevocationView` holds the set in memory,
adds members as they are published, and resyncs the whole set every few seconds
so a missed message (a dropped subscription, a Redis restart) costs at most one
resync interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from common.aio import background, cancel_and_wait, cancelling
from common.connection import REDIS_DOWN_ERRORS, as_text
from common.constants import data_key
from common.log import get_logger
from common.outage import Outage
from common.redis_failures import REDIS_DOWN_OR_REFUSING, redis_failure
from common.subscription import follow

__all__ = [
    "CHANNEL",
    "KINDS",
    "REVOKED",
    "RevocationView",
    "member",
    "queue_revocations",
    "revoke",
]

log = get_logger(__name__)

REVOKED = data_key("auth", "revoked")
CHANNEL = data_key("auth", "revocations")
KINDS = ("sid", "jti", "key", "user")
# How soon a resync tries again while nothing was ever loaded (a start with Redis down
# or refusing); then every `resync_interval`. Also the signing keys' (`common.credentials`).
UNLOADED_RETRY = 0.5
# When a published member cannot be looked up, it counts as revoked until the
# next resync says otherwise: failing closed for a few seconds beats failing open.
_UNCONFIRMED = 3600.0


def member(kind: str, ident: str) -> str:
    """The set member revoking `ident` of `kind` (`sid`, `jti`, `key` or `user`)."""
    if kind not in KINDS:
        raise ValueError(f"revocation kind must be one of {', '.join(KINDS)}")
    return f"{kind}:{ident}"


async def revoke(
    redis: aioredis.Redis, revoked: str, expires_at: float, *, now: float | None = None
) -> None:
    """Revoke `revoked` (a `member()`) until `expires_at`, and tell every verifier at once.

    A later expiry already stored is kept; expired entries are pruned on the way.
    """
    async with redis.pipeline(transaction=True) as pipe:
        queue_revocations(pipe, [revoked], expires_at, now=now)
        await pipe.execute()


def queue_revocations(
    pipe: Pipeline, revoked: Sequence[str], expires_at: float, *, now: float | None = None
) -> None:
    """Queue on `pipe` what `revoke` does, for each of `revoked`: many in one round trip."""
    now = time.time() if now is None else now
    pipe.zadd(REVOKED, dict.fromkeys(revoked, expires_at), gt=True)
    pipe.zremrangebyscore(REVOKED, "-inf", now)
    for one in revoked:  # verifiers apply one member per message
        pipe.publish(CHANNEL, one)


class RevocationView:
    """A process-local copy of the revoked set, kept current by pub/sub and resyncs."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        resync_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.resync_interval = resync_interval
        self.clock = clock
        self._revoked: dict[str, float] = {}
        # Members learnt from messages since the running resync began: kept when it lands.
        self._recent: dict[str, float] = {}
        self._listeners: list[Callable[[str], None]] = []
        self._subscribed = asyncio.Event()
        self._refreshing = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._outage = Outage(log, "revocation resync failed", "revocations resynced")
        self.loaded = False  # whether the set was ever read from Redis

    def on_revoke(self, callback: Callable[[str], None]) -> None:
        """Call `callback(member)` for each revocation seen (published, or found by a resync)."""
        self._listeners.append(callback)

    def is_revoked(self, revoked: str) -> bool:
        """Whether `revoked` (a `member()`) is revoked now. On the request path: one dict lookup."""
        expires_at = self._revoked.get(revoked)
        return expires_at is not None and expires_at > self.clock()

    def __len__(self) -> int:
        return len(self._revoked)

    async def start(self) -> None:
        """Subscribe, then load the set (so nothing revoked in between is missed)."""
        self._tasks.append(background(self._listen(), name="revocations-listen"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 2.0)
        try:
            await self.refresh()
        except REDIS_DOWN_OR_REFUSING as exc:
            # Down or refusing (`common.redis_failures`): not fatal, logged once (the
            # resync's `Outage`), and the resync keeps trying. Any other error is.
            if redis_failure(exc) is None:
                raise
            self._outage.failed(exc, at="start")
        self._tasks.append(background(self._resync_forever(), name="revocations-resync"))

    async def close(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks.clear()

    async def refresh(self) -> None:
        """Replace the local set with the live entries in Redis."""
        async with self._refreshing:
            self._recent = {}
            now = self.clock()
            rows = await self.redis.zrangebyscore(REVOKED, f"({now}", "+inf", withscores=True)
            fresh = {as_text(row[0]): float(row[1]) for row in rows}
            for revoked, expires_at in self._recent.items():
                fresh[revoked] = max(expires_at, fresh.get(revoked, 0.0))
            new = [m for m in fresh if m not in self._revoked]
            self._revoked = fresh
            self.loaded = True
        for revoked in new:
            self._notify(revoked)

    async def _resync_forever(self) -> None:
        while not cancelling():
            # Never loaded (Redis down or refusing at start): nothing revoked before now is
            # known, so try again as often as the other loops do in an outage.
            await asyncio.sleep(self.resync_interval if self.loaded else UNLOADED_RETRY)
            try:
                await self.refresh()
                self._outage.recovered()
            except Exception as exc:  # any: a stopped resync would never see Redis again
                self._outage.failed(exc)

    async def _listen(self) -> None:
        async def revoked(data: bytes | str) -> None:
            await self._apply(as_text(data))

        lost = ("revocation events lost, resubscribing", "revocation events followed again")
        await follow(self.redis, CHANNEL, revoked, lost=lost, on_subscribed=self._subscribed.set)

    async def _apply(self, revoked: str) -> None:
        # The message names the member; its expiry is in the set. Looking it up
        # also ignores messages about another Redis database (channels are global).
        # Until the lookup answers, the member counts as revoked: the call that
        # revoked it may be answered, and its client's next request read, first.
        known = self._revoked.get(revoked)
        provisional = None
        if known is None:
            provisional = self._revoked[revoked] = self.clock() + _UNCONFIRMED
        try:
            score = await self.redis.zscore(REVOKED, revoked)
            expires_at = None if score is None else float(score)
        except REDIS_DOWN_ERRORS:
            expires_at = self.clock() + _UNCONFIRMED
        if expires_at is not None and expires_at > self.clock():
            expires_at = max(expires_at, known or 0.0)
            self._revoked[revoked] = expires_at
            self._recent[revoked] = expires_at
        elif provisional is not None and self._revoked.get(revoked) == provisional:
            del self._revoked[revoked]  # not in this database's set, or already over
        self._notify(revoked)

    def _notify(self, revoked: str) -> None:
        for listener in self._listeners:
            try:
                listener(revoked)
            except Exception:
                log.exception("revocation listener failed")
