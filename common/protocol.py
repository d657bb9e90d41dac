"""The RPC wire protocol: envelopes, replies and the enqueue script.

A call is one stream entry on `sb:{service}:calls` with a single field `c`, the
msgpack-encoded envelope:

    {"v": 1,              protocol version
     "id": "<call id>",   unique per call; replies and (later) deduplication use it
     "m": "list_channels",method name within the service
     "a": [...], "k": {}, positional and keyword arguments
     "dl": 1732200000.5,  absolute deadline, epoch seconds; workers skip expired calls
     "rt": "sb:inbox:<client>" | None,  reply inbox (None for fire-and-forget `send`)
     "rid": "<request id>" | None,      request id for logs, end to end
     "who": {"sub", "kind", "scp", ...},  optional: the authenticated caller the call is
                                          made for (`common.caller.Caller.to_wire`)
     "p": 1 | 2, "pol": "execute" | "last" | "drop", "key": str | None,
     "att": 1, "max": 3}                task fields (fire-and-forget `send` only)

Fields are added without a new version: a worker ignores the fields it does not know
(one older than `who` ignores it), and every field added since version 1 is optional
(a call without `who` has no caller: a service calling another).

A reply is pushed onto the caller's inbox list:

    {"v": 1, "id": "<call id>", "ok": true, "r": <result>}
    {"v": 1, "id": "<call id>", "ok": false, "e": {"code", "message", "type"?, "details"?}}

Enqueueing is one Lua script, so "is any instance accepting?", "is the backlog
under its bound?" and "append the call" are a single atomic round trip: a call
to a service with no live instance fails at once with `ServiceUnavailable`, and
one to a saturated service with `Overloaded`, instead of waiting for a timeout.
While Redis refuses writes (out of memory, a read-only replica, a failed save), the
workers' heartbeats are refused too and their leases lapse: a call then is told that
Redis refuses the write, not "no live instance" (a 503 for a running service), the
scripts trying a write that changes nothing before they answer "no live instance".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common import codec
from common.constants import INBOX_PREFIX, PROTOCOL_VERSION
from common.errors import InvalidParams, SwitchboardError

# Results of the enqueue scripts other than an entry id.
NO_INSTANCE = 0
OVER_BACKLOG = -1
DROPPED = -2

POLICIES = ("execute", "last", "drop")
PRIORITIES = (1, 2)
# The most runs a task gets, whatever its envelope asks (`Call.decode` cuts `max` to it).
MAX_TASK_ATTEMPTS = 100
# How long a fire-and-forget message stays worth running if it waits in the queue
# (`RpcClient.send`'s ttl; the worker holds a task's writes as long: `common.outbox`).
DEFAULT_SEND_TTL = 300.0
# Priority-2 tasks stop being admitted when the backlog reaches the high watermark
# and are admitted again once it is under the low one (fractions of `max_backlog`).
HIGH_WATERMARK = 0.8
LOW_WATERMARK = 0.6

# The enqueue scripts' answer "no live instance" (KEYS[3]: the limits hash). If there is
# none because Redis refuses writes (out of memory, a read-only replica, a failed save),
# which refused the heartbeats too, the caller is told so: a write that changes nothing
# (a known service's limits hash holds max_backlog; 0, no bound, is what its absence
# means) fails then with Redis's error.
_NONE_LIVE = """
local function none_live()
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('HSETNX', KEYS[3], 'max_backlog', '0')
  end
  return 0
end
"""

# KEYS: accepting-instances zset, target task stream, limits hash, calls stream,
#       priority-1 stream, priority-2 stream, coalesce hash, task stats hash.
# ARGV: envelope, priority, policy, coalescing key ("" for none), high and low watermarks.
TASK_SCRIPT = (
    _NONE_LIVE
    + """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local policy = ARGV[3]
local function drop()
  redis.call('HINCRBY', KEYS[8], 'dropped', 1)
  return -2
end
if redis.call('ZCOUNT', KEYS[1], '(' .. now_ms, '+inf') == 0 then
  if policy == 'drop' then return drop() end
  return none_live()
end
local bound = tonumber(redis.call('HGET', KEYS[3], 'max_backlog') or '0')
if bound > 0 then
  local backlog = redis.call('XLEN', KEYS[4]) + redis.call('XLEN', KEYS[5])
    + redis.call('XLEN', KEYS[6])
  local high, low = bound * tonumber(ARGV[5]), bound * tonumber(ARGV[6])
  if policy == 'drop' and backlog >= high then return drop() end
  if ARGV[2] == '2' then
    local closed = redis.call('HGET', KEYS[3], 'p2_closed') == '1'
    if closed and backlog < low then
      redis.call('HSET', KEYS[3], 'p2_closed', '0')
      closed = false
    elseif (not closed) and backlog >= high then
      redis.call('HSET', KEYS[3], 'p2_closed', '1')
      closed = true
    end
    if closed then return -1 end
  elseif backlog >= bound then
    return -1
  end
end
local id = redis.call('XADD', KEYS[2], '*', 'c', ARGV[1])
if policy == 'last' and ARGV[4] ~= '' then
  local previous = redis.call('HGET', KEYS[7], ARGV[4])
  if previous and redis.call('XDEL', KEYS[2], previous) == 1 then
    redis.call('HINCRBY', KEYS[8], 'coalesced', 1)
  end
  redis.call('HSET', KEYS[7], ARGV[4], id)
