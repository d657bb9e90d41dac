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


def call_stream(service: str) -> str:
    """The stream all instances of `service` consume (competing consumers)."""
    return f"{PREFIX}:{{{service}}}:calls"


def instances_key(service: str) -> str:
    """Sorted set: instance id scored by the time its heartbeat lease expires."""
    return f"{PREFIX}:{{{service}}}:instances"


def instance_record_key(service: str) -> str:
    """Hash: instance id -> JSON instance record."""
    return f"{PREFIX}:{{{service}}}:records"


def inbox_key(client_id: str) -> str:
    """The one reply list of an RPC client process."""
    return f"{PREFIX}:inbox:{client_id}"


def data_key(service: str, *parts: str) -> str:
    """A key owned by a service's own data (`sb:{iptv}:channels`, ...)."""
    return ":".join((f"{PREFIX}:{{{service}}}", *parts))
