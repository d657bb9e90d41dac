"""Dead letters: tasks that failed every attempt, kept for inspection and replay.

A record is `<priority digit><8-digit envelope length><envelope><msgpack info>`
so the replay script (Lua) can cut the envelope out without decoding msgpack.
The list is capped (`DEAD_LETTER_CAP`, oldest dropped). CLI:

    python -m common.deadletters list iptv [--limit 20]
    python -m common.deadletters replay iptv [--limit 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import redis.asyncio as aioredis

from common import codec, constants
from common.connection import connect
from common.protocol import Call
from common.settings import get_settings

# KEYS: dead list, priority-1 stream, priority-2 stream. ARGV: how many to replay.
# Oldest first; each record is moved atomically (pop + XADD), so a crash loses none.
_REPLAY = """
local n = 0
for _ = 1, tonumber(ARGV[1]) do
  local record = redis.call('RPOP', KEYS[1])
  if not record then break end
  local stream = KEYS[2]
  if string.sub(record, 1, 1) == '2' then stream = KEYS[3] end
  local size = tonumber(string.sub(record, 2, 9))
  redis.call('XADD', stream, '*', 'c', string.sub(record, 10, 9 + size))
  n = n + 1
end
return n
"""


def encode(call: Call, error: dict[str, Any]) -> bytes:
    """The dead-letter record of `call`, which failed with `error` on its last attempt."""
    fresh = Call(
        call.call_id, call.method, call.args, call.kwargs,
        time.time() + 86_400, None, call.request_id, priority=call.priority,
        policy=call.policy, key=call.key, attempt=1, max_attempts=call.max_attempts,
    )  # fmt: skip
    envelope = fresh.encode()
    info = codec.packb({"error": error, "attempts": call.attempt, "failed_at": time.time()})
    return f"{call.priority}{len(envelope):08d}".encode() + envelope + info


def decode(record: bytes) -> dict[str, Any]:
    size = int(record[1:9])
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


async def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.deadletters")
    parser.add_argument("action", choices=("list", "replay"))
    parser.add_argument("service")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args(argv)
    redis = connect(get_settings().require_redis_url(), name="deadletters")
    try:
        letters = DeadLetters(redis)
        if args.action == "list":
            for letter in await letters.list(args.service, args.limit):
                print(json.dumps(letter, default=codec.json_default))
        else:
            print(f"replayed {await letters.replay(args.service, args.limit)}")
    finally:
        await redis.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main(sys.argv[1:])))
