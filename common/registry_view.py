"""A process's local, always-readable view of the live instances (design §5).

Routing never waits on Redis: `instances(service)` reads a dict. The view is
kept current two ways:

- change events (`sb:events:registry`, pub/sub): an instance coming up is
  fetched at once, one going down (graceful deregistration, or pruned dead) is
  dropped at once, so changes show up in well under a second;
- a periodic resync (every `resync_interval`, 1 s by default) of every service,
  which repairs anything an event missed (a reconnect, a lost message).

Each instance is kept with the end of its heartbeat lease, converted from
Redis's clock to this process's with the offset measured at each resync, and
`instances()` leaves out any instance whose lease has ended: one that stops
heartbeating disappears within the TTL even if no resync or event arrives.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Collection

import redis.asyncio as aioredis

from common import constants
from common.aio import cancel_and_wait, cancelling
from common.connection import REDIS_DOWN_ERRORS
from common.log import get_logger
from common.registry import InstanceRecord, Registry, split_service_tag
from common.subscription import follow

log = get_logger("switchboard.registry")

Listener = Callable[[str], None]


class RegistryView:
    """Live instances per service, in memory, current from events plus resync."""

    def __init__(self, redis: aioredis.Redis, *, resync_interval: float = 1.0) -> None:
        self.redis = redis
        self.registry = Registry(redis)
        self.resync_interval = resync_interval
        self._view: dict[str, dict[str, tuple[InstanceRecord, float]]] = {}
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = asyncio.Event()

    def instances(self, service: str, kind: str | None = None) -> list[InstanceRecord]:
        """The live instances of `service` (optionally of one kind). Hot path: no I/O."""
        entries = self._view.get(service)
        if not entries:
            return []
        now = time.time()
        return [
            record
            for record, lease_end in entries.values()
            if lease_end > now and (kind is None or record.kind == kind)
        ]

    def services(self) -> list[str]:
        return sorted(self._view)

    def resolve(self, name: str, kinds: Collection[str]) -> tuple[str, str | None] | None:
        """The `(service, version)` a client's service name means, or None if no live
        instance of `kinds` answers to it. Hot path: no I/O.

        The name itself when that service has live instances; else the original
        dispatcher's `service_tag` form (`nlp_v2`: service `nlp`, version `v2`, as its
        heartbeat registered it) when that version has live instances.
        """
        if any(r.kind in kinds for r in self.instances(name)):
            return name, None
        service, tag = split_service_tag(name)
        if tag and any(r.kind in kinds and r.version == tag for r in self.instances(service)):
            return service, tag
        return None

    def on_change(self, listener: Listener) -> None:
        """Call `listener(service)` whenever that service's instances may have changed."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Load the view once, then keep it current in the background."""
        self._tasks = [
            asyncio.create_task(self._listen(), name="registry-events"),
            asyncio.create_task(self._resync_forever(), name="registry-resync"),
        ]
        try:
            await asyncio.wait_for(self._synced.wait(), timeout=5)
        except TimeoutError:
            log.warning("registry view not loaded yet (redis unreachable?)")

    async def close(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)

    async def refresh(self, service: str | None = None) -> None:
        """Reload one service (or all) from Redis now."""
        names = [service] if service else await self.registry.service_names()
        for name in names:
            redis_now, leases = await self.registry.leases(name)
            offset = time.time() - redis_now
            self._view[name] = {
                record.instance_id: (record, end + offset) for record, end in leases
            }
            self._notify(name)

    def _notify(self, service: str) -> None:
        for listener in self._listeners:
            try:
                listener(service)
            except Exception:
                log.exception("registry listener failed")

    async def _resync_forever(self) -> None:
        while not cancelling():
            try:
                await self.refresh()
                self._synced.set()
            except REDIS_DOWN_ERRORS as exc:
                log.warning("registry resync failed", extra={"fields": {"error": str(exc)}})
            await asyncio.sleep(self.resync_interval)

    async def _listen(self) -> None:
        lost = "registry events lost, resubscribing"
        await follow(self.redis, constants.REGISTRY_EVENTS, self._apply, lost=lost)

    async def _apply(self, data: bytes | str) -> None:
        try:
            event = json.loads(data)
            service, instance_id = str(event["service"]), str(event["instance_id"])
        except (ValueError, KeyError, TypeError):
            return
        if event.get("type") == "down":
            self._view.get(service, {}).pop(instance_id, None)
            self._notify(service)
        else:
            await self.refresh(service)