end
return id
"""
)

# KEYS: accepting-instances zset, target stream (shared, or one instance's), limits hash.
# ARGV: encoded envelope, target instance id ("" for any).
ENQUEUE_SCRIPT = (
    _NONE_LIVE
    + """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] == '' then
  if redis.call('ZCOUNT', KEYS[1], '(' .. now_ms, '+inf') == 0 then
    return none_live()
  end
else
  local lease = redis.call('ZSCORE', KEYS[1], ARGV[2])
  if (not lease) or tonumber(lease) <= now_ms then
    return none_live()
  end
end
local bound = tonumber(redis.call('HGET', KEYS[3], 'max_backlog') or '0')
if bound > 0 and redis.call('XLEN', KEYS[2]) >= bound then
  return -1
end
return redis.call('XADD', KEYS[2], '*', 'c', ARGV[1])
"""
)


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
    priority: int = 1
    policy: str = "execute"
    key: str | None = None
    attempt: int = 1
    max_attempts: int = 1
    # Who the call is made for, in its wire form (`common.caller.Caller.to_wire`): the
    # worker builds the `Caller` for a handler that takes one only. None: made for no one.
    who: dict[str, Any] | None = None

    @property
    def is_task(self) -> bool:
        """Fire-and-forget: nobody waits for a reply."""
        return self.reply_to is None

    def encode(self) -> bytes:
        """The envelope as bytes; `InvalidParams` when the arguments cannot travel (the
        caller's mistake, which the gateway answers with a 422, not a crash)."""
        env: dict[str, Any] = {
            "v": self.version,
            "id": self.call_id,
            "m": self.method,
            "a": self.args,
            "k": self.kwargs,
            "dl": self.deadline,
            "rt": self.reply_to,
            "rid": self.request_id,
        }
        if self.who is not None:
            env["who"] = self.who
        if self.is_task:
            env.update(
                p=self.priority,
                pol=self.policy,
                key=self.key,
                att=self.attempt,
                max=self.max_attempts,
            )
        try:
            return codec.packb(env)
        except (TypeError, ValueError, OverflowError) as exc:
            # An unknown type, a lone surrogate in a string, nesting past msgpack's limit.
            what = codec.encode_failure(exc)
            raise InvalidParams(f"arguments cannot be sent over RPC: {what}") from None

    @classmethod
    def decode(cls, data: bytes) -> Call:
        """The envelope in `data`; `ValueError` (or `TypeError`, `KeyError`) for one no
        client writes, which the worker drops as malformed: a reply-to that is not an
        inbox (`sb:inbox:...`: a worker pushes to, and sets the expiry of, no other
        key), a request id or coalescing key that is not a string, a priority other
        than 1 or 2, an unknown policy, attempt numbers below 1, a caller that is not
        a map (its fields are checked when a handler takes it). The run limit
        (`max`) is cut to `MAX_TASK_ATTEMPTS`, the attempt to the limit.

        Hot path (every call): the checks of a call with a reply-to are two type
        checks and a prefix test (and a lookup for the caller); the task fields are
        read for tasks only, a caller's fields by the handlers taking it only.
        """
        env = codec.unpackb(data)
        get = env.get
        reply_to, request_id, who = get("rt"), get("rid"), get("who")
        if request_id is not None and type(request_id) is not str:
            raise ValueError("request id is not a string")
        if who is not None and type(who) is not dict:
            raise ValueError("caller is not a map")
        task: tuple[int, str, str | None, int, int] | tuple[()]
        if reply_to is None:
            task = _task_fields(env)
        elif type(reply_to) is not str or not reply_to.startswith(INBOX_PREFIX):
            raise ValueError("reply-to is not an inbox")
        else:
            task = ()  # a call: the task fields keep their defaults
        # Positional, in field order: the worker decodes every call (hot path).
        call = cls(
            str(env["id"]),
            str(env["m"]),
            list(get("a") or ()),
            dict(get("k") or {}),
            float(env["dl"]),
            reply_to,
            request_id,
            int(get("v", PROTOCOL_VERSION)),
            *task,
        )
        call.who = who
        return call


def _task_fields(env: dict[str, Any]) -> tuple[int, str, str | None, int, int]:
    """A task envelope's priority, policy, coalescing key, attempt and run limit,
    checked (`Call.decode`)."""
    get = env.get
    priority, policy, key = get("p", 1), get("pol", "execute"), get("key")
    attempt, max_attempts = get("att", 1), get("max", 1)
    if type(priority) is not int or priority not in PRIORITIES:
        raise ValueError("priority is not 1 or 2")
    if type(policy) is not str or policy not in POLICIES:
        raise ValueError("unknown task policy")
    if key is not None and type(key) is not str:
        raise ValueError("coalescing key is not a string")
    if type(attempt) is not int or type(max_attempts) is not int:
        raise ValueError("attempt numbers are not integers")
    if attempt < 1 or max_attempts < 1:
        raise ValueError("attempt numbers below 1")
    max_attempts = min(max_attempts, MAX_TASK_ATTEMPTS)
    return priority, policy, key, min(attempt, max_attempts), max_attempts


def ok_reply(call_id: str, result: Any) -> bytes:
    return codec.packb({"v": PROTOCOL_VERSION, "id": call_id, "ok": True, "r": result})


def error_reply(call_id: str, error: SwitchboardError) -> bytes:
    return codec.packb({"v": PROTOCOL_VERSION, "id": call_id, "ok": False, "e": error.to_dict()})
