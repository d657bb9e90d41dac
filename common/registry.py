"""The service registry: who is alive, and which services and methods exist.

An instance keeps itself alive by heartbeat: every `heartbeat_interval` it
scores its id with the moment its lease ends (`now + heartbeat_ttl`) in two
sorted sets, `instances` (accepting calls: what callers and balancers look at)
and `leases` (holding calls: what the redelivery reaper looks at), and refreshes
its JSON record (an RPC worker does so from a thread, `common.lease`, with the
same script: `HEARTBEAT_SCRIPT`). A draining instance heartbeats with
`accepting=False`: it leaves `instances` at once but keeps its lease until its
in-flight calls are answered.
An instance whose lease has ended is dead, whether or not anyone has cleaned up
after it yet. Cleaning up: a heartbeat prunes its own service's dead instances, and
the resync of every `RegistryView` prunes (`snapshot(prune_after=...)`) those of every
service whose lease ended `prune_after` ago, then takes a service with no instance left
out of `sb:services` (`forget_services`): what departed leaves nothing behind in Redis,
and a resync's cost follows the services that exist, not every name ever seen.
"Now" is always Redis's clock (`TIME` inside the scripts), so machines with
skewed clocks agree on who is alive.

A Redis outage longer than the TTL ends every lease, the live instances' too: nothing
could renew them. Nobody widens a lease to ride that out (a dead instance must read
as dead once its lease has ended); instead each side recovers at once. A worker
retries a failed heartbeat every 0.1 s, so its lease is renewed as soon as Redis
answers (`common.lease`); when Redis came back without its data, that heartbeat
registers it again (the script's "added") and the worker publishes its catalog and
limits again (`common.service`). A gateway's `RegistryView` keeps the instances it
last saw for one lease after the outage (`recovery_grace`), and an `RpcClient` that
lost touch with Redis holds a call told "no live instance" for up to one lease until
a worker is back (`common.rejoin`), since the enqueue script checks liveness in
Redis itself.

The catalog (`sb:catalog`, no expiry) remembers each service's methods, which is
how a gateway answers "unknown method" (404) apart from "no live instance" (503).

Event fan-out to gateways and a resynced local view come with the registry
issue; this module keeps the Redis layout they will build on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from common import constants
from common.connection import as_text
from common.instance_record import InstanceRecord, MalformedRecord
from common.log_budget import LogBudget

log = logging.getLogger("switchboard.registry")

# True when the record stored for ARGV[1] in the hash KEYS[3] is of the kind `kind`
# ('': never). A record that is not a JSON object is of no kind.
_STORED_KIND_IS = """
local function stored_kind_is(kind)
  if kind == '' then
    return false
  end
  local raw = redis.call('HGET', KEYS[3], ARGV[1])
  if not raw then
    return false
  end
  local ok, stored = pcall(cjson.decode, raw)
  return ok and type(stored) == 'table' and stored['kind'] == kind
end
"""

# KEYS: instances zset, leases zset, records hash, the instance's direct stream.
# ARGV: instance id, ttl ms, record JSON, accepting ("1"/"0"), direct stream ttl ms,
# the kind a stored record of this id must not have ('': any).
# Returns false (nil), changing nothing, when the stored record has that kind.
HEARTBEAT_SCRIPT = (
    _STORED_KIND_IS
    + """
if stored_kind_is(ARGV[6]) then
  return false
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_end = now_ms + tonumber(ARGV[2])
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[1], lease_end, ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
local added = redis.call('ZADD', KEYS[2], lease_end, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('PEXPIRE', KEYS[4], ARGV[5])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms)
if #dead > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
  redis.call('HDEL', KEYS[3], unpack(dead))
end
table.insert(dead, 1, added)
return dead
"""
)

# KEYS: instances zset, leases zset, records hash, the instance's direct stream.
# ARGV: instance id, the kind a stored record of this id must not have ('': any).
# Returns 0, changing nothing, when the stored record has that kind; else 1.
_DEREGISTER = (
    _STORED_KIND_IS
    + """
