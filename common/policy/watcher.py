"""A process's current policy, kept in memory and current from Redis.

Readers (the gateway's hot path) read `watcher.current`: an attribute, no I/O.
It is kept current two ways, as the registry view is:

- the change channel (`POLICY_CHANNEL`, pub/sub): a new version is loaded at
  once, so every replica applies it well within a second;
- polling the version key every `interval` (0.5 s), which repairs a missed
  message (a reconnect, a write that did not publish).

Redis unreachable or refusing (`common.redis_failures`), or a stored document that
does not validate (or a version that is not an integer), keeps the last good
policy: a replica never falls back to defaults because Redis blinked, and a
document written by hand (or before a validation rule existed) that the gateway
could not apply never reaches its request path. An invalid document is logged once
(an error), and stays refused until a valid one is stored over it; Redis's failure
is logged once per outage (a warning naming its kind, `common.outage`), never as an
invalid document.

Nor because Redis lost its data (a restart without persistence, a `FLUSHALL`, a
failover to an empty replica): applying the empty store would quietly drop every
route, weight and rate limit on every replica. A watcher that finds no policy
stored while it holds one writes its document back as version 1 instead
(compare-and-set on version 0: when replicas race, one writes and the others
load its copy, and an admin who writes first wins). The write is audited under
`RESTORE_ACTOR` and logged as an error: what Redis lost besides the policy
(users, API keys, sessions) is not restored. A store that went back to an older
version (a failover to a replica that had not caught up) is Redis's truth, and
every replica applies it, with a warning that writes were lost. The poll reads
the store's epoch with the version (`PolicyStore.stamp`), so a document written
after a loss is loaded even when it got the number of the one held.

Swapping the document is one assignment, so requests already in flight keep
the settings they started with and nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import constants
from common.aio import background, cancel_and_wait, cancelling
from common.connection import REDIS_DOWN_OR_SLOW
from common.errors import Conflict, RedisUnavailable
from common.log import get_logger
from common.outage import Outage
from common.policy.model import DEFAULT_POLICY, PolicyDocument, PolicyInvalid, PolicyUnreadable
from common.policy.store import PolicyStore
from common.redis_failures import redis_failure
from common.subscription import follow

log = get_logger("switchboard.policy")

Callback = Callable[[PolicyDocument], None]

_UNREACHABLE: tuple[type[Exception], ...] = (RedisUnavailable, *REDIS_DOWN_OR_SLOW)

# How long `start()` waits for the first load before going on with the default.
_START_TIMEOUT = 5.0
# The audit log's actor for a document written back after Redis lost it.
RESTORE_ACTOR = f"restore:{socket.gethostname()}:{os.getpid()}"


class PolicyWatcher:
    """The current `PolicyDocument` of this process, and who to tell when it changes."""

    def __init__(self, redis: aioredis.Redis, *, interval: float = 0.5) -> None:
        self.redis = redis
        self.store = PolicyStore(redis)
        self.interval = interval
        self.current: PolicyDocument = DEFAULT_POLICY
        self._epoch: str | None = None  # the store's epoch `current` was read in
        self._refused: tuple[int | None, str | None] | None = None  # the invalid one last seen
        self._callbacks: list[Callback] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._lock = asyncio.Lock()
        self._outage = Outage(log, "policy not refreshed, keeping the version applied",
                              "policy store reachable again")  # fmt: skip

    def on_change(self, callback: Callback) -> None:
        """Call `callback(document)` after every change of `current` (in the event loop)."""
        self._callbacks.append(callback)

    async def start(self) -> None:
        """Load the policy once (up to 5 s; the default stays if Redis does not answer)."""
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                await self.refresh()
        except TimeoutError:
            log.warning("policy not loaded yet (redis unreachable?); using the default")

    async def run(self) -> None:
        """Follow changes until cancelled, or until `close()` (then it returns)."""
        self._closing = False
        tasks = self._tasks = [
            background(self._listen(), name="policy-events"),
            background(self._poll(), name="policy-poll"),
        ]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            if not self._closing:
                raise
        finally:
            for task in tasks:
                await cancel_and_wait(task)

    async def close(self) -> None:
        """Stop following changes (ends a running `run()`); `current` stays readable."""
        self._closing = True
        for task in self._tasks:
            await cancel_and_wait(task)

    async def refresh(self, version: int | None = None) -> bool:
        """Load the stored policy if it is not the one we hold (another version or store
        epoch), or write ours back if the store lost it; True if `current` changed.

        `version`, when known (from a change message), saves a round trip. Redis
        unreachable or an invalid stored document keeps `current`.
        """
        async with self._lock:  # the poller and the listener may both notice one change
            try:
                epoch = self._epoch
                if version is None or version < self.current.version:
                    # A poll; or a late change message, or a store that lost data.
                    version, epoch = await self.store.stamp()
                if version == self.current.version and epoch == self._epoch:
                    self._outage.recovered()
                    return False
                if version == 0 and self.current.version > 0:  # nothing stored any more
                    document, epoch = await self._restore()
                else:
                    if version < self.current.version:
                        log.warning("policy store went back from version %d to %d "
                                    "(redis lost writes?); applying it",
                                    self.current.version, version)  # fmt: skip
                    document, epoch = await self.store.load()
            except _UNREACHABLE as exc:
                self._outage.failed(exc, version=self.current.version)
                return False
            except (PolicyInvalid, PolicyUnreadable, ValueError, RedisError) as exc:
                if isinstance(exc, RedisError) and redis_failure(exc) is not None:
                    # Redis refusing (busy, a failed save, out of memory for a write-back):
                    # an outage like Redis down, not an invalid document.
                    self._outage.failed(exc, version=self.current.version)
                    return False
                # Invalid or not JSON, a version that is no integer, a key of the wrong type.
                # Said once per stored version: the poll finds it again every interval.
                if self._refused != (version, epoch):
                    self._refused = (version, epoch)
                    log.error("stored policy is invalid, keeping version %d", self.current.version,
                              extra={"fields": {"error": str(exc)}})  # fmt: skip
                return False
            self._outage.recovered()
            self._epoch = epoch
            if document == self.current:
                return False
            self.current = document
        log.info("policy applied", extra={"fields": {"version": document.version}})
        for callback in self._callbacks:
            try:
                callback(document)
            except Exception:
                log.exception("policy change callback failed")
        return True

    async def _restore(self) -> tuple[PolicyDocument, str | None]:
        """Write `current` back into a store that lost it; the document now stored (ours,
        or that of whoever wrote first) and its epoch (module docstring)."""
        ours = self.current
        log.error("no policy stored (redis lost its data?); writing version %d's document "
                  "back", ours.version, extra={"fields": {"applied": ours.version}})  # fmt: skip
        with contextlib.suppress(Conflict):  # another replica restored it first, or an admin
            await self.store.put(ours.model_dump(mode="json"), actor=RESTORE_ACTOR,
                                 expected_version=0)  # fmt: skip
        return await self.store.load()

    async def _poll(self) -> None:
        while not cancelling():
            try:
                await self.refresh()
            except Exception as exc:  # `refresh` handles Redis's errors; a bug must not end it
                self._outage.failed(exc, version=self.current.version)
            await asyncio.sleep(self.interval)

    async def _listen(self) -> None:
        async def changed(data: bytes | str) -> None:
            await self.refresh(_version(data))

        # Quiet on a lost subscription: the poller logs the outage.
        await follow(self.redis, constants.POLICY_CHANNEL, changed, retry_delay=self.interval)


def _version(data: bytes | str) -> int | None:
    try:
        return int(data)
    except (TypeError, ValueError):
        return None
