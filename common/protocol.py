"""The RPC wire protocol: envelopes, replies and the enqueue script.

A call is one stream entry on `sb:{service}:calls` with a single field `c`, the
msgpack-encoded envelope:

    {"v": 1,              protocol version
     "id": "<call id>",   unique per call; replies and (later) deduplication use it
     "m": "list_channels",method name within the service
     "a": [...], "k": {}, positional and keyword arguments
     "dl": 1732200000.5,  absolute deadline, epoch seconds; workers skip expired calls
     "rt": "sb:inbox:<client>" | None,  reply inbox (None for fire-and-forget `send`)
     "rid": "<request id>" | None}      request id for logs, end to end

A reply is pushed onto the caller's inbox list:

    {"v": 1, "id": "<call id>", "ok": true, "r": <result>}
    {"v": 1, "id": "<call id>", "ok": false, "e": {"code", "message", "type"?, "details"?}}

Enqueueing is one Lua script, so "is any instance accepting?", "is the backlog
under its bound?" and "append the call" are a single atomic round trip: a call
to a service with no live instance fails at once with `ServiceUnavailable`, and
one to a saturated service with `Overloaded`, instead of waiting for a timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common import codec
from common.constants import PROTOCOL_VERSION
from common.errors import SwitchboardError

# Results of the enqueue script other than an entry id.
NO_INSTANCE = 0
OVER_BACKLOG = -1

# KEYS: accepting-instances zset, target stream (shared, or one instance's), limits hash.
# ARGV: encoded envelope, target instance id ("" for any).
ENQUEUE_SCRIPT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] == '' then
  if redis.call('ZCOUNT', KEYS[1], '(' .. now_ms, '+inf') == 0 then
    return 0
  end
else
  local lease = redis.call('ZSCORE', KEYS[1], ARGV[2])
  if (not lease) or tonumber(lease) <= now_ms then
    return 0
  end
end
local bound = tonumber(redis.call('HGET', KEYS[3], 'max_backlog') or '0')
if bound > 0 and redis.call('XLEN', KEYS[2]) >= bound then
  return -1
end
return redis.call('XADD', KEYS[2], '*', 'c', ARGV[1])
"""


@dataclass(slots=True)
class Call:
    """A decoded call envelope."""

    call_id: str
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    deadline: float
    reply_to: str | None
    request_id: str | None
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return codec.packb(
            {
                "v": self.version,
                "id": self.call_id,
                "m": self.method,
                "a": self.args,
                "k": self.kwargs,
                "dl": self.deadline,
                "rt": self.reply_to,
                "rid": self.request_id,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Call:
        env = codec.unpackb(data)
        return cls(
            call_id=str(env["id"]),
            method=str(env["m"]),
            args=list(env.get("a") or []),
            kwargs=dict(env.get("k") or {}),
            deadline=float(env["dl"]),
            reply_to=env.get("rt"),
            request_id=env.get("rid"),
            version=int(env.get("v", PROTOCOL_VERSION)),
        )


def ok_reply(call_id: str, result: Any) -> bytes:
    return codec.packb({"v": PROTOCOL_VERSION, "id": call_id, "ok": True, "r": result})


def error_reply(call_id: str, error: SwitchboardError) -> bytes:
    return codec.packb({"v": PROTOCOL_VERSION, "id": call_id, "ok": False, "e": error.to_dict()})