if stored_kind_is(ARGV[2]) then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
return 1
"""
)

# A dead instance's direct stream (calls addressed to it alone) outlives its lease
# by this many TTLs, then expires: nobody else may serve those calls.
_DIRECT_STREAM_TTLS = 10

# KEYS: instances zset, leases zset, records hash. ARGV: prune ms (0: prune nothing).
# With a prune time, first removes the instances whose lease ended longer ago than
# that (a record goes with its lease) and, when no instance is left at all, the
# records hash (orphans only: a heartbeat writes lease and record together).
# Returns {now_ms, empty (1: the service has no instance left, 0 also when not
# pruning), pruned ids, {id, lease end ms, ...} of the accepting instances, records}.
_SNAPSHOT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prune_ms = tonumber(ARGV[1])
local pruned, empty = {}, 0
if prune_ms > 0 then
  local cutoff = now_ms - prune_ms
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  pruned = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  if #pruned > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
    for i = 1, #pruned, 1000 do
      redis.call('HDEL', KEYS[3], unpack(pruned, i, math.min(i + 999, #pruned)))
    end
  end
  if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[3])
    empty = 1
  end
end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms, '+inf', 'WITHSCORES')
local records = {}
for i = 1, #live, 2 do
  records[#records + 1] = redis.call('HGET', KEYS[3], live[i])
end
return {now_ms, empty, pruned, live, records}
"""

# KEYS: instances zset. Returns [now_ms, live ids...].
_LIVE = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms, '+inf')
table.insert(ids, 1, now_ms)
return ids
"""


def _event(kind: str, service: str, instance_id: str) -> str:
    return json.dumps({"type": kind, "service": service, "instance_id": instance_id})


def _guard(kind: str) -> str:
    """The kind a stored record may not have for a heartbeat or removal of `kind` to
    touch it: an RPC worker's registration (its lease holds its calls, its direct
    stream the calls addressed to it) is its own. `rpc` is unguarded: a worker's own
    heartbeat reads nothing more."""
    return "" if kind == "rpc" else "rpc"


# The heartbeat script, for a client of its own (`common.lease` renews a worker's lease
# from a thread, with a blocking client): `heartbeat_request` makes its keys and
# arguments, `queue_heartbeat_events` what follows a reply that asks for it.


def heartbeat_request(
    record: InstanceRecord, ttl_ms: int, accepting: bool
) -> tuple[list[str], list[str | int]]:
    """The heartbeat script's keys and arguments for `record` (see `Registry.heartbeat`)."""
    service, instance_id = record.service, record.instance_id
    keys = [
        constants.instances_key(service),
        constants.leases_key(service),
        constants.instance_record_key(service),
        constants.direct_stream(service, instance_id),
    ]
    args: list[str | int] = [
        instance_id,
        ttl_ms,
        record.to_json(),
        "1" if accepting else "0",
        ttl_ms * _DIRECT_STREAM_TTLS,
        _guard(record.kind),
    ]
    return keys, args


def heartbeat_events_due(result: list[Any] | None) -> bool:
    """Whether the heartbeat script's `result` calls for events (`queue_heartbeat_events`):
    a new lease, or dead instances pruned. Most beats call for none, and send nothing more."""
    return result is not None and (bool(result[0]) or len(result) > 1)


def queue_heartbeat_events(pipe: Any, record: InstanceRecord, result: list[Any]) -> None:
    """Queue on `pipe` (a pipeline, sync or async) what the heartbeat script's `result`
    calls for: the service in `sb:services` and an "up" event when the lease is new, a
    "down" event for each dead instance it pruned. Outside the script: these keys live
    in other cluster slots than {service}'s."""
    service, instance_id = record.service, record.instance_id
    added, *dead = result
    if added:
        pipe.sadd(constants.SERVICES, service)
        pipe.publish(constants.REGISTRY_EVENTS, _event("up", service, instance_id))
    for gone in dead:
        pipe.publish(constants.REGISTRY_EVENTS, _event("down", service, as_text(gone)))


def split_service_tag(name: str) -> tuple[str, str]:
    """The original dispatcher's `service_tag` names, split at the first `_`:
    `nlp_v2` -> ("nlp", "v2"); `nlp` -> ("nlp", "") (no tag)."""
    service, _, tag = name.partition("_")
    return service, tag


