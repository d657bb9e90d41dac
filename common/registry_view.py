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
gone when its grace ends, or ejected by the health checks before. (RPC calls do not
go through this view: the enqueue script checks liveness in Redis, and the client's
own grace, `common.rejoin`, covers the same moment; see `common.registry`.)

Each full resync reads every service in one round trip (a script per service,
pipelined), and prunes what departed: an instance whose lease ended `prune_after`
(30 s) ago is removed from Redis with its record, and a service left with no instance
leaves `sb:services` (`Registry.snapshot`, `Registry.forget_services`), then this view;
with the catalog's services, those are the names a resync reads. It prunes only after
`prune_after` in touch with Redis, so never what an outage alone kept from
heartbeating. A service whose last instance left is answered as registered with no
live instance (503) until it is pruned, then as unknown (404); a heartbeat brings it
back at once.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Collection

import redis.asyncio as aioredis

from common import constants
from common.aio import background, cancel_and_wait, cancelling
from common.instance_record import InstanceRecord
from common.log import get_logger
from common.outage import Outage
from common.registry import Registry, ServiceSnapshot, split_service_tag
from common.subscription import follow

log = get_logger("switchboard.registry")

Listener = Callable[[str], None]

# Ten leases of the default TTL: long dead, and long past any outage's grace.
PRUNE_AFTER = 30.0


class RegistryView:
    """Live instances per service, in memory, current from events plus resync."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        resync_interval: float = 1.0,
        recovery_grace: float = 3.0,
        prune_after: float = PRUNE_AFTER,
    ) -> None:
        """`recovery_grace`: one heartbeat lease (`HEARTBEAT_TTL`), the time the instances
        last seen are kept after an outage; `prune_after`: how long after its lease ended
        a departed instance is removed from Redis (the module docstring)."""
        self.redis = redis
        self.registry = Registry(redis)
        self.resync_interval = resync_interval
        # Two resyncs missed: out of touch with Redis (see the module docstring).
        self.stale_after = 2 * resync_interval
        self.recovery_grace = recovery_grace
        self._view: dict[str, dict[str, tuple[InstanceRecord, float]]] = {}
        self._cataloged: frozenset[str] = frozenset()  # RPC services, as of the last resync
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = asyncio.Event()
        self._last_sync = math.inf  # time.time() of the last full resync (none yet)
        self.prune_after = prune_after
        self._in_touch_since = math.inf  # the first full resync since the last outage
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

    def registered(self, service: str) -> bool:
        """Whether `service` is one of `services()` (with or without live instances)."""
        return service in self._view

    def is_rpc_service(self, service: str) -> bool:
        """Whether `service` is served by RPC workers (which no HTTP instance may join:
        `webapi.heartbeats`): the catalog names it, as of the last resync, or a live
        instance of it is an RPC worker. Hot path: no I/O."""
        if service in self._cataloged:
            return True
        return any(record.kind == "rpc" for record in self.instances(service))

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
            background(self._listen(), name="registry-events"),
            background(self._resync_forever(), name="registry-resync"),
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
        if service is not None:
            found = await self.registry.snapshot([service])
            self._store(service, found[service], None)
            return
        registered, cataloged = await self.registry.names()
        self._cataloged = frozenset(cataloged)
        # Out of touch until now: the leases last seen are kept a grace longer.
        recovering = started > self._last_sync + self.stale_after
        grace_end = started + self.recovery_grace if recovering else None
        # Also every name the view holds instances of: one just forgotten is read once more.
        names = registered | cataloged | {name for name, entries in self._view.items() if entries}
        in_touch = not recovering and started - self._in_touch_since >= self.prune_after
        found = await self.registry.snapshot(
            names, prune_after=self.prune_after if in_touch else None
        )
        for name, snapshot in found.items():
            if snapshot.leases or name in registered or name in cataloged or grace_end:
                self._store(name, snapshot, grace_end)
            elif self._view.pop(name, None) is not None:
                self._notify(name)
        for name in [name for name in self._view if name not in found]:
            del self._view[name]
            self._notify(name)
        await self.registry.forget_services([n for n in registered if found[n].empty])
        if recovering or self._in_touch_since > started:
            self._in_touch_since = started
        self._last_sync = started

    def _store(self, name: str, snapshot: ServiceSnapshot, grace_end: float | None) -> None:
        offset = time.time() - snapshot.now
        fresh = {record.instance_id: (record, end + offset) for record, end in snapshot.leases}
        if grace_end is not None:
            for instance_id, (record, _) in self._view.get(name, {}).items():
                current, end = fresh.get(instance_id, (record, -math.inf))
                fresh[instance_id] = (current, max(end, grace_end))
        self._view[name] = fresh
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
                self._outage.recovered()
            except Exception as exc:  # any (Redis refusing the prune, say): resync again
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
