"""Redelivery: taking over the calls of dead instances, and answering them once.

Every worker runs `reclaim()` each `reap_interval`: the script moves the pending
entries of every consumer whose heartbeat lease has ended (a SIGKILLed, stopped,
partitioned or hung instance: a worker's lease is renewed from a thread while its
event loop makes progress, `common.lease`) to this worker, across the call stream
and both task streams, each with its delivery count (how many times a worker was
handed it, this time included) for the worker's `max_deliveries` check. Before running a
reclaimed call, the worker asks `stored_reply()`: a call whose first run completed
left its reply in the deduplication window (two time buckets), and that reply is
sent again instead of running twice.
`move_due_retries()` puts failed tasks whose retry delay has passed back onto
their priority's stream.

After Redis was away: a grace. An outage (Redis down, restarting, stopped, paused, or
refusing writes) longer than the lease ends every worker's lease, the live ones' too,
and they are renewed one by one as each worker's next heartbeat gets through. The
first worker whose reaper ran then took the calls of the others, still running them:
each such call ran twice, or three times when another reaper took it back (two
workers, leases of 3 s, an 8 s call, Redis away for 4 s: stopped by SIGSTOP, it ran
more than once in 6 tries of 8, five of them three times; paused by `CLIENT PAUSE`,
twice in 4 of 8; restarted, once in 8 of 8, the workers' heartbeats winning that
race). So reclaiming waits, after a break, until every live worker has had
time to renew: the script keeps a key (`constants.reaping_key`) holding when the
service's reapers began reclaiming without a break, which expires after `gap` without
a reclaim, and reclaims nothing until `grace` (one lease and one heartbeat interval)
after that beginning. A break longer than `gap` (Redis away, or every worker of the
service gone or stalled) starts a new beginning, and so does the service's first
reaper: a worker started alone after the others died waits the grace too. Outside
that, nothing changes: a dead worker's calls are reclaimed as soon as its lease
lapses, by any worker reaping meanwhile.

Why in the script, not in the worker that lost touch (as `common.rejoin` is for the
caller): the worker does not always know. A Redis that stops answering without
closing anything (stopped, paused, a network partition, a long fork) leaves the
reaper's last command waiting in the socket; it runs the moment Redis answers again,
before any failure was seen, and (tried) sometimes before the other workers'
heartbeats. The key is Redis's own record, on Redis's clock, of whether reclaims
went on without a break; it is read and written in the same script that reclaims, so
no command in flight can slip past it, and every worker obeys it, including one that
never saw the outage. `gap` must tell an outage long enough to end a live worker's
lease (longer than the lease less a heartbeat interval and the lease thread's tick)
from a reaper's normal pace (one interval, plus its loop's delays): it is
`max(ttl - 2 intervals, 1.5 intervals)`, exact when the lease is at least three
intervals (the default: 3 s and 1 s); a shorter lease may miss outages under
1.5 intervals. A worker with no free slot still runs the script (claiming nothing),
so that a saturated service does not break the record. A partition of one worker
from Redis (the others reaching it) is not a break: its calls are reclaimed once its
lease lapses and may run twice (at-least-once, `common.worker`).
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from common import constants
from common.redis_failures import REDIS_DOWN_OR_REFUSING

# KEYS: the shared streams (calls, tasks:1, tasks:2), the leases zset, the reaping key.
# ARGV: group, this consumer, max calls to claim, gap ms, grace ms.
# First notes this reclaim in the reaping key (when reclaims began without a break
# longer than the gap) and claims nothing within the grace after that beginning.
# Then moves the pending entries of consumers without a live lease to this consumer
# and returns them as {stream index, entry, delivery count}; entries deleted
# meanwhile are acked; emptied dead consumers are removed. XCLAIM counts one more
# delivery.
_RECLAIM = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reaping = KEYS[#KEYS]
local began = tonumber(redis.call('GET', reaping)) or now_ms
redis.call('SET', reaping, began, 'PX', ARGV[4])
local budget = tonumber(ARGV[3])
if now_ms < began + tonumber(ARGV[5]) or budget <= 0 then
  return {}
end
local leases = KEYS[#KEYS - 1]
local claimed = {}
for si = 1, #KEYS - 2 do
  local stream = KEYS[si]
  local consumers = redis.pcall('XINFO', 'CONSUMERS', stream, ARGV[1])
  if type(consumers) == 'table' and not consumers.err then
    for _, c in ipairs(consumers) do
      local name, pending = c[2], tonumber(c[4])
      if name ~= ARGV[2] and budget > 0 then
        local lease = redis.call('ZSCORE', leases, name)
        if (not lease) or tonumber(lease) <= now_ms then
          if pending > 0 then
            local entries = redis.call('XPENDING', stream, ARGV[1], '-', '+', budget, name)
            local ids, counts = {}, {}
            for _, e in ipairs(entries) do
              ids[#ids + 1] = e[1]
              counts[e[1]] = tonumber(e[4]) + 1
            end
            if #ids > 0 then
              local got = redis.call('XCLAIM', stream, ARGV[1], ARGV[2], 0, unpack(ids))
              local present = {}
              for _, g in ipairs(got) do
                if g then
                  present[g[1]] = true
                  claimed[#claimed + 1] = {si, g, counts[g[1]]}
                end
              end
              for _, id in ipairs(ids) do
                if not present[id] then redis.call('XACK', stream, ARGV[1], id) end
              end
              budget = budget - #ids
              pending = pending - #ids
            end
          end
          if pending <= 0 then
            redis.call('XGROUP', 'DELCONSUMER', stream, ARGV[1], name)
          end
        end
      end
    end
  end
end
return claimed
"""

