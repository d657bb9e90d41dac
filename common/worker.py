"""The consuming half of RPC: read calls in batches, run handlers, reply in pipelines.

A `Worker` reads up to as many calls as it has free slots (its concurrency
limit) in one `XREADGROUP` over the service's shared stream and its own direct
stream, runs each in its own task (sync handlers in a thread pool, so a
CPU-bound handler never blocks the loop), and hands the results to one flusher
task. The flusher writes everything finished at that moment in one pipelined
round trip, in an order that makes a crash at any point safe:

1. the replies into the deduplication window (`done` hash of the current bucket),
2. the replies onto each caller's inbox (one RPUSH per inbox),
3. `XACK` + `XDEL` of the entries.

Redelivery (`common.redelivery`): every `reap_interval` a worker runs the
reclaim script, which moves the pending calls of every consumer without a live lease (a SIGKILLed or
partitioned instance) to itself. A reclaimed call whose id is in the
deduplication window already completed: its stored reply is sent again and it
does not run twice. Calls of a consumer whose lease merely lapsed while it was
still running may run twice: delivery is at-least-once, as documented.

Hot path: `_consume`, `_run`, `_flush` (covered by `make bench-rpc`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import constants, deadletters
from common.aio import Backoff, cancel_and_wait, cancelling
from common.connection import REDIS_DOWN_ERRORS
from common.errors import (
    InvalidParams,
    MethodNotFound,
    RemoteError,
    RpcError,
    SwitchboardError,
)
from common.log import get_logger, request_id_var
from common.metrics import MethodStats
from common.params import MethodSpec
from common.protocol import Call, error_reply, ok_reply
from common.redelivery import Redelivery

log = get_logger("switchboard.worker")

# An inbox whose client went away disappears after this long.
INBOX_TTL_SECONDS = 60
_MAX_FLUSH_BATCH = 512

_MAX_RETRY_DELAY = 60.0


@dataclass(slots=True)
class WorkerStats:
    methods: dict[str, MethodStats] = field(default_factory=dict)
    expired: int = 0  # calls skipped because their deadline passed while queued
    malformed: int = 0  # entries that could not be decoded (acked and dropped)
    redelivered: int = 0  # calls reclaimed from dead instances
    deduplicated: int = 0  # reclaimed calls answered from the stored reply, not re-run
    retried: int = 0  # failed tasks scheduled for another attempt
    dead_lettered: int = 0  # tasks that failed every attempt


@dataclass(slots=True)
class _Finished:
    """A processed entry waiting for the flusher."""

    stream: str
    entry_id: bytes
    call_id: str | None = None
    inbox: str | None = None
    reply: bytes | None = None
    remember: bool = True  # store the reply in the deduplication window
    retry: tuple[bytes, float] | None = None  # (retry zset member, due epoch ms)
    dead: bytes | None = None  # dead-letter record


class Worker:
    """Consumes one service's call streams as one consumer of the shared group."""

    def __init__(
        self,
        redis: aioredis.Redis,
        service: str,
        consumer: str,
        methods: Mapping[str, MethodSpec],
        *,
        concurrency: int,
        thread_pool: int,
        dedup_window: float = 30.0,
        reap_interval: float = 1.0,
        block_ms: int = 1000,
        retry_delay: float = 1.0,
        dead_letter_cap: int = 10_000,
    ) -> None:
        self.redis = redis
        self.service = service
        self.consumer = consumer
        self.methods = methods
        self.concurrency = concurrency
        self.block_ms = block_ms
        self.reap_interval = reap_interval
        self.stream = constants.call_stream(service)
        self.direct = constants.direct_stream(service, consumer)
        self.tasks = (constants.task_stream(service, 1), constants.task_stream(service, 2))
        self.retry_delay = retry_delay
        self.dead_letter_cap = dead_letter_cap
        self.stats = WorkerStats()
        self._bucket_seconds = max(dedup_window / 2, 1.0)
        self._executor = ThreadPoolExecutor(thread_pool, thread_name_prefix=f"{service}-handler")
        self.redelivery = Redelivery(redis, service, consumer, self._bucket_seconds)
        self._inflight: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._finished: asyncio.Queue[_Finished] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._expiry_set: dict[str, float] = {}

    async def start(self) -> None:
        """Create the consumer groups (both streams) and start consuming."""
        await self._ensure_groups()
        self._tasks = [
            asyncio.create_task(self._consume(), name=f"{self.service}-consume"),
            asyncio.create_task(self._reap(), name=f"{self.service}-reap"),
            asyncio.create_task(self._flush(), name=f"{self.service}-flush"),
        ]

    async def stop(self, grace: float) -> None:
        """Stop taking calls, let in-flight ones finish within `grace`, flush their replies.

        Calls still running after `grace` are cancelled and left pending: once this
        instance's lease is gone, another instance reclaims them (handed back).
        """
        self._stopping.set()
        self._slot_free.set()
        consume, reap = [*self._tasks, None, None][:2]
        if consume is not None:
            # It notices `_stopping` within one blocking read; cancel only if it does not.
            await asyncio.wait([consume], timeout=self.block_ms / 1000 + 1)
            await cancel_and_wait(consume)
        await cancel_and_wait(reap)
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=grace)
            for task in pending:
                await cancel_and_wait(task)
            if pending:
                log.warning(
                    "shutdown grace expired: calls handed back",
                    extra={"fields": {"handed_back": len(pending)}},
                )
        try:
            await asyncio.wait_for(self._finished.join(), timeout=max(grace, 1.0))
        except TimeoutError:
            log.warning("replies not flushed before shutdown")
        for task in self._tasks:
            await cancel_and_wait(task)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _ensure_groups(self) -> None:
        for stream in (self.stream, self.direct, *self.tasks):
            try:
                await self.redis.xgroup_create(
                    stream, constants.WORKER_GROUP, id="0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _free_slots(self) -> int:
        return self.concurrency - len(self._inflight)

    async def _consume(self) -> None:
        """Priority order: calls, direct calls and priority-1 tasks before priority 2.

        While there is a backlog (the last read came back full), a non-blocking
        read of the first group takes every free slot it can; only when it finds
        nothing does a blocking read include the priority-2 stream (it returns at
        once if anything is waiting there). That blocking read takes at most
        `free // 4` entries per stream so it cannot overshoot the limit. When the
        last read was partial (no backlog) the probe is skipped: at one caller it
        would cost a round trip per call.
        """
        backoff = Backoff()
        probe_first = True
        first = {self.stream: ">", self.direct: ">", self.tasks[0]: ">"}
        everything = {**first, self.tasks[1]: ">"}
        while not self._stopping.is_set() and not cancelling():
            free = self._free_slots()
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                response: Any = None
                if probe_first:
                    response = await self.redis.xreadgroup(
                        constants.WORKER_GROUP,
                        self.consumer,
                        first,  # type: ignore[arg-type]
                        count=free,
                    )
                if response:
                    probe_first = True
                else:
                    per_stream = max(1, free // 4)
                    response = await self.redis.xreadgroup(
                        constants.WORKER_GROUP,
                        self.consumer,
                        everything,  # type: ignore[arg-type]
                        count=per_stream,
                        block=self.block_ms,
                    )
                    probe_first = any(len(e) >= per_stream for _, e in response or ())
                backoff.reset()
            except REDIS_DOWN_ERRORS as exc:
                log.warning("redis unreachable, retrying", extra={"fields": {"error": str(exc)}})
                await backoff.wait()
                continue
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # a stream was deleted (expiry, FLUSHALL)
                    await self._ensure_groups()
                    continue
                raise
            for stream, entries in response or ():
                name = stream.decode() if isinstance(stream, bytes) else stream
                for entry_id, fields in entries:
                    self._dispatch(name, entry_id, fields, redelivered=False)

    async def _reap(self) -> None:
        """Every `reap_interval`: put due task retries back, reclaim dead instances' calls."""
        while not self._stopping.is_set() and not cancelling():
            await asyncio.sleep(self.reap_interval)
            try:
                await self.redelivery.move_due_retries()
                free = self._free_slots()
                if free <= 0:
                    continue
                claimed = await self.redelivery.reclaim(free)
            except REDIS_DOWN_ERRORS:
                continue  # the consume loop reports the outage
            if claimed:
                self.stats.redelivered += len(claimed)
                log.info("reclaimed calls of dead instances", extra={"fields": {"n": len(claimed)}})
            for stream, entry_id, fields in claimed:
                self._dispatch(stream, entry_id, fields, redelivered=True)

    def _dispatch(
        self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], *, redelivered: bool
    ) -> None:
        task = asyncio.create_task(self._run(stream, entry_id, fields, redelivered))
        self._inflight.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slot_free.set()

    async def _run(
        self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], redelivered: bool
    ) -> None:
        try:
            call = Call.decode(fields[b"c"])
        except Exception:
            self.stats.malformed += 1
            log.warning("malformed call entry dropped", extra={"fields": {"entry": str(entry_id)}})
            self._finished.put_nowait(_Finished(stream, entry_id))
            return
        if redelivered:
            stored = await self.redelivery.stored_reply(call.call_id)
            if stored is not None:
                self.stats.deduplicated += 1
                done = _Finished(stream, entry_id, call.call_id, call.reply_to, stored, False)
                self._finished.put_nowait(done)
                return
        if time.time() > call.deadline:
            self.stats.expired += 1
            self._finished.put_nowait(_Finished(stream, entry_id))
            return
        token = request_id_var.set(call.request_id)
        try:
            reply, error = await self._execute(call)
        finally:
            request_id_var.reset(token)
        done = _Finished(stream, entry_id, call.call_id, call.reply_to, reply)
        if error is not None and call.is_task:
            self._after_task_failure(call, error, done)
        self._finished.put_nowait(done)

    def _after_task_failure(self, call: Call, error: SwitchboardError, done: _Finished) -> None:
        """Schedule another attempt with backoff, or keep it as a dead letter."""
        permanent = isinstance(error, (MethodNotFound, InvalidParams))
        if not permanent and call.attempt < call.max_attempts:
            delay = min(self.retry_delay * 2 ** (call.attempt - 1), _MAX_RETRY_DELAY)
            call.attempt += 1
            member = str(call.priority).encode() + call.encode()
            done.retry = (member, (time.time() + delay) * 1000)
            done.remember = False  # the retry must run, not find this failure stored
            self.stats.retried += 1
        else:
            done.dead = deadletters.encode(call, error.to_dict())
            self.stats.dead_lettered += 1
            log.warning(
                "task dead-lettered",
                extra={"fields": {"method": call.method, "attempts": call.attempt}},
            )

    async def _execute(self, call: Call) -> tuple[bytes, SwitchboardError | None]:
        """The encoded reply, and the error when the call failed."""
        spec = self.methods.get(call.method)
        if spec is None:
            error: SwitchboardError = MethodNotFound(
                f"{self.service} has no method {call.method!r}"
            )
            return error_reply(call.call_id, error), error
        stats = self.stats.methods.get(call.method)
        if stats is None:
            stats = self.stats.methods[call.method] = MethodStats()
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
            return ok_reply(call.call_id, result), None
        except Exception as exc:
            stats.errors += 1
            error = self._as_error(call, exc)
            return error_reply(call.call_id, error), error
        finally:
            stats.latency.observe(time.perf_counter() - started)

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
            batch = [await self._finished.get()]
            while len(batch) < _MAX_FLUSH_BATCH and not self._finished.empty():
                batch.append(self._finished.get_nowait())
            await self._write_batch(batch)
            for _ in batch:
                self._finished.task_done()

    async def _write_batch(self, batch: list[_Finished]) -> None:
        """One round trip for the whole batch; retried (never dropped) while Redis is down."""
        remembered = {d.call_id: d.reply for d in batch if d.remember and d.call_id and d.reply}
        by_inbox: dict[str, list[bytes]] = defaultdict(list)
        by_stream: dict[str, list[bytes]] = defaultdict(list)
        for done in batch:
            if done.inbox and done.reply is not None:
                by_inbox[done.inbox].append(done.reply)
            by_stream[done.stream].append(done.entry_id)
        backoff = Backoff()
        while not cancelling():
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    if remembered:
                        key = constants.done_key(
                            self.service, int(time.time() // self._bucket_seconds)
                        )
                        pipe.hset(key, mapping=remembered)  # type: ignore[arg-type]
                        if self._expire_due(key):
                            pipe.pexpire(key, int(self._bucket_seconds * 3000))
                    retries = {d.retry[0]: d.retry[1] for d in batch if d.retry}
                    if retries:
                        pipe.zadd(constants.retry_key(self.service), retries)
                    dead = [d.dead for d in batch if d.dead]
                    if dead:
                        key = constants.dead_letter_key(self.service)
                        pipe.lpush(key, *dead)
                        pipe.ltrim(key, 0, self.dead_letter_cap - 1)
                    for inbox, replies in by_inbox.items():
                        pipe.rpush(inbox, *replies)
                        if self._expire_due(inbox):
                            pipe.expire(inbox, INBOX_TTL_SECONDS)
                    for stream, ids in by_stream.items():
                        pipe.xack(stream, constants.WORKER_GROUP, *ids)
                        pipe.xdel(stream, *ids)
                    await pipe.execute()
                return
            except REDIS_DOWN_ERRORS as exc:
                # Keep the replies: they are delivered once Redis is back.
                log.warning("reply flush failed, retrying", extra={"fields": {"error": str(exc)}})
                await backoff.wait()

    def _expire_due(self, key: str) -> bool:
        """Whether to (re)set `key`'s expiry in this batch: at most once a second per key.

        The expiries only clean up after departed clients and old buckets, so once
        a second is plenty, and it saves a command per batch on the hot path.
        """
        now = time.monotonic()
        if now - self._expiry_set.get(key, -1.0) < 1.0:
            return False
        if len(self._expiry_set) > 10_000:
            self._expiry_set.clear()
        self._expiry_set[key] = now
        return True

    def snapshot(self) -> dict[str, Any]:
        """Counters and per-method latency histograms as plain data."""
        return {
            "inflight": len(self._inflight),
            "expired": self.stats.expired,
            "malformed": self.stats.malformed,
            "redelivered": self.stats.redelivered,
            "deduplicated": self.stats.deduplicated,
            "retried": self.stats.retried,
            "dead_lettered": self.stats.dead_lettered,
            "methods": {name: s.snapshot() for name, s in self.stats.methods.items()},
        }
