"""Redis key names and protocol constants, in one place.

Every key of a service carries the service name in a hash tag (`{iptv}`), so
all of a service's keys live in one Redis Cluster slot (design §9) and the
worker's multi-key pipelines stay legal there.
"""

from __future__ import annotations

PREFIX = "sb"

# Version of the RPC envelope; a worker answers a newer major version with an error.
PROTOCOL_VERSION = 1

# Consumer group every instance of a service joins on the service's call stream.
WORKER_GROUP = "workers"

# Known services and their methods, kept without expiry so the gateway can tell
# "unknown method" (404) from "no instance running right now" (503).
CATALOG = f"{PREFIX}:catalog"

# Every service name that ever registered an instance, of any kind (rpc, http, ws).
SERVICES = f"{PREFIX}:services"

# Pub/sub channel of registry changes: JSON {"type": "up"|"down", "service", "instance_id"}.
REGISTRY_EVENTS = f"{PREFIX}:events:registry"

# A key that never exists: `/health` writes it with `SET ... XX` to learn whether Redis
# takes writes (`common.redis_failures.check_writable`), which writes nothing.
WRITE_PROBE = f"{PREFIX}:health:write-probe"


def call_stream(service: str) -> str:
    """The stream all instances of `service` consume (competing consumers)."""
    return f"{PREFIX}:{{{service}}}:calls"


def direct_stream(service: str, instance_id: str) -> str:
    """The stream of calls addressed to one instance (`call(..., instance=id)`)."""
    return f"{PREFIX}:{{{service}}}:calls:{instance_id}"


def instances_key(service: str) -> str:
    """Sorted set of instances *accepting* calls, scored by when their lease ends.

    A draining instance (SIGTERM received) leaves this set at once but keeps its
    entry in `leases_key` until its in-flight calls are answered.
    """
    return f"{PREFIX}:{{{service}}}:instances"


def leases_key(service: str) -> str:
    """Sorted set of instances *holding calls*, scored by when their lease ends.

    A consumer of the call stream without a live lease here is dead: any live
    instance reclaims its pending calls.
    """
    return f"{PREFIX}:{{{service}}}:leases"


def reaping_key(service: str) -> str:
    """When the service's reapers last began reclaiming without a break (ms, Redis's
    clock), expiring after a break: see `common.redelivery`."""
    return f"{PREFIX}:{{{service}}}:reaping"


def limits_key(service: str) -> str:
    """Hash of the service's limits read by the enqueue script (`max_backlog`)."""
    return f"{PREFIX}:{{{service}}}:limits"


def done_key(service: str, bucket: int) -> str:
    """Hash call id -> encoded reply, for one time bucket of the deduplication window."""
    return f"{PREFIX}:{{{service}}}:done:{bucket}"


def instance_record_key(service: str) -> str:
    """Hash: instance id -> JSON instance record."""
    return f"{PREFIX}:{{{service}}}:records"


# Every reply inbox starts so; a worker pushes replies to no other key (`Call.decode`).
INBOX_PREFIX = f"{PREFIX}:inbox:"


def inbox_key(client_id: str) -> str:
    """The one reply list of an RPC client process."""
    return f"{INBOX_PREFIX}{client_id}"


def data_key(service: str, *parts: str) -> str:
    """A key owned by a service's own data (`sb:{iptv}:channels`, ...)."""
    return ":".join((f"{PREFIX}:{{{service}}}", *parts))


def task_stream(service: str, priority: int) -> str:
    """Fire-and-forget tasks of one priority (1: served first, 2: best effort)."""
    return f"{PREFIX}:{{{service}}}:tasks:{priority}"


def coalesce_key(service: str) -> str:
    """Hash: coalescing key -> entry id of the newest pending task with policy `last`."""
    return f"{PREFIX}:{{{service}}}:last"


def retry_key(service: str) -> str:
    """Sorted set of failed tasks' envelopes, scored by when they are due again (ms)."""
    return f"{PREFIX}:{{{service}}}:retry"


def dead_letter_key(service: str) -> str:
    """List of tasks that failed every attempt, newest first."""
    return f"{PREFIX}:{{{service}}}:dead"


def task_stats_key(service: str) -> str:
    """Hash of task counters kept in Redis (dropped, coalesced), shared by all callers."""
    return f"{PREFIX}:{{{service}}}:taskstats"


def push_channel(channel: str) -> str:
    """The Redis pub/sub channel behind a client-visible push channel (`iptv:now:7`).

    Clients of the websocket service subscribe by the short name; the prefix
    keeps them away from internal channels such as `REGISTRY_EVENTS`.
    """
    return f"{PREFIX}:push:{channel}"


def iptv_now_channel(channel_id: int | str) -> str:
    """The push channel of one iptv channel's "now playing" changes."""
    return f"iptv:now:{channel_id}"


# The live policy (`common.policy`): the current document (JSON), its version
# (an integer, polled by every gateway), the store's epoch (an id drawn by the
# first write into an empty store), the last versions (hash version -> JSON),
# the audit log (stream), and the channel told of every new version.
POLICY_DOC = f"{PREFIX}:{{policy}}:doc"
POLICY_VERSION = f"{PREFIX}:{{policy}}:version"
POLICY_EPOCH = f"{PREFIX}:{{policy}}:epoch"
POLICY_HISTORY = f"{PREFIX}:{{policy}}:history"
POLICY_AUDIT = f"{PREFIX}:{{policy}}:audit"
POLICY_CHANNEL = f"{PREFIX}:{{policy}}:changed"