# KEYS: retry zset, tasks:1 stream, tasks:2 stream. ARGV: max to move.
# Moves failed tasks whose retry is due back onto their priority's stream.
_MOVE_DUE = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local stream = KEYS[2]
  if string.sub(member, 1, 1) == '2' then stream = KEYS[3] end
  redis.call('XADD', stream, '*', 'c', string.sub(member, 2))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


class Redelivery:
    """The redelivery side of one worker (one service, one consumer)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        service: str,
        consumer: str,
        bucket_seconds: float,
        *,
        lease_ttl: float,
        reap_interval: float,
    ) -> None:
        """`lease_ttl`, `reap_interval`: the heartbeat lease and interval (the reaper
        runs every interval), which set the break (`gap`) after which reclaiming waits
        a `grace` (see the module's docstring)."""
        self.redis = redis
        self.service = service
        self.consumer = consumer
        self.bucket_seconds = bucket_seconds
        self.shared = [
            constants.call_stream(service),
            constants.task_stream(service, 1),
            constants.task_stream(service, 2),
        ]
        self._reclaim_keys = [
            *self.shared,
            constants.leases_key(service),
            constants.reaping_key(service),
        ]
        self._gap_ms = int(max(lease_ttl - 2 * reap_interval, 1.5 * reap_interval) * 1000)
        self._grace_ms = int((lease_ttl + reap_interval) * 1000)
        self._retry_keys = [constants.retry_key(service), *self.shared[1:]]
        self._reclaim = redis.register_script(_RECLAIM)
        self._move_due = redis.register_script(_MOVE_DUE)

    async def reclaim(self, budget: int) -> list[tuple[str, bytes, dict[bytes, bytes], int]]:
        """Up to `budget` entries of dead consumers, now ours: (stream, entry id, fields,
        delivery count); none within the grace after a break (see the module's
        docstring). Run it with a budget of 0 when there is no room: it notes the
        reclaim all the same."""
        args: list[str | int] = [
            constants.WORKER_GROUP,
            self.consumer,
            budget,
            self._gap_ms,
            self._grace_ms,
        ]
        claimed = await self._reclaim(keys=self._reclaim_keys, args=args)
        return [
            (
                self.shared[int(index) - 1],
                entry_id,
                dict(zip(flat[::2], flat[1::2], strict=True)),
                int(deliveries),
            )
            for index, (entry_id, flat), deliveries in claimed
        ]

    async def move_due_retries(self, limit: int = 1000) -> int:
        """Put failed tasks whose retry is due back onto their streams; how many."""
        return int(await self._move_due(keys=self._retry_keys, args=[limit]))

    async def stored_reply(self, call_id: str) -> bytes | None:
        """The reply of a completed first run, from the current or previous bucket."""
        bucket = int(time.time() // self.bucket_seconds)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for b in (bucket, bucket - 1):
                    pipe.hget(constants.done_key(self.service, b), call_id)
                found: list[Any] = await pipe.execute()
        except REDIS_DOWN_OR_REFUSING:  # BUSY, LOADING refuse reads too; a call must not
            return None  # be left unanswered for it. Unknown: run the call (at-least-once)
        stored = next((r for r in found if r is not None), None)
        return bytes(stored) if stored is not None else None
