"""Rate limits shared by every gateway replica: GCRA in one Redis script.

```python
limiter = RateLimiter(redis)
decision = await limiter.check([("login:ip:1.2.3.4", Limit(rate=30, period=60, burst=10))])
if not decision.allowed:
    ...  # 429, Retry-After: decision.retry_after
```

GCRA (the generic cell rate algorithm) keeps one number per key, the
*theoretical arrival time* (TAT): with emission interval `T = period / rate`
and burst `B`, a request is allowed when `TAT - now <= (B - 1) * T`, and then
moves the TAT on by `T`. A fresh key therefore allows exactly `B` requests back
to back, then one every `T`. Time is Redis `TIME`, in whole microseconds, so
every replica and every clock agrees and the arithmetic is exact.

All checks of one request pass or none consumes. One round trip is in flight at
a time: a check arriving when Redis is idle goes out at once from its own task;
checks arriving meanwhile are sent together by one writer task as a single
EVALSHA when it returns (at one caller that is one round trip per check, at
many callers far fewer). The script reads each key once per batch.

Every key is `sb:{ratelimit}:<key>`: one hash tag, so the multi-key script is
legal in Redis Cluster (all limits live on one shard; a script runs on one node
anyway).

When Redis is unreachable (or errs, or is slower than `timeout`), the limiter
says so once in the log and answers without it until a background probe gets
an answer: "local" enforces the same limits in this process alone, "open"
allows everything, "closed" raises `ServiceUnavailable`.

The algorithm's values (`Limit`, `Decision`) and its in-process twin
(`LocalGcra`) live in `common.gcra`.

Hot path: `RateLimiter.check`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.aio import Backoff, cancel_and_wait, cancelling
from common.connection import REDIS_DOWN_OR_SLOW
from common.constants import PREFIX
from common.errors import ConfigError, ServiceUnavailable
from common.gcra import NO_LIMIT, Checks, Decision, Limit, LocalGcra
from common.log import get_logger

log = get_logger("switchboard.ratelimit")

KEY_PREFIX = f"{PREFIX}:{{ratelimit}}:"
ON_REDIS_DOWN: tuple[str, ...] = ("local", "open", "closed")

# Requests per EVALSHA: bounds the script's run time (Redis is single-threaded).
_MAX_BATCH = 1000
# Anything Redis may answer instead of a result (READONLY, OOM, LOADING, ...): the
# limiter then degrades rather than turning every gateway request into a 500.
_UNAVAILABLE: tuple[type[BaseException], ...] = (*REDIS_DOWN_OR_SLOW, RedisError)

# ARGV[1] holds the whole batch as space-separated integers (one argument instead of
# thousands: packing arguments is most of redis-py's cost): per request n, then n
# times (key index, emission interval us, burst tolerance us).
# Reply, per request: allowed (1/0), limit, remaining, reset us, retry-after us, for the
# most restrictive check (largest retry-after, then fewest remaining, then latest reset).
GCRA_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local argv, n = {}, 0
for token in string.gmatch(ARGV[1] or '', '%d+') do
  n = n + 1
  argv[n] = tonumber(token)
end
local tats, dirty, out = {}, {}, {}
local i = 1
while i <= n do
  local count = argv[i]
  i = i + 1
  local pending = {}
  local ok = true
  local limit, remaining, reset, retry = 0, 0, 0, -1
  for _ = 1, count do
    local k, t, tau = argv[i], argv[i + 1], argv[i + 2]
    i = i + 3
    local tat = pending[k] or tats[k]
    if tat == nil then
      tat = tonumber(redis.call('GET', KEYS[k]) or 0)
      tats[k] = tat
    end
    if tat < now then tat = now end
    local c_remaining, c_reset, c_retry
    if tat - now > tau then
      ok = false
      c_remaining, c_reset, c_retry = 0, tat - now, tat - now - tau
    else
      pending[k] = tat + t
      c_reset, c_retry = tat + t - now, 0
      c_remaining = math.floor((tau - c_reset) / t) + 1
    end
    if c_retry > retry or (c_retry == retry and (c_remaining < remaining
        or (c_remaining == remaining and c_reset > reset))) then
      limit, remaining, reset, retry = tau / t + 1, c_remaining, c_reset, c_retry
    end
  end
  if ok then
    for k, tat in pairs(pending) do
      tats[k] = tat
      dirty[k] = true
    end
  end
  out[#out + 1] = ok and 1 or 0
  out[#out + 1] = limit
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
end
for k in pairs(dirty) do
  local tat = tats[k]
  redis.call('SET', KEYS[k], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000))
end
return out
"""


_Pending = tuple[Checks, "asyncio.Future[Decision]"]


