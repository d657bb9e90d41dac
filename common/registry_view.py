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

While Redis is unreachable, no heartbeat can renew a lease, so leases would end
with every instance still serving: the view would empty itself and routing would
stop on account of Redis alone. Instead, leases are read on a clock that stops
`stale_after` seconds after the last full resync (`_last_sync`): the instances
live when the view lost touch stay routable until Redis answers again, as Envoy
keeps its last endpoints when its control plane is away. Those that die meanwhile
are the health checks' to eject (design §5: passive and active health).

When Redis answers again, the first resync finds those leases ended (nothing could
renew them), though the instances are up and heartbeat again within a second. So
that resync keeps every instance it last saw for `recovery_grace` more seconds
(one heartbeat lease): routing goes on across the outage's end instead of
answering 503 until each instance's next heartbeat. One that died meanwhile is
gone when its grace ends, or ejected by the health checks before.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Collection

import redis.asyncio as aioredis

from common import constants
from common.aio import cancel_and_wait, cancelling
from common.connection import REDIS_DOWN_ERRORS
from common.log import get_logger
from common.outage import Outage
from common.registry import InstanceRecord, Registry, split_service_tag
from common.subscription import follow

log = get_logger("switchboard.registry")

Listener = Callable[[str], None]


class RegistryView:
    """Live instances per service, in memory, current from events plus resync."""

    def __init__(
        self, redis: aioredis.Redis, *, resync_interval: float = 1.0, recovery_grace: float = 3.0
    ) -> None:
        """`recovery_grace`: one heartbeat lease (`HEARTBEAT_TTL`), the time the instances
        last seen are kept after an outage (the module docstring)."""
        self.redis = redis
        self.registry = Registry(redis)
        self.resync_interval = resync_interval
        # Two resyncs missed: out of touch with Redis (see the module docstring).
        self.stale_after = 2 * resync_interval
        self.recovery_grace = recovery_grace
        self._view: dict[str, dict[str, tuple[InstanceRecord, float]]] = {}
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = asyncio.Event()
        self._last_sync = math.inf  # time.time() of the last full resync (none yet)
        self._outage = Outage(
            log, "registry resync failed: routing on the instances last seen", "registry resynced"
        )

    def instances(self, service: str, kind: str | None = None) -> list[InstanceRecord]:
        """The live instances of `service` (optionally of one kind). Hot path: no I/O."""
        entries = self._view.get(service)
        if not entries:
            return []
        now = min(time.time(), self._last_sync + self.stale_after)
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
        started = time.time()
        names = [service] if service else await self.registry.service_names()
        # Out of touch until now: the leases last seen are kept a grace longer.
        recovering = service is None and started > self._last_sync + self.stale_after
        if recovering:
            names = sorted({*names, *self._view})
        for name in names:
            redis_now, leases = await self.registry.leases(name)
            offset = time.time() - redis_now
            fresh = {record.instance_id: (record, end + offset) for record, end in leases}
            if recovering:
                grace_end = started + self.recovery_grace
                for instance_id, (record, _) in self._view.get(name, {}).items():
                    current, end = fresh.get(instance_id, (record, -math.inf))
                    fresh[instance_id] = (current, max(end, grace_end))
            self._view[name] = fresh
            self._notify(name)
        if service is None:
            self._last_sync = started

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
                self._outage.recovered()
            except REDIS_DOWN_ERRORS as exc:
                self._outage.failed(exc)
            await asyncio.sleep(self.resync_interval)

    async def _listen(self) -> None:
        lost = ("registry events lost, resubscribing", "registry events followed again")
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
