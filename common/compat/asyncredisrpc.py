"""Serve the asyncredisrpc 22.11 wire format from a Switchboard `Service`.

Existing asyncredisrpc clients can call a Switchboard service unchanged while
they are migrated to `RpcClient`:

```python
svc = Service("iptv")
serve_asyncredisrpc(svc)   # clients keep using AsyncClient("iptv", host, port)
svc.run()
```

The wire format, as asyncredisrpc 22.11.1.1 speaks it:

- request: `RPUSH asyncredisrpc:<queue>` of JSON `{"id", "name", "args", "kwargs"}`,
  where `id` is a uuid4 hex string and `name` the bare method name
  (`list_channels`, not `iptv.list_channels`);
- reply: `RPUSH asyncredisrpc:<queue>:<id>` of JSON `{"error": 0 | 1, "result": ...}`.
  The client `BLPOP`s that key *without a timeout* and returns `(error, result)`
  as is, raising nothing. With `error: 1` the result here is a message,
  `"<ErrorType>: <message>"`, for an unknown method, invalid arguments or a
  handler exception (asyncredisrpc's own server only answered unknown methods,
  with `null`, and died on a handler exception).
- Reply keys expire after `REPLY_TTL_SECONDS` (asyncredisrpc sets no expiry), so
  a reply nobody waits for does not stay in Redis.

Delivery in this mode is asyncredisrpc's, not Switchboard's: a request is a
list pop, so one taken by an instance that dies (SIGKILL) is lost, and its
caller, which waits without timeout, hangs. There are no deadlines, no
redelivery, no idempotency and no registry entry for these calls. The adapter
exists for migration only; new callers use `RpcClient`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.aio import cancel_and_wait, cancelling
from common.codec import json_default, not_json_message, not_json_reason
from common.errors import (
    ConfigError,
    InvalidParams,
    InvalidResult,
    MethodNotFound,
    ResultTooLarge,
    ServiceUnavailable,
    SwitchboardError,
    quoted,
)
from common.log import get_logger, request_id_var
from common.outage import Outage
from common.service import Service

log = get_logger("switchboard.compat.asyncredisrpc")

# asyncredisrpc's key prefix (its `REDIS_PREFIX`): a foreign protocol's key
# names, so they live here rather than in `common.constants`.
PREFIX = "asyncredisrpc:"
REPLY_TTL_SECONDS = 60
# BLPOP block time: also how long a stop waits for the consumer to notice it.
_BLOCK_SECONDS = 1.0


def serve_asyncredisrpc(svc: Service, queue: str | None = None, *, concurrency: int = 64) -> None:
    """Also serve `svc`'s methods to asyncredisrpc clients of `queue` (default: the service name).

    The consumer starts with the service (an `on_startup` hook) and stops with
    it (`on_shutdown`): it stops taking requests, lets in-flight ones finish
    within the service's shutdown grace and answers the rest with an error.
    At most `concurrency` requests run at once; the others wait in Redis, where
    another instance may take them.
    """
    if concurrency < 1:
        raise ConfigError(f"asyncredisrpc concurrency must be at least 1, not {concurrency}")
    adapter = _Adapter(svc, queue or svc.name, concurrency)
    svc.on_startup(adapter.start)
    svc.on_shutdown(adapter.stop)


class _Adapter:
    def __init__(self, svc: Service, queue: str, concurrency: int) -> None:
        self.svc = svc
        self.key = PREFIX + queue
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        # One line as Redis goes away or refuses, one as it is back: not one per retry.
        self._pop_outage = Outage(
            log, "asyncredisrpc pop failed, retrying", "asyncredisrpc pop recovered", queue=self.key
        )
        self._reply_outage = Outage(
            log,
            "asyncredisrpc reply failed, retrying",
            "asyncredisrpc replies recovered",
            queue=self.key,
        )
        self._consumer: asyncio.Task[None] | None = None

    async def start(self, svc: Service) -> None:
        self._slots = asyncio.Semaphore(self.concurrency)
        self._inflight = set()
        self._stopping = False
        self._consumer = asyncio.create_task(
            self._consume(svc.redis), name=f"{svc.name}-asyncredisrpc"
        )
        log.info("serving asyncredisrpc", extra={"fields": {"queue": self.key}})

    async def stop(self, svc: Service) -> None:
        self._stopping = True
        if self._consumer is not None:
            # It notices `_stopping` within one BLPOP; cancelling it mid-pop could
            # lose a request already taken from the list, so cancel only if it does not.
            await asyncio.wait([self._consumer], timeout=_BLOCK_SECONDS + 1)
            await cancel_and_wait(self._consumer)
            self._consumer = None
        if not self._inflight:
            return
        _, pending = await asyncio.wait(set(self._inflight), timeout=svc.settings.shutdown_grace)
        if pending:
            log.warning(
                "shutdown grace expired", extra={"fields": {"abandoned_requests": len(pending)}}
            )
            for task in pending:
                task.cancel()  # once: `_handle` then answers with an error
            await asyncio.wait(pending, timeout=5.0)

    async def _consume(self, redis: aioredis.Redis) -> None:
        """Take requests while slots are free and run each in its own task. Hot path."""
        backoff = 0.05
        while not self._stopping and not cancelling():
            await self._slots.acquire()  # a slot for the request BLPOP will bring
            try:
                raws = await self._pop(redis)
                self._pop_outage.recovered()
                backoff = 0.05
            except Exception as exc:  # unreachable, refused, WRONGTYPE...: the loop goes on
                self._slots.release()
                self._pop_outage.failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if not raws:
                self._slots.release()
                continue
            for i, raw in enumerate(raws):
                if i:  # `_pop` took no more than the free slots: this never waits
                    await self._slots.acquire()
                task = asyncio.create_task(self._handle(redis, raw))
                self._inflight.add(task)
                task.add_done_callback(self._task_done)

    async def _pop(self, redis: aioredis.Redis) -> list[bytes]:
        """Wait for one request, then take those already waiting, up to the free slots."""
        popped: Any = await redis.blpop([self.key], timeout=_BLOCK_SECONDS)
        if popped is None:
            return []
        raws: list[bytes] = [popped[1]]
        free = self.concurrency - len(self._inflight) - 1
        if free > 0:
            try:
                more: Any = await redis.lpop(self.key, free)
            except (RedisError, OSError) as exc:
                # Keep the one request already taken; the rest stays queued.
                log.warning("asyncredisrpc batch pop failed", extra={"fields": {"error": str(exc)}})
                more = None
            raws.extend(more or ())
        return raws

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _handle(self, redis: aioredis.Redis, raw: bytes) -> None:
        """Run one request and write its reply. Hot path."""
        parsed = _parse(raw)
        if parsed is None:
            log.warning(
                "malformed asyncredisrpc request dropped",
                extra={
                    "fields": {"queue": self.key, "request": raw[:200].decode(errors="replace")}
                },
            )
            return
        req_id, request = parsed
        token = request_id_var.set(req_id)
        try:
            payload = await self._execute(request)
        except asyncio.CancelledError:
            # Abandoned at shutdown: answer anyway, the caller waits without timeout.
            error = ServiceUnavailable(f"{self.svc.name} shut down before the call finished")
            await self._reply(redis, req_id, _error(error))
            raise
        finally:
            request_id_var.reset(token)
        await self._reply(redis, req_id, payload)

    async def _execute(self, request: dict[str, Any]) -> bytes:
        name = request.get("name")
        args = request.get("args", [])
        kwargs = request.get("kwargs", {})
        if not (isinstance(name, str) and isinstance(args, list) and isinstance(kwargs, dict)):
            return _error(
                InvalidParams("malformed request: needs a string name, list args, object kwargs")
            )
        spec = self.svc.methods.get(name)
        if spec is None:
            return _error(MethodNotFound(f"{self.svc.name} has no method {quoted(name)}"))
        try:
            args, kwargs = spec.bind(args, kwargs)
            if spec.is_async:
                result = await spec.fn(*args, **kwargs)
            else:
                result = await asyncio.to_thread(spec.fn, *args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, SwitchboardError):
                log.exception("handler raised", extra={"fields": {"method": name}})
            return _error(exc)
        return self._answer(name, result)

    def _answer(self, name: str, result: Any) -> bytes:
        """The reply carrying `result`; an `InvalidResult` error reply when JSON cannot
        carry it (bytes that are not UTF-8: `common.codec.json_default`) or it is over
        `RPC_MAX_PAYLOAD_BYTES` (`ResultTooLarge`), logged once: as for `RpcClient`s."""
        try:
            payload = _encode({"error": 0, "result": result})
        except (ValueError, TypeError) as exc:
            reason = not_json_reason(exc)
            log.error("result not encodable", extra={"fields": {"method": name, "error": reason}})
            return _error(InvalidResult(not_json_message(f"the result of {name}", exc)))
        limit = self.svc.settings.rpc_max_payload_bytes
        if len(payload) > limit:
            fields = {"method": name, "bytes": len(payload), "limit": limit}
            log.error("result too large", extra={"fields": fields})
            return _error(ResultTooLarge.over(name, len(payload), limit))
        return payload

    async def _reply(self, redis: aioredis.Redis, req_id: str, payload: bytes) -> None:
        key = f"{self.key}:{req_id}"
        loop = asyncio.get_running_loop()
        give_up = loop.time() + REPLY_TTL_SECONDS
        backoff = 0.05
        while True:
            try:
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.rpush(key, payload)
                    pipe.expire(key, REPLY_TTL_SECONDS)
                    await pipe.execute()
                self._reply_outage.recovered()
                return
            except (RedisError, OSError) as exc:  # unreachable, or refusing (out of memory...)
                if loop.time() > give_up:
                    log.error("asyncredisrpc reply lost", extra={"fields": {"key": key}})
                    return
                self._reply_outage.failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)


def _parse(raw: bytes) -> tuple[str, dict[str, Any]] | None:
    """`(id, request)`, or None when there is no id, hence no reply key to answer to."""
    try:
        request = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8
        return None
    if not isinstance(request, dict):
        return None
    req_id = request.get("id")
    if not isinstance(req_id, str) or not req_id:
        return None
    return req_id, request


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, default=json_default).encode()


def _error(exc: Exception) -> bytes:
    message = exc.message if isinstance(exc, SwitchboardError) else str(exc)
    kind = type(exc).__name__
    return _encode({"error": 1, "result": f"{kind}: {message}" if message else kind})