class RateLimiter:
    """Checks rate limits in Redis for one process; share one instance.

    `on_redis_down`: "local", "open" or "closed" (see the module docstring);
    `timeout`: seconds a round trip may take before Redis counts as down;
    `local_max_keys`: bound on the keys the "local" fallback remembers.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        on_redis_down: str = "local",
        timeout: float = 0.5,
        local_max_keys: int = 100_000,
    ) -> None:
        if on_redis_down not in ON_REDIS_DOWN:
            raise ConfigError(f"on_redis_down must be one of {', '.join(ON_REDIS_DOWN)}")
        self.redis = redis
        self.on_redis_down = on_redis_down
        self.timeout = timeout
        self._script = redis.register_script(GCRA_SCRIPT)
        self._local = LocalGcra(local_max_keys)
        self._queue: list[_Pending] = []
        self._in_flight: list[_Pending] = []  # the writer's batch, failed by `close`
        # One round trip in flight at a time: checks arriving meanwhile all go in
        # the next one (the batch grows with the load, the EVALSHA count does not).
        self._busy = False
        # True while checks come one at a time: a check may then skip the writer.
        self._quiet = True
        self._wakeup: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._down = False

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and checks are answered without it."""
        return self._down

    async def check(self, checks: Checks) -> Decision:
        """Apply every `(key, limit)` of one request: all consume, or none does.

        Hot path (every gateway request): at most one future, no task, no log line.
        Returns the most restrictive check's decision (`NO_LIMIT` for no checks);
        raises `ServiceUnavailable` only in mode "closed" while Redis is down.
        """
        if self._down:
            return self._without_redis(checks)
        if not checks:
            return NO_LIMIT
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="ratelimit-writer")
        if self._quiet and not self._busy and not self._queue:
            return await self._check_alone(checks)
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._queue.append((checks, future))
        self._wake()
        return await future

    async def close(self) -> None:
        """Stop the writer; checks still waiting fail with `ServiceUnavailable`."""
        await cancel_and_wait(self._writer)
        self._writer = None
        waiting = self._in_flight + self._queue
        self._in_flight, self._queue = [], []
        for _checks, future in waiting:
            if not future.done():
                future.set_exception(ServiceUnavailable("rate limiter closed"))

    async def _check_alone(self, checks: Checks) -> Decision:
        """Nothing else in flight: send from the caller's own task.

        Saves the hand-off to the writer and back (two task switches, about a
        tenth of the CPU of a check at one caller). Checks arriving meanwhile
        queue up for the writer, and while they do, every check goes through it.
        """
        self._busy = True
        try:
            async with asyncio.timeout(self.timeout):
                replies = await self._evaluate(((checks, None),))
        except _UNAVAILABLE as exc:
            self._go_down(exc)
            return self._without_redis(checks)
        finally:
            self._busy = False
            self._quiet = not self._queue
            self._wake()
        return _decision(replies, 0)

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _without_redis(self, checks: Checks) -> Decision:
        if not checks:
            return NO_LIMIT
        if self.on_redis_down == "local":
            return self._local.check(checks)
        if self.on_redis_down == "open":
            limit = min(lim.burst for _key, lim in checks)
            return Decision(True, limit, limit, 0.0, 0.0)
        raise ServiceUnavailable("rate limits unavailable: Redis is unreachable")

    async def _write(self) -> None:
        """The one writer: every check waiting goes out in one EVALSHA."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(base=0.05, cap=2.0)
        while not cancelling():
            if self._down:
                await self._wait_until_up(backoff)
                continue
            if self._busy or not self._queue:
                self._wakeup = loop.create_future()
                await self._wakeup
                self._wakeup = None
                continue
            self._in_flight = batch = self._queue[:_MAX_BATCH]
            del self._queue[:_MAX_BATCH]
            self._busy = True
            try:
                async with asyncio.timeout(self.timeout):
                    replies = await self._evaluate(batch)
            except _UNAVAILABLE as exc:
                self._go_down(exc, batch)
                continue
            except Exception as exc:  # a bug must not leave callers waiting forever
                log.exception("rate limit batch failed")
                for _checks, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self._busy = False
                self._in_flight = []
                self._quiet = len(batch) == 1 and not self._queue
            for j, (_checks, future) in enumerate(batch):
                if not future.done():  # else the caller was cancelled meanwhile
                    future.set_result(_decision(replies, j))

    async def _evaluate(self, batch: Iterable[tuple[Checks, object]]) -> list[int]:
        keys: list[str] = []
        index: dict[str, str] = {}
        argv: list[str] = []
        for checks, _future in batch:
            argv.append(str(len(checks)))
            for key, limit in checks:
                k = index.get(key)
                if k is None:
                    keys.append(KEY_PREFIX + key)
                    k = index[key] = str(len(keys))  # Lua indexes from 1
                argv.append(k)
                argv.append(limit._argv)
        replies: list[int] = await self._script(keys=keys, args=(" ".join(argv),))
        return replies

    def _go_down(self, exc: BaseException, batch: list[_Pending] | None = None) -> None:
        """Enter an outage: answer `batch` and everything queued without Redis."""
        if not self._down:
            self._down = True
            log.warning(
                "rate limiter: Redis unreachable, answering without it",
                extra={"fields": {"mode": self.on_redis_down, "error": repr(exc)}},
            )
        waiting = [*(batch or ()), *self._queue]
        self._queue = []
        for checks, future in waiting:
            if future.done():
                continue
            try:
                future.set_result(self._without_redis(checks))
            except ServiceUnavailable as error:
                future.set_exception(error)
        self._wake()  # the writer probes until Redis answers again

    async def _wait_until_up(self, backoff: Backoff) -> None:
        """Probe Redis (the script with no request) until it answers; then resume."""
        while not cancelling():
            await backoff.wait()
            try:
                async with asyncio.timeout(self.timeout):
                    await self._script(keys=[], args=[])
            except _UNAVAILABLE:
                continue
            backoff.reset()
            self._local.clear()
            self._down = False
            log.info("rate limiter: Redis reachable again")
            return


def _decision(replies: list[int], j: int) -> Decision:
    """The `j`-th request's decision in the script's flat reply."""
    b = 5 * j
    return Decision(
        replies[b] == 1, replies[b + 1], replies[b + 2], replies[b + 3] / 1e6, replies[b + 4] / 1e6
    )


__all__ = ["GCRA_SCRIPT", "KEY_PREFIX", "NO_LIMIT", "Decision", "Limit", "RateLimiter"]
