"""One instance's record in the registry, as stored in Redis (JSON) and read back.

Read back strictly: a record is stored by whoever heartbeats, and one written by hand
or by a faulty client must be refused by name (`MalformedRecord`), not reach the
balancer, which is compiled and checks the types it is given.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class InstanceRecord:
    """What the registry knows of one running instance."""

    service: str
    instance_id: str
    kind: str = "rpc"  # rpc | http | ws
    address: str | None = None  # host:port for http/ws instances
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    version: str = "0"
    weight: int = 1
    zone: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    health_path: str | None = None  # http/ws instances: GET this for active health checks

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> InstanceRecord:
        """The record stored as `raw`; fields it does not know are ignored (a newer
        version's). Raises `MalformedRecord` for anything but a JSON object whose known
        fields have their types: a record written into Redis by hand or by a faulty
        client must not reach the balancer (compiled, it checks the types it is given)."""
        try:
            data = json.loads(raw)
        except ValueError as exc:  # (UnicodeDecodeError is one)
            raise MalformedRecord(f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise MalformedRecord(f"not a JSON object but {type(data).__name__}")
        known = {k: v for k, v in data.items() if k in _FIELD_TYPES}
        for name in ("service", "instance_id"):
            if name not in known:
                raise MalformedRecord(f"no {name!r}")
        for name, value in known.items():
            types = _FIELD_TYPES[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise MalformedRecord(f"{name!r} is {type(value).__name__}: {value!r:.80}")
        if isinstance(known.get("started_at"), int):
            known["started_at"] = float(known["started_at"])
        return cls(**known)


class MalformedRecord(ValueError):
    """A stored instance record that is not one (`InstanceRecord.from_json`)."""


_NONE = type(None)
# Each field's accepted JSON types (a bool is not an int here, unless listed).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "service": (str,),
    "instance_id": (str,),
    "kind": (str,),
    "address": (str, _NONE),
    "host": (str,),
    "pid": (int,),
    "version": (str,),
    "weight": (int,),
    "zone": (str, _NONE),
    "metadata": (dict,),
    "started_at": (int, float),
    "health_path": (str, _NONE),
}
