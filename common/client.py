"""`RpcClient`: call service methods over Redis.

```python
async with RpcClient(redis_url) as rpc:
    channels = await rpc.call("iptv.list_channels", category="news", timeout=2.0)
    await rpc.send("logs.write", record)              # fire-and-forget
```

One client per process is the intended use: it owns one reply inbox (a Redis
list) and two connections, so no key, subscription or connection is created per
call. How calls go out and replies come back is `common.client_io`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis

from common import constants
from common.aio import Backoff, SingleFlight, cancel_and_wait
from common.caller import Caller
from common.client_io import ClientIO, Enqueue
from common.connection import RawConnection, connect_configured, pack_commands
from common.errors import (
    MethodNotFound,
    RpcError,
    RpcTimeout,
    ServiceUnavailable,
    quoted,
)
from common.log import request_id_var
from common.lost_touch import LostTouch
from common.protocol import (
    DEFAULT_SEND_TTL,
    DROPPED,
    HIGH_WATERMARK,
    LOW_WATERMARK,
    MAX_TASK_ATTEMPTS,
    POLICIES,
    PRIORITIES,
    Call,
)
from common.registry import Registry
from common.rejoin import Rejoin
from common.settings import Settings, get_settings


def split_target(target: str) -> tuple[str, str]:
    """`"iptv.list_channels"` -> `("iptv", "list_channels")`, or `MethodNotFound`."""
    service, sep, method = target.partition(".")
    if not sep or not service or not method:
        raise MethodNotFound(f"{quoted(target)} is not of the form service.method")
    return service, method


def _check_seconds(name: str, value: float) -> None:
    """`ValueError` unless `value` is a number of seconds above 0 (`math.inf`: no bound).
    A deadline of NaN never expires, and nothing could be compared with it; one of 0 or
    less has passed before the call is sent, which would read as a timeout ("did not
    answer within -1s") for what is the caller's mistake."""
    if not value > 0:  # NaN too: every comparison with it is false
        raise ValueError(f"{name} must be a number of seconds above 0, not {value!r}")


class RpcClient(ClientIO):
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
        self.redis = redis if redis is not None else connect_configured(settings, redis_url)
        self.default_timeout = settings.rpc_timeout if timeout is None else timeout
        _check_seconds("timeout", self.default_timeout)
        # Calls whose arguments encode to more are refused here, before anything is sent.
        self.max_payload = settings.rpc_max_payload_bytes
        self.client_id = uuid.uuid4().hex
        self.inbox = constants.inbox_key(self.client_id)
        self.settings = settings
        self._enqueuer = RawConnection(self.redis)
        self._receiver = RawConnection(self.redis)
        self._ids = itertools.count()
        self._id_prefix = f"{self.client_id[:12]}-"  # a call's id: this, then a count
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[Enqueue] = asyncio.Queue()
        self._settling: dict[asyncio.Task[None], Enqueue] = {}
        self._reached: set[str] = set()
        # The reader parks when no reply is awaited; `invoke` may then use its
        # connection (`_direct` is the enqueue it wrote there) and wakes it.
        self._reader_parked = False
        self._reader_wake = asyncio.Event()
        self._direct: Enqueue | None = None
        self._blpop = pack_commands([("BLPOP", self.inbox, 1)])
        self._writes = 0
        self._stalled_at = -1
        self._inbox_backoff = Backoff()
        conns = (self._enqueuer, self._receiver)
        self._touch = LostTouch(self.redis, conns, grace=settings.heartbeat_ttl)
        self._catalog_lookups: SingleFlight[bool] = SingleFlight()
        registry = Registry(self.redis)
        self._rejoin = Rejoin(
            holding=self._touch.within_grace,
            live_ids=registry.live_ids,
            retry=self._outbox.put_nowait,
            give_up=self._give_up,
        )

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

    @property
    def parked_total(self) -> int:
        """How many calls (and tasks) told "no live instance" the rejoin grace has held
        since this client was made (`common.rejoin`): for tests and monitoring."""
        return self._rejoin.parked_total

    async def start(self) -> None:
        """Start the enqueue writer and the inbox reader (idempotent)."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_inbox(), name="rpc-inbox")
            self._writer = asyncio.create_task(self._write_enqueues(), name="rpc-enqueue")

    async def close(self) -> None:
        """Stop the writer and the reader, and everything that would settle a call later
        (a parked call's probe, a lookup, a restart check): every call and task still
        waiting fails with `ServiceUnavailable("RPC client closed")`, and no task of the
        client's outlives this."""
        await cancel_and_wait(self._reader)
        await cancel_and_wait(self._writer)
        self._reader = self._writer = None
        stranded = self._rejoin.close()  # and it parks nothing from now on
        while self._settling:  # (one that ends meanwhile may start another)
            settling, self._settling = self._settling, {}
            for task in settling:
                task.cancel()
            for task, item in settling.items():
                await cancel_and_wait(task)
                stranded.append(item)
        await self._touch.close()
        await self._catalog_lookups.close()
        for item in stranded:
            self._outbox.put_nowait(item)  # failed below with what is still queued
        while not self._outbox.empty():
            item = self._outbox.get_nowait()
            if not item.future.done():
                item.future.set_exception(ServiceUnavailable("RPC client closed"))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ServiceUnavailable("RPC client closed"))
        self._pending.clear()
        await self._enqueuer.aclose()
        await self._receiver.aclose()
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
        caller: Caller | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call `service.method` and return its result (see `invoke` for errors)."""
        return await self.invoke(
            target,
            args,
            kwargs,
            timeout=timeout,
            request_id=request_id,
            instance=instance,
            caller=caller,
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
        caller: Caller | None = None,
    ) -> Any:
        """Call with explicit args/kwargs (a method may then take a `timeout` argument itself).

        `instance` directs the call to one instance id (it then fails with
        `ServiceUnavailable` if that instance is not live, and is never served by
        another). Raises `ServiceUnavailable` at once when no instance is alive or
        Redis is unreachable (just after this client lost touch with Redis, "no live
        instance" waits up to `HEARTBEAT_TTL` for a worker to renew its lease first:
        `common.rejoin`), `Overloaded` when the service's backlog is over its
        bound, `MethodNotFound` for an unknown service or method, `InvalidParams`,
        `RemoteError`, `PayloadTooLarge` when the arguments encode to more than
        `RPC_MAX_PAYLOAD_BYTES` (nothing is sent), `InvalidResult` (`ResultTooLarge`)
        when the handler's result cannot be sent back, and `RpcTimeout` once `timeout`
        seconds have passed: never later. `timeout=math.inf` waits without a bound; a
        timeout of NaN, 0 or less is a `ValueError`.

        `caller` is the authenticated user the call is made for, which the handler's
        `Caller` parameter gets (`common.caller`): the gateway and the WebSocket
        service pass their credential's. Without it the call is made for no one (a
        service calling another), and a handler requiring a caller refuses it.
        """
        service, method = split_target(target)
        timeout = self.default_timeout if timeout is None else timeout
        _check_seconds("timeout", timeout)
        if self._reader is None:
            await self.start()
        call = self._call(
            method, args, kwargs, timeout, reply_to=self.inbox, request_id=request_id, caller=caller
        )
        call_id = call.call_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            async with asyncio.timeout(timeout):
                await self._enqueue_call(service, call, instance, future)
                return await future
        except TimeoutError:
            error = RpcTimeout(f"{target} did not answer within {timeout:g}s")
            error.service = service
            raise error from None
        except RpcError as exc:  # the call's own error: which service it is about
            exc.service = service
            raise
        finally:
            self._pending.pop(call_id, None)

    def _call(
        self,
        method: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        seconds: float,
        *,
        reply_to: str | None,
        request_id: str | None,
        caller: Caller | None,
    ) -> Call:
        """A call of `method` (a task if `reply_to` is None) due in `seconds`, with a new
        id of this client's, in the request `request_id` (else the current one), made
        for `caller`."""
        return Call(
            call_id=f"{self._id_prefix}{next(self._ids)}",
            method=method,
            args=list(args),
            kwargs=dict(kwargs or {}),
            deadline=time.time() + seconds,
            reply_to=reply_to,
            request_id=request_id or request_id_var.get(),
            who=None if caller is None else caller.to_wire(),
        )

    async def send(
        self,
        target: str,
        /,
        *args: Any,
        priority: int = 1,
        policy: str = "execute",
        coalesce_key: str | None = None,
        caller: Caller | None = None,
        **kwargs: Any,
    ) -> bool:
        """Fire-and-forget task: enqueue and return; no reply comes back. See `submit`."""
        return await self.submit(
            target,
            args,
            kwargs,
            priority=priority,
            policy=policy,
            coalesce_key=coalesce_key,
            caller=caller,
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
        caller: Caller | None = None,
    ) -> bool:
        """Enqueue a task; True when accepted, False when dropped (policy `drop`).

        - `priority` 1 is served before anything of priority 2; priority 2 is
          admitted only while the backlog is under the high watermark (80% of the
          service's bound), and again once it is under the low one (60%).
        - `policy`: `execute` (every task runs), `last` (pending tasks with the same
          `coalesce_key` collapse to the newest), `drop` (discarded and counted,
          never an error, when the service is saturated or has no live instance:
          for logging and metrics that must never block a caller). A `drop` task
          is also False, at once, when Redis is unreachable, and after at most
          `DROP_WAIT_SECONDS` (0.25 s) when Redis does not answer: then it may
          still run if it had been written already.
        - A task that raises is retried with exponential backoff up to `attempts`
          runs in all (1 to 100; default `TASK_ATTEMPTS`), then kept in the dead-letter
          list.
        - `caller`: the user the task is run for, as for `invoke` (the handler's
          `Caller` parameter; a handler requiring one refuses a task without it).
        Raises `ServiceUnavailable` (no live instance, after `common.rejoin`'s grace
        if this client just lost touch with Redis) and `Overloaded` (backlog
        full) for policies other than `drop`.
        """
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        if policy == "last" and not coalesce_key:
            raise ValueError("policy 'last' needs a coalesce_key")
        if attempts is not None and not 1 <= attempts <= MAX_TASK_ATTEMPTS:
            # A worker would cut it to the bound without a word (`Call.decode`).
            raise ValueError(f"attempts must be from 1 to {MAX_TASK_ATTEMPTS}")
        _check_seconds("ttl", ttl)
        service, method = split_target(target)
        call = self._call(
            method, args, kwargs, ttl, reply_to=None, request_id=request_id, caller=caller
        )
        call.priority, call.policy, call.key = priority, policy, coalesce_key
        call.max_attempts = attempts or self.settings.task_attempts
        item = Enqueue(
            script="task",
            args=(
                8,
                constants.instances_key(service),
                constants.task_stream(service, priority),
                constants.limits_key(service),
                constants.call_stream(service),
                constants.task_stream(service, 1),
                constants.task_stream(service, 2),
                constants.coalesce_key(service),
                constants.task_stats_key(service),
                self._encoded(call, service),
                str(priority),
                policy,
                coalesce_key or "",
                HIGH_WATERMARK,
                LOW_WATERMARK,
            ),
            future=asyncio.get_running_loop().create_future(),
            service=service,
        )
        if policy == "drop":
            result = await self._submit_drop(item)
        else:
            result = await self._submit(item)
        if result == DROPPED:
            return False
        await self._raise_for(result, service, None)
        return True
