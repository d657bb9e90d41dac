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
compact JSON: it is stored with every heartbeat and read by every gateway. For the
same reason `zone` is a short name like `version` (64 characters of `A-Za-z0-9._-`),
and `health_path` is at most `MAX_HEALTH_PATH` (2 KiB) of what a request target may
hold (RFC 3986's path and query characters: no space, control or non-ASCII character,
no `#`, no dot segment); the active checker GETs it as it is. Each field must have
its type (`version` and `zone` strings, `metadata` an object, `leaving` a boolean).
The address is `host:port`: the host an IP address (IPv6 in brackets, without a
`%scope`) or a DNS name, the port a number from 1 to 65535 (written without leading
zeros in the instance id). An IPv4 address is four decimal numbers without leading
zeros (`127.0.0.1`), nothing else: libc also reads `127.1`, `2130706433`, `0x7f000001`
or `0177.0.0.1` as addresses, which a check reading them as names would miss, and a
host whose last label is a number is no DNS name (RFC 3696 §2: no top-level domain
is all-numeric). An address that is the gateway's own (a loopback or unspecified
host at the gateway's port: `localhost` and names under it, `127.0.0.0/8`, `::1`,
`0.0.0.0`, `::`, and those IPv4 addresses IPv4-mapped, `[::ffff:127.0.0.1]`) is
refused: it would send the gateway's requests back to itself. Other names are not
resolved (a heartbeat would wait on DNS, and the answer may change after it): one
that leads back to the gateway loops until the `Via` mark stops it (508
`proxy_loop`, `common.forwarding.MAX_VIA_HOPS`) and the instance is ejected.

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

from common.instance_record import InstanceRecord
from common.registry import split_service_tag
from common.scopes import RESERVED_SERVICES
from webapi.errors import InvalidHeartbeat

# What a service may be called (the proxy matches `/svc/<name>/` against it too).
SERVICE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ZONE = _VERSION
# A DNS name: dot-separated labels of letters, digits and inner hyphens (a final dot
# allowed); 253 characters at most.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOST = re.compile(rf"(?=.{{1,253}}\.?$){_LABEL}(\.{_LABEL})*\.?")
# Labels libc's `inet_aton` reads as numbers (decimal, octal, `0x` hex): a host of
# them only is an IPv4 address to a connect; one whose last label is digits is no
# DNS name (module docstring). Either must then be a dotted quad.
_NUMBERS = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)(?:\.(?:[0-9]+|0[xX][0-9A-Fa-f]*))*\.?")
_DIGITS = re.compile(r"[0-9]+")
MAX_HEALTH_PATH = 2048
# RFC 3986 path and query characters (unreserved, sub-delims, ":", "@", "/", "?", "%").
_HEALTH_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]{0," + str(MAX_HEALTH_PATH - 1) + "}")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9_.@:\[\]-]{1,200}$")
_KINDS = ("http", "ws")
_MAX_INSTANCES_PER_BEAT = 100
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits: str.isdigit() takes "²", which int() refuses
MAX_METADATA_DEPTH = 8
MAX_METADATA_BYTES = 4096


def parse_heartbeat(body: dict[str, Any], gateway_port: int | None = None) -> list[InstanceRecord]:
    """The instance records a heartbeat body announces, or `InvalidHeartbeat`.
    `gateway_port`: the port the gateway listens on (its own address is refused)."""
    if not isinstance(body.get("leaving", False), bool):
        raise InvalidHeartbeat("leaving must be true or false")
    records = _parse_original(body["params"]) if "params" in body else [_record(body)]
    if gateway_port is not None:
        for record in records:
            if record.address and _is_gateway(record.address, gateway_port):
                raise InvalidHeartbeat(
                    f"address {record.address} is the gateway's own: its requests would loop"
                )
    return records


def valid_health_path(value: object) -> bool:
    """Whether `value` is a health path a heartbeat may give (module docstring)."""
    return (
        isinstance(value, str)
        and _HEALTH_PATH.fullmatch(value) is not None
        and not _DOT_SEGMENT.search(value.partition("?")[0])
    )


_DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")


def _is_gateway(address: str, port: int) -> bool:
    """Whether `address` names this gateway: its port on a loopback or unspecified host
    (any other host's port may well be a backend's; that loop is caught per request)."""
    host, _, text = address.rpartition(":")
    if int(text) != port:
        return False
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761 §6.3: loopback
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket connects to the IPv4 address
    return ip.is_loopback or ip.is_unspecified


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
        address = _address(item.get("addrip"))
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
    version = item.get("version", "0")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise InvalidHeartbeat(f"version must be a string matching {_VERSION.pattern}")
    weight = item.get("weight", 1)
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 < weight <= 1000:
        raise InvalidHeartbeat("weight must be an integer from 1 to 1000")
    health_path = item.get("health_path")
    if health_path is not None and not valid_health_path(health_path):
        raise InvalidHeartbeat(
            f"health_path must be an absolute path of at most {MAX_HEALTH_PATH} characters"
            " a request target allows (no space, control, non-ASCII or dot segment)"
        )
    zone = item.get("zone")
    if zone is not None and (not isinstance(zone, str) or not _ZONE.fullmatch(zone)):
        raise InvalidHeartbeat(f"zone must be a string matching {_ZONE.pattern}")
    metadata = item.get("metadata")
    metadata = {} if metadata is None else _metadata(metadata)
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
        if "%" in host:
            raise InvalidHeartbeat("address: an IPv6 host with a %scope is not supported")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidHeartbeat("address has an invalid IPv6 host") from None
    elif not _HOST.fullmatch(host):
        raise InvalidHeartbeat("address must have an IP address or a DNS name as its host")
    elif _numeric(host) and not _ipv4(host):
        raise InvalidHeartbeat(
            "address: an IPv4 host must be four decimal numbers without leading zeros"
        )
    return f"{host}:{int(port)}"  # one spelling per address: `00080` is `80`


def _numeric(host: str) -> bool:
    """Whether `host` (a DNS name by its characters) is numbers only, or ends in one."""
    return bool(_NUMBERS.fullmatch(host) or _DIGITS.fullmatch(host.rstrip(".").rpartition(".")[2]))


def _ipv4(host: str) -> bool:
    """Whether `host` is an IPv4 address in dotted-quad form (`ipaddress` takes no other)."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


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
