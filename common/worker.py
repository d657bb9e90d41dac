"""The consuming half of RPC: read calls in batches, run handlers, reply in pipelines.

A `Worker` reads up to as many calls as it has free slots (its concurrency
limit) in one `XREADGROUP`, runs each in its own task (sync handlers in a thread
pool, so a slow CPU-bound handler never blocks the loop), and hands the
encoded replies to one flusher task. The flusher writes every reply waiting at
that moment, plus the `XACK`/`XDEL` of their entries, in a single pipelined
round trip, and keeps them (retrying) while Redis is unreachable, so a finished
call's reply is never dropped.

Hot path: `_consume`, `_run`, `_flush` (covered by `make bench-rpc`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import constants
from common.aio import cancel_and_wait, cancelling
from common.connection import REDIS_DOWN_ERRORS
from common.errors import MethodNotFound, RemoteError, RpcError, SwitchboardError
from common.log import get_logger, request_id_var
from common.params import MethodSpec
from common.protocol import Call, error_reply, ok_reply

log = get_logger("switchboard.worker")

# An inbox whose client went away disappears after this long.
INBOX_TTL_SECONDS = 60
_MAX_FLUSH_BATCH = 512


@dataclass(slots=True)
class MethodStats:
    """Per-method counters, readable from the process (`Worker.stats`)."""

    calls: int = 0
    errors: int = 0
    total_seconds: float = 0.0


@dataclass(slots=True)
class WorkerStats:
    methods: dict[str, MethodStats] = field(default_factory=dict)
    expired: int = 0  # calls skipped because their deadline passed while queued
    malformed: int = 0  # entries that could not be decoded (acked and dropped)


class Worker:
    """Consumes one service's call stream as one consumer of the shared group."""

    def __init__(
        self,
        redis: aioredis.Redis,
        service: str,
        consumer: str,
        methods: Mapping[str, MethodSpec],
        *,
        concurrency: int,
        thread_pool: int,
        block_ms: int = 1000,
    ) -> None:
        self.redis = redis
        self.service = service
        self.consumer = consumer
        self.methods = methods
        self.concurrency = concurrency
        self.block_ms = block_ms
        self.stream = constants.call_stream(service)
        self.stats = WorkerStats()
        self._executor = ThreadPoolExecutor(thread_pool, thread_name_prefix=f"{service}-handler")
        self._inflight: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._replies: asyncio.Queue[tuple[bytes, str | None, bytes | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._ensure_group()
        self._tasks = [
            asyncio.create_task(self._consume(), name=f"{self.service}-consume"),
            asyncio.create_task(self._flush(), name=f"{self.service}-flush"),
        ]

    async def stop(self, grace: float) -> None:
        """Stop taking calls, let in-flight ones finish within `grace`, flush their replies."""
        self._stopping.set()
        self._slot_free.set()
        consume = self._tasks[0] if self._tasks else None
        if consume is not None:
            # It notices `_stopping` within one blocking read; cancel only if it does not.
            await asyncio.wait([consume], timeout=self.block_ms / 1000 + 1)
            await cancel_and_wait(consume)
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "shutdown grace expired",
                    extra={"fields": {"abandoned_calls": len(pending)}},
                )
        try:
            await asyncio.wait_for(self._replies.join(), timeout=max(grace, 1.0))
        except TimeoutError:
            log.warning("replies not flushed before shutdown")
        for task in self._tasks:
            await cancel_and_wait(task)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(
                self.stream, constants.WORKER_GROUP, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _consume(self) -> None:
        backoff = 0.05
        while not self._stopping.is_set():
            free = self.concurrency - len(self._inflight)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                response: Any = await self.redis.xreadgroup(
                    constants.WORKER_GROUP,
                    self.consumer,
                    {self.stream: ">"},
                    count=free,
                    block=self.block_ms,
                )
                backoff = 0.05
            except REDIS_DOWN_ERRORS as exc:
                log.warning("redis unreachable, retrying", extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream was deleted (e.g. FLUSHALL)
                    await self._ensure_group()
                    continue
                raise
            for _stream, entries in response or ():
                for entry_id, fields in entries:
                    task = asyncio.create_task(self._run(entry_id, fields))
                    self._inflight.add(task)
                    task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slot_free.set()

    async def _run(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            call = Call.decode(fields[b"c"])
        except Exception:
            self.stats.malformed += 1
            log.warning("malformed call entry dropped", extra={"fields": {"entry": str(entry_id)}})
            self._replies.put_nowait((entry_id, None, None))
            return
        if time.time() > call.deadline:
            self.stats.expired += 1
            self._replies.put_nowait((entry_id, None, None))
            return
        token = request_id_var.set(call.request_id)
        try:
            reply = await self._execute(call)
        finally:
            request_id_var.reset(token)
        self._replies.put_nowait((entry_id, call.reply_to, reply))

    async def _execute(self, call: Call) -> bytes:
        spec = self.methods.get(call.method)
        if spec is None:
            error = MethodNotFound(f"{self.service} has no method {call.method!r}")
            return error_reply(call.call_id, error)
        stats = self.stats.methods.setdefault(call.method, MethodStats())
        stats.calls += 1
        started = time.perf_counter()
        try:
            args, kwargs = spec.bind(call.args, call.kwargs)
            if spec.is_async:
                result = await spec.fn(*args, **kwargs)
            else:
                ctx = contextvars.copy_context()
                fn = functools.partial(ctx.run, spec.fn, *args, **kwargs)
                result = await asyncio.get_running_loop().run_in_executor(self._executor, fn)
            return ok_reply(call.call_id, result)
        except Exception as exc:
            stats.errors += 1
            return error_reply(call.call_id, self._as_error(call, exc))
        finally:
            stats.total_seconds += time.perf_counter() - started

    def _as_error(self, call: Call, exc: Exception) -> SwitchboardError:
        if isinstance(exc, RpcError) and not isinstance(exc, RemoteError):
            return exc  # InvalidParams etc. travel as themselves
        if isinstance(exc, SwitchboardError):
            return RemoteError(exc.message, remote_type=type(exc).__name__, code=exc.code)
        if isinstance(exc, TypeError) and "encode" in str(exc):
            log.error("result not encodable", extra={"fields": {"method": call.method}})
        else:
            log.exception("handler raised", extra={"fields": {"method": call.method}})
        return RemoteError(str(exc) or type(exc).__name__, remote_type=type(exc).__name__)

    async def _flush(self) -> None:
        while not cancelling():
            batch = [await self._replies.get()]
            while len(batch) < _MAX_FLUSH_BATCH and not self._replies.empty():
                batch.append(self._replies.get_nowait())
            await self._write_batch(batch)
            for _ in batch:
                self._replies.task_done()

    async def _write_batch(self, batch: list[tuple[bytes, str | None, bytes | None]]) -> None:
        backoff = 0.05
        while not cancelling():
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    inboxes: set[str] = set()
                    for _entry_id, inbox, reply in batch:
                        if inbox and reply is not None:
                            pipe.rpush(inbox, reply)
                            inboxes.add(inbox)
                    for inbox in inboxes:
                        pipe.expire(inbox, INBOX_TTL_SECONDS)
                    ids = [entry_id for entry_id, _, _ in batch]
                    pipe.xack(self.stream, constants.WORKER_GROUP, *ids)
                    pipe.xdel(self.stream, *ids)
                    await pipe.execute()
                return
            except REDIS_DOWN_ERRORS as exc:
                # Keep the replies: they are delivered once Redis is back.
                log.warning("reply flush failed, retrying", extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def snapshot(self) -> dict[str, Any]:
        """Counters as plain data (for logs, health and tests)."""
        return {
            "inflight": len(self._inflight),
            "expired": self.stats.expired,
            "malformed": self.stats.malformed,
            "methods": {
                name: {"calls": s.calls, "errors": s.errors, "total_seconds": s.total_seconds}
                for name, s in self.stats.methods.items()
            },
        }
