"""`RpcClient`: call service methods over Redis.

```python
async with RpcClient(redis_url) as rpc:
    channels = await rpc.call("iptv.list_channels", category="news", timeout=2.0)
    await rpc.send("logs.write", record)              # fire-and-forget
```

One client per process is the intended use: it owns one reply inbox (a Redis
list), read by one background task that resolves the waiting futures by call
id, so no key, subscription or connection is created per call. Enqueues go
through one writer task that sends every call issued meanwhile in a single
pipelined round trip of the enqueue script (which also answers "is anyone
alive?" and "is the backlog under its bound?"): at one caller that is one round
trip per call, at many callers far fewer.

Hot path: `invoke`, `_write_enqueues`, `_read_inbox`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from common import codec, constants
from common.aio import Backoff, cancel_and_wait, cancelling
from common.connection import REDIS_DOWN_ERRORS, connect
from common.errors import (
    MethodNotFound,
    Overloaded,
    RpcTimeout,
    ServiceUnavailable,
    error_from_wire,
)
from common.log import get_logger, request_id_var
from common.protocol import (
    DROPPED,
    ENQUEUE_SCRIPT,
    HIGH_WATERMARK,
    LOW_WATERMARK,
    NO_INSTANCE,
    OVER_BACKLOG,
    POLICIES,
    PRIORITIES,
    TASK_SCRIPT,
    Call,
)
from common.settings import Settings, get_settings

log = get_logger("switchboard.client")

_INBOX_BATCH = 256
_ENQUEUE_BATCH = 512
# How long a fire-and-forget message stays worth running if it waits in the queue.
DEFAULT_SEND_TTL = 300.0


def split_target(target: str) -> tuple[str, str]:
    """`"iptv.list_channels"` -> `("iptv", "list_channels")`, or `MethodNotFound`."""
    service, sep, method = target.partition(".")
    if not sep or not service or not method:
        raise MethodNotFound(f"{target!r} is not of the form service.method")
    return service, method


@dataclass(slots=True)
class _Enqueue:
    script: str  # a key of _SCRIPTS
    keys: tuple[str, ...]
    args: tuple[bytes | str | float, ...]
    # For a call: the future of its *reply*, failed here only if the enqueue fails
    # (one future per call). For a task: resolved with the enqueue script's result.
    future: asyncio.Future[Any]
    service: str = ""
    instance: str | None = None
    awaits_reply: bool = False


_SCRIPTS = {"call": ENQUEUE_SCRIPT, "task": TASK_SCRIPT}


class RpcClient:
    """Calls methods of Switchboard services; one per process, shared by all tasks."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        redis: aioredis.Redis | None = None,
        timeout: float | None = None,
        settings: Settings | None = None,
    ) -> None:
        settings = settings or get_settings()
        self._own_redis = redis is None
        self.redis = (
            redis if redis is not None else connect(redis_url or settings.require_redis_url())
        )
        self.default_timeout = timeout or settings.rpc_timeout
        self.client_id = uuid.uuid4().hex
        self.inbox = constants.inbox_key(self.client_id)
        self.settings = settings
        self._shas: dict[str, str] = {}
        self._ids = itertools.count()
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[_Enqueue] = asyncio.Queue()
        self._failures: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RpcClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the enqueue writer and the inbox reader (idempotent)."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_inbox(), name="rpc-inbox")
            self._writer = asyncio.create_task(self._write_enqueues(), name="rpc-enqueue")

    async def close(self) -> None:
        await cancel_and_wait(self._reader)
        await cancel_and_wait(self._writer)
        self._reader = self._writer = None
        while not self._outbox.empty():
            item = self._outbox.get_nowait()
            if not item.future.done():
                item.future.set_exception(ServiceUnavailable("RPC client closed"))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ServiceUnavailable("RPC client closed"))
        self._pending.clear()
        if self._own_redis:
            await self.redis.aclose()

    async def call(
        self,
        target: str,
        /,
        *args: Any,
        timeout: float | None = None,
        request_id: str | None = None,
        instance: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call `service.method` and return its result (see `invoke` for errors)."""
        return await self.invoke(
            target, args, kwargs, timeout=timeout, request_id=request_id, instance=instance
        )

    async def invoke(
        self,
        target: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        instance: str | None = None,
    ) -> Any:
        """Call with explicit args/kwargs (a method may then take a `timeout` argument itself).

        `instance` directs the call to one instance id (it then fails with
        `ServiceUnavailable` if that instance is not live, and is never served by
        another). Raises `ServiceUnavailable` at once when no instance is alive or
        Redis is unreachable, `Overloaded` when the service's backlog is over its
        bound, `MethodNotFound` for an unknown service or method, `InvalidParams`,
        `RemoteError`, and `RpcTimeout` once `timeout` seconds have passed: never later.
        """
        service, method = split_target(target)
        timeout = self.default_timeout if timeout is None else timeout
        if self._reader is None:
            await self.start()
        call_id = f"{self.client_id[:12]}-{next(self._ids)}"
        call = Call(
            call_id=call_id,
            method=method,
            args=list(args),
            kwargs=dict(kwargs or {}),
            deadline=time.time() + timeout,
            reply_to=self.inbox,
            request_id=request_id or request_id_var.get(),
        )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            async with asyncio.timeout(timeout):
                self._enqueue_call(service, call, instance, future)
                return await future
        except TimeoutError:
            raise RpcTimeout(f"{target} did not answer within {timeout:g}s") from None
        finally:
            self._pending.pop(call_id, None)

    async def send(
        self,
        target: str,
        /,
        *args: Any,
        priority: int = 1,
        policy: str = "execute",
        coalesce_key: str | None = None,
        **kwargs: Any,
    ) -> bool:
        """Fire-and-forget task: enqueue and return; no reply comes back. See `submit`."""
        return await self.submit(
            target, args, kwargs, priority=priority, policy=policy, coalesce_key=coalesce_key
        )

    async def submit(
        self,
        target: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        priority: int = 1,
        policy: str = "execute",
        coalesce_key: str | None = None,
        attempts: int | None = None,
        ttl: float = DEFAULT_SEND_TTL,
        request_id: str | None = None,
    ) -> bool:
        """Enqueue a task; True when accepted, False when dropped (policy `drop`).

        - `priority` 1 is served before anything of priority 2; priority 2 is
          admitted only while the backlog is under the high watermark (80% of the
          service's bound), and again once it is under the low one (60%).
        - `policy`: `execute` (every task runs), `last` (pending tasks with the same
          `coalesce_key` collapse to the newest), `drop` (discarded and counted,
          never an error, when the service is saturated or has no live instance:
          for logging and metrics that must never block a caller).
        - A task that raises is retried with exponential backoff up to `attempts`
          runs in all (default `TASK_ATTEMPTS`), then kept in the dead-letter list.
        Raises `ServiceUnavailable` (no live instance) and `Overloaded` (backlog
        full) for policies other than `drop`.
        """
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        if policy == "last" and not coalesce_key:
            raise ValueError("policy 'last' needs a coalesce_key")
        service, method = split_target(target)
        settings = self.settings
        call = Call(
            call_id=f"{self.client_id[:12]}-{next(self._ids)}",
            method=method,
            args=list(args),
            kwargs=dict(kwargs or {}),
            deadline=time.time() + ttl,
            reply_to=None,
            request_id=request_id or request_id_var.get(),
            priority=priority,
            policy=policy,
            key=coalesce_key,
            max_attempts=attempts or settings.task_attempts,
        )
        item = _Enqueue(
            script="task",
            keys=(
                constants.instances_key(service),
                constants.task_stream(service, priority),
                constants.limits_key(service),
                constants.call_stream(service),
                constants.task_stream(service, 1),
                constants.task_stream(service, 2),
                constants.coalesce_key(service),
                constants.task_stats_key(service),
            ),
            args=(
                call.encode(),
                str(priority),
                policy,
                coalesce_key or "",
                HIGH_WATERMARK,
                LOW_WATERMARK,
            ),
            future=asyncio.get_running_loop().create_future(),
        )
        result = await self._submit(item)
        if result == DROPPED:
            return False
        await self._raise_for(result, service, None)
        return True

    async def _submit(self, item: _Enqueue) -> Any:
        if self._writer is None:
            await self.start()
        self._outbox.put_nowait(item)
        return await item.future

    async def _raise_for(self, entry: Any, service: str, instance: str | None) -> None:
        error = await self._error_for(entry, service, instance)
        if error is not None:
            raise error

    async def _error_for(self, entry: Any, service: str, instance: str | None) -> Exception | None:
        """The error an enqueue script's result stands for, or None for an entry id."""
        if entry == NO_INSTANCE:
            if instance:
                return ServiceUnavailable(f"instance {instance!r} of {service!r} is not live")
            try:
                known = await self.redis.hexists(constants.CATALOG, service)
            except REDIS_DOWN_ERRORS as exc:
                return ServiceUnavailable(f"redis unreachable: {exc}")
            if not known:
                return MethodNotFound(f"unknown service {service!r}")
            return ServiceUnavailable(f"no live instance of {service!r}")
        if entry == OVER_BACKLOG:
            return Overloaded(f"{service!r} has more calls queued than its bound")
        return None

    async def _fail_call(self, item: _Enqueue, entry: Any) -> None:
        error = await self._error_for(entry, item.service, item.instance)
        if error is not None and not item.future.done():
            item.future.set_exception(error)

    def _enqueue_call(
        self, service: str, call: Call, instance: str | None, reply: asyncio.Future[Any]
    ) -> None:
        """Queue the call for the writer; a failed enqueue fails `reply` itself."""
        if instance:
            stream = constants.direct_stream(service, instance)
        else:
            stream = constants.call_stream(service)
        self._outbox.put_nowait(
            _Enqueue(
                script="call",
                keys=(constants.instances_key(service), stream, constants.limits_key(service)),
                args=(call.encode(), instance or ""),
                future=reply,
                service=service,
                instance=instance,
                awaits_reply=True,
            )
        )

    async def _write_enqueues(self) -> None:
        """The one writer: every enqueue waiting is sent in one pipelined round trip."""
        while not cancelling():
            batch = [await self._outbox.get()]
            while len(batch) < _ENQUEUE_BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            try:
                results = await self._send_enqueues(batch)
            except REDIS_DOWN_ERRORS as exc:
                error = ServiceUnavailable(f"redis unreachable: {exc}")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue  # the caller timed out meanwhile
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                elif not item.awaits_reply:
                    item.future.set_result(result)
                elif result in (NO_INSTANCE, OVER_BACKLOG):
                    # Rare path (it may need a catalog lookup): off the writer's loop.
                    self._failures.add(asyncio.create_task(self._fail_call(item, result)))
                    self._failures = {t for t in self._failures if not t.done()}

    async def _send_enqueues(self, batch: list[_Enqueue]) -> list[Any]:
        for _attempt in range(2):
            for name in {item.script for item in batch} - self._shas.keys():
                self._shas[name] = await self.redis.script_load(_SCRIPTS[name])
            if len(batch) == 1:
                # One call waiting (always, at one caller): a plain command costs
                # redis-py far less than a pipeline of one.
                item = batch[0]
                sha = self._shas[item.script]
                try:
                    return [await self.redis.evalsha(sha, len(item.keys), *item.keys, *item.args)]
                except NoScriptError:
                    self._shas.clear()
                    continue
                except ResponseError as exc:
                    return [exc]
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in batch:
                    pipe.evalsha(self._shas[item.script], len(item.keys), *item.keys, *item.args)
                results: list[Any] = await pipe.execute(raise_on_error=False)
            if not any(isinstance(r, NoScriptError) for r in results):
                return results
            # Redis restarted (its script cache is empty): load the scripts, send again.
            self._shas.clear()
        return results

    async def _read_inbox(self) -> None:
        backoff = Backoff()
        while not cancelling():
            try:
                item = await self.redis.blpop([self.inbox], timeout=1)
                if item is not None:
                    self._deliver(item[1])
                    # Drain the rest in batches, unless nobody else is waiting (at one
                    # caller that LPOP would be one wasted command per call).
                    while self._pending:
                        more = await self.redis.lpop(self.inbox, _INBOX_BATCH)
                        for raw in more or ():
                            self._deliver(raw)
                        if not more or len(more) < _INBOX_BATCH:
                            break
                backoff.reset()
            except REDIS_DOWN_ERRORS as exc:
                log.warning("reply inbox unreachable", extra={"fields": {"error": str(exc)}})
                await backoff.wait()

    def _deliver(self, raw: Any) -> None:
        try:
            reply = codec.unpackb(raw)
            future = self._pending.pop(reply["id"], None)
        except Exception:
            log.warning("undecodable reply dropped")
            return
        if future is None or future.done():
            return  # the caller already gave up (timeout)
        if reply.get("ok"):
            future.set_result(reply.get("r"))
        else:
            future.set_exception(error_from_wire(reply.get("e") or {}))
