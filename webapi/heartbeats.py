"""Registration of HTTP/WebSocket backends by heartbeat (`POST /heartbeat`).

Two forms are accepted:

- the original dispatcher's: `{"params": {"data": [{"servicename": "nlp_v2",
  "addrip": "10.0.0.5:8080"}]}}`: the name is `service_tag`, split at the first
  `_` (`nlp_v2` is service `nlp`, tag `v2`; `nlp` alone has tag "0");
- the native one: `{"service": "nlp", "address": "10.0.0.5:8080", "kind": "http",
  "version": "v2", "weight": 1, "zone": null, "health_path": "/health",
  "metadata": {}, "instance_id": "optional"}`.

`metadata` is a JSON object of at most `MAX_METADATA_DEPTH` (8) levels of
nesting (the object itself is the first) and `MAX_METADATA_BYTES` (4 KiB) as
compact JSON: it is stored with every heartbeat and read by every gateway.

An instance's id defaults to `service@address` (the original form: the whole
`service_tag` name, `nlp_v2@10.0.0.5:8080`), stable across heartbeats. It is
live for `HEARTBEAT_TTL` (3 s) after each heartbeat. A backend shutting down
gracefully sends its native heartbeat once more with `"leaving": true`: it is
removed at once instead of after the TTL.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from common.registry import InstanceRecord, split_service_tag
from common.scopes import RESERVED_SERVICES
from webapi.errors import InvalidHeartbeat

# What a service may be called (the proxy matches `/svc/<name>/` against it too).
SERVICE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}$")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9_.@:\[\]-]{1,200}$")
_KINDS = ("http", "ws")
_MAX_INSTANCES_PER_BEAT = 100
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits: str.isdigit() takes "²", which int() refuses
MAX_METADATA_DEPTH = 8
MAX_METADATA_BYTES = 4096


def parse_heartbeat(body: dict[str, Any]) -> list[InstanceRecord]:
    """The instance records a heartbeat body announces, or `InvalidHeartbeat`."""
    if "params" in body:
        return _parse_original(body["params"])
    return [_record(body)]


def _parse_original(params: Any) -> list[InstanceRecord]:
    data = params.get("data") if isinstance(params, dict) else None
    if not isinstance(data, list) or not data:
        raise InvalidHeartbeat("params.data must be a non-empty list")
    if len(data) > _MAX_INSTANCES_PER_BEAT:
        raise InvalidHeartbeat(f"at most {_MAX_INSTANCES_PER_BEAT} instances per heartbeat")
    records = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InvalidHeartbeat(f"params.data[{i}] must be an object")
        name = item.get("servicename")
        if not isinstance(name, str):
            raise InvalidHeartbeat(f"params.data[{i}].servicename must be a string")
        service, tag = split_service_tag(name)
        address = item.get("addrip")
        # The whole name in the id: `nlp_v1` and `nlp_v2` served at one address are two
        # instances (one per version), not one whose version flips with each heartbeat.
        records.append(_record({"service": service, "version": tag or "0", "address": address,
                                "instance_id": f"{name}@{address}"}))  # fmt: skip
    return records


def _record(item: dict[str, Any]) -> InstanceRecord:
    service = item.get("service")
    if not isinstance(service, str) or not SERVICE_NAME.fullmatch(service):
        raise InvalidHeartbeat(f"service must match {SERVICE_NAME.pattern}")
    if service in RESERVED_SERVICES:
        raise InvalidHeartbeat(f"service {service!r} is reserved: pick another name")
    address = _address(item.get("address"))
    kind = item.get("kind", "http")
    if kind not in _KINDS:
        raise InvalidHeartbeat(f"kind must be one of {', '.join(_KINDS)}")
    version = str(item.get("version", "0"))
    if not _VERSION.fullmatch(version):
        raise InvalidHeartbeat(f"version must match {_VERSION.pattern}")
    weight = item.get("weight", 1)
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 < weight <= 1000:
        raise InvalidHeartbeat("weight must be an integer from 1 to 1000")
    health_path = item.get("health_path")
    if health_path is not None and (
        not isinstance(health_path, str) or not health_path.startswith("/") or ".." in health_path
    ):
        raise InvalidHeartbeat("health_path must be an absolute path")
    zone = item.get("zone")
    if zone is not None and not isinstance(zone, str):
        raise InvalidHeartbeat("zone must be a string")
    metadata = _metadata(item.get("metadata") or {})
    instance_id = item.get("instance_id") or f"{service}@{address}"
    if not isinstance(instance_id, str) or not _INSTANCE_ID.fullmatch(instance_id):
        raise InvalidHeartbeat("instance_id must be a short name")
    return InstanceRecord(
        service=service,
        instance_id=instance_id,
        kind=kind,
        address=address,
        host=address.rsplit(":", 1)[0],
        pid=0,
        version=version,
        weight=weight,
        zone=zone,
        metadata=metadata,
        health_path=health_path,
    )


def _address(value: Any) -> str:
    """`host:port` with a plausible host and a TCP port; IPv6 as `[::1]:8080`."""
    if not isinstance(value, str):
        raise InvalidHeartbeat("address must be host:port")
    host, sep, port = value.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise InvalidHeartbeat("address must be host:port with a port from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidHeartbeat("address has an invalid IPv6 host") from None
    elif not _HOST.fullmatch(host):
        raise InvalidHeartbeat("address has an invalid host")
    return value


def _metadata(value: Any) -> dict[str, Any]:
    """`value` if it is an object within the bounds of the module docstring."""
    if not isinstance(value, dict):
        raise InvalidHeartbeat("metadata must be an object")
    # Measured without recursion: the record is copied and encoded recursively later,
    # and a body nested hundreds deep must be refused here, not crash there.
    level: list[Any] = [value]
    for depth in range(1, MAX_METADATA_DEPTH + 2):
        if not level:
            break
        if depth > MAX_METADATA_DEPTH:
            raise InvalidHeartbeat(f"metadata may nest at most {MAX_METADATA_DEPTH} levels deep")
        level = [child for node in level
                 for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, dict | list)]  # fmt: skip
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    size = len(text.encode(errors="surrogatepass"))  # a lone surrogate is not this check's
    if size > MAX_METADATA_BYTES:
        raise InvalidHeartbeat(f"metadata may be at most {MAX_METADATA_BYTES} bytes as JSON")
    return value
