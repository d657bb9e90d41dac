"""Dead letters: tasks that failed every attempt, kept for inspection and replay.

A record is `<priority digit><8-digit envelope length><envelope><msgpack info>`
so the replay script (Lua) can cut the envelope out without decoding msgpack.
The list is capped (`DEAD_LETTER_CAP`, oldest dropped). A record that does not
have that form (written by an older version from an envelope whose priority was
not 1 or 2, which `Call.decode` now refuses) is listed as `{"unreadable": ...}`
and left in the list by replay (moved to its newest end), never cut wrong. CLI:

    python -m common.deadletters list iptv [--limit 20]
    python -m common.deadletters replay iptv [--limit 100]
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from common import codec, constants
from common.errors import shortened
from common.protocol import Call

# KEYS: dead list, priority-1 stream, priority-2 stream. ARGV: how many to replay.
# Oldest first; each record is moved atomically (pop + XADD), so a crash loses none.
# A record not of the documented form goes back to the list's newest end, each record
# is looked at once per run, and the envelope cut out must start as a msgpack map.
_REPLAY = """
local n = 0
local todo = math.min(tonumber(ARGV[1]), redis.call('LLEN', KEYS[1]))
for _ = 1, todo do
  local record = redis.call('RPOP', KEYS[1])
  if not record then break end
  local digit = string.sub(record, 1, 1)
  local header = string.sub(record, 2, 9)
  local size = string.match(header, '^%d%d%d%d%d%d%d%d$') and tonumber(header)
  local first = size and string.byte(record, 10)
  local is_map = first and ((first >= 0x80 and first <= 0x8f) or first == 0xde or first == 0xdf)
  if (digit == '1' or digit == '2') and is_map and #record >= 9 + size then
    local stream = KEYS[2]
    if digit == '2' then stream = KEYS[3] end
    redis.call('XADD', stream, '*', 'c', string.sub(record, 10, 9 + size))
    n = n + 1
  else
    redis.call('LPUSH', KEYS[1], record)
  end
end
return n
"""


def encode(call: Call, error: dict[str, Any]) -> bytes:
    """The dead-letter record of `call`, which failed with `error` on its last attempt."""
    fresh = Call(
        call.call_id, call.method, call.args, call.kwargs,
        time.time() + 86_400, None, call.request_id, priority=call.priority,
        policy=call.policy, key=call.key, attempt=1, max_attempts=call.max_attempts,
        who=call.who,
    )  # fmt: skip
    envelope = fresh.encode()
    info = codec.packb({"error": error, "attempts": call.attempt, "failed_at": time.time()})
    # One digit: `Call.decode` admits priorities 1 and 2 only.
    priority = 2 if call.priority == 2 else 1
    return f"{priority}{len(envelope):08d}".encode() + envelope + info


def decode(record: bytes) -> dict[str, Any]:
    """A record as plain data; `{"unreadable": <its start>}` when it is not of the
    documented form, so one bad record never hides the others."""
    try:
        return _decode(record)
    except Exception:
        return {"unreadable": shortened(repr(record[:200]))}


def _decode(record: bytes) -> dict[str, Any]:
    header = record[1:9]
    if record[:1] not in (b"1", b"2") or not (header.isdigit() and len(header) == 8):
        raise ValueError("not a dead-letter record")
    size = int(header)
    call = Call.decode(record[9 : 9 + size])
    info = codec.unpackb(record[9 + size :])
    return {
        "call_id": call.call_id,
        "method": call.method,
        "args": call.args,
        "kwargs": call.kwargs,
        "priority": call.priority,
        **info,
    }


class DeadLetters:
    """Inspect and replay a service's dead letters."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._replay = redis.register_script(_REPLAY)

    async def count(self, service: str) -> int:
        return int(await self.redis.llen(constants.dead_letter_key(service)))

    async def list(self, service: str, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` dead letters, decoded."""
        raw = await self.redis.lrange(constants.dead_letter_key(service), 0, limit - 1)
        return [decode(r if isinstance(r, bytes) else r.encode()) for r in raw]

    async def replay(self, service: str, limit: int = 1000) -> int:
        """Enqueue the oldest `limit` dead letters again (fresh attempts); returns how many."""
        keys = [
            constants.dead_letter_key(service),
            constants.task_stream(service, 1),
            constants.task_stream(service, 2),
        ]
        return int(await self._replay(keys=keys, args=[limit]))