def new_instance_id(service: str) -> str:
    """A readable, unique instance id: `iptv-<host>-<pid>-<random>`."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class ServiceSnapshot:
    """One service as `Registry.snapshot` read it: Redis's clock (epoch s) and each
    accepting instance with its lease end (epoch s)."""

    now: float
    leases: list[tuple[InstanceRecord, float]]
    empty: bool = False  # pruned, and no instance left at all (not even a draining one)


class Registry:
    """Instance liveness and the service catalog, over one Redis client."""

    def __init__(self, redis: aioredis.Redis, ttl: float = 3.0) -> None:
        self.redis = redis
        self.ttl_ms = int(ttl * 1000)
        self._heartbeat = redis.register_script(HEARTBEAT_SCRIPT)
        self._deregister = redis.register_script(_DEREGISTER)
        self._live = redis.register_script(_LIVE)
        self._snapshot = redis.register_script(_SNAPSHOT)
        self._malformed_logged = LogBudget(
            log, "malformed instance records not logged", logging.WARNING, {}
        )

    async def heartbeat(self, record: InstanceRecord, *, accepting: bool = True) -> bool:
        """Extend `record`'s lease by the TTL (and prune instances whose lease ended).

        `accepting=False` keeps the lease (in-flight calls stay ours) but takes the
        instance out of the set callers are routed to: the first step of draining.

        False, changing nothing, when `record` is not an RPC worker's but its id is one's
        (`_guard`): an HTTP heartbeat never replaces a worker's registration.
        """
        keys, args = heartbeat_request(record, self.ttl_ms, accepting)
        result = await self._heartbeat(keys=keys, args=args)
        if result is None:
            return False
        if heartbeat_events_due(result):
            async with self.redis.pipeline(transaction=False) as pipe:
                queue_heartbeat_events(pipe, record, result)
                await pipe.execute()
        return True

    async def deregister(self, service: str, instance_id: str, *, kind: str = "rpc") -> bool:
        """Remove an instance at once: no calls routed to it, no lease, no direct stream.

        `kind`: the kind of instance the caller is removing. False, changing nothing, when
        it is not `rpc` but the instance is an RPC worker (`_guard`).
        """
        keys = [
            constants.instances_key(service),
            constants.leases_key(service),
            constants.instance_record_key(service),
            constants.direct_stream(service, instance_id),
        ]
        if not await self._deregister(keys=keys, args=[instance_id, _guard(kind)]):
            return False
        await self.redis.publish(constants.REGISTRY_EVENTS, _event("down", service, instance_id))
        return True

    async def leases(self, service: str) -> tuple[float, list[tuple[InstanceRecord, float]]]:
        """Redis's clock (epoch s) and each accepting instance with its lease end (epoch s)."""
        found = (await self.snapshot([service]))[service]
        return found.now, found.leases

    async def snapshot(
        self, services: Iterable[str], *, prune_after: float | None = None
    ) -> dict[str, ServiceSnapshot]:
        """`leases` of many services in one round trip (one script each, pipelined).

        With `prune_after` (seconds), also removes from Redis each instance whose lease
        ended longer ago than that (a "down" event each) and says which services have no
        instance left (`ServiceSnapshot.empty`: see `forget_services`).
        """
        names = sorted(services)
        if not names:
            return {}
        prune_ms = max(int(prune_after * 1000), 1) if prune_after is not None else 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                keys = [
                    constants.instances_key(name),
                    constants.leases_key(name),
                    constants.instance_record_key(name),
                ]
                await self._snapshot(keys=keys, args=[prune_ms], client=pipe)
            results = await pipe.execute()
        out: dict[str, ServiceSnapshot] = {}
        pruned: list[tuple[str, str]] = []
        for name, (now_ms, is_empty, gone, live, raws) in zip(names, results, strict=True):
            ends = [float(end) / 1000 for end in live[1::2]]
            leases = [
                (record, end)
                for raw, end in zip(raws, ends, strict=True)
                if (record := self._record(name, raw)) is not None
            ]
            out[name] = ServiceSnapshot(int(now_ms) / 1000, leases, bool(is_empty))
            pruned += [(name, as_text(i)) for i in gone]
        if pruned:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, instance_id in pruned:
                    pipe.publish(constants.REGISTRY_EVENTS, _event("down", name, instance_id))
                await pipe.execute()
        return out

    async def forget_services(self, services: Collection[str]) -> None:
        """Take services that have no instance left out of `sb:services`.

        The set lives in another cluster slot than a service's keys, so this cannot be
        one script with the check that the service is empty. Instead: remove, then look
        again (after the removal has been answered: in a cluster, one pipeline to two
        nodes has no order), and put back any service an instance registered with
        meanwhile. Its heartbeat added it itself if it came after the removal, and the
        second look sees it if it came before: a registration is never lost.
        """
        names = sorted(services)
        if not names:
            return
        await self.redis.srem(constants.SERVICES, *names)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(constants.leases_key(name))
            present = await pipe.execute()
        back = [name for name, found in zip(names, present, strict=True) if found]
        if back:
            await self.redis.sadd(constants.SERVICES, *back)

    async def cataloged(self, services: Iterable[str]) -> set[str]:
        """Which of `services` the catalog knows: RPC services (a worker published them)."""
        names = sorted(set(services))
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hexists(constants.CATALOG, name)
            found = await pipe.execute()
        return {name for name, known in zip(names, found, strict=True) if known}

    async def service_names(self) -> set[str]:
        """Every service with instances (live, or gone but not yet pruned) or a catalog."""
        registered, cataloged = await self.names()
        return registered | cataloged

    async def names(self) -> tuple[set[str], set[str]]:
        """The services of `sb:services` (with instances, live or not yet pruned) and
        those of the catalog, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smembers(constants.SERVICES)
            pipe.hkeys(constants.CATALOG)
            members, keys = await pipe.execute()
        return {as_text(n) for n in members}, {as_text(n) for n in keys}

    async def live_ids(self, service: str) -> list[str]:
        """Ids of the instances of `service` whose lease has not ended."""
        result = await self._live(keys=[constants.instances_key(service)])
        return [as_text(i) for i in result[1:]]

    async def live_ids_by_service(self, services: Iterable[str]) -> dict[str, list[str]]:
        """`live_ids` of many services in one round trip (the same script, pipelined)."""
        names = sorted(services)
        if not names:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                await self._live(keys=[constants.instances_key(name)], client=pipe)
            results = await pipe.execute()
        pairs = zip(names, results, strict=True)
        return {name: [as_text(i) for i in result[1:]] for name, result in pairs}

    async def live_instances(self, service: str) -> list[InstanceRecord]:
        """Records of the live instances of `service`."""
        ids = await self.live_ids(service)
        if not ids:
            return []
        raws = await self.redis.hmget(constants.instance_record_key(service), ids)
        return [record for raw in raws if (record := self._record(service, raw)) is not None]

    def _record(self, service: str, raw: str | bytes | None) -> InstanceRecord | None:
        """The record stored as `raw`; None, with a warning (a bounded number), for a
        malformed one: the service's other instances stay routable."""
        if not raw:
            return None
        try:
            return InstanceRecord.from_json(raw)
        except MalformedRecord as exc:
            if self._malformed_logged.spend():
                log.warning("instance record of %s ignored: %s", service, exc)
            return None

    async def publish_catalog(self, service: str, methods: dict[str, Any]) -> None:
        """Record `service`'s methods in the catalog (kept without expiry)."""
        entry = {"methods": methods, "updated_at": time.time()}
        await self.redis.hset(constants.CATALOG, service, json.dumps(entry))

    async def catalog(self) -> dict[str, dict[str, Any]]:
        """Every service ever registered, with its methods."""
        raw = await self.redis.hgetall(constants.CATALOG)
        return {as_text(k): json.loads(v) for k, v in raw.items()}

    async def service_methods(self, service: str) -> dict[str, Any] | None:
        """The methods of `service`, or None if the service was never registered."""
        raw = await self.redis.hget(constants.CATALOG, service)
        if raw is None:
            return None
        methods: dict[str, Any] = json.loads(raw)["methods"]
        return methods
