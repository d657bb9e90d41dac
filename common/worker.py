"""The consuming half of RPC: read calls in batches, run handlers, reply in pipelines.

A `Worker` reads up to as many calls as it has free slots (its concurrency
limit) in one `XREADGROUP` over the service's shared stream and its own direct
stream, on a connection of its own (`RawConnection`), and runs each call in
its own task (sync handlers in a thread pool, so a CPU-bound handler never
blocks the loop), except calls to an `async def` that cannot suspend (no
`await` in it, see `common.params.never_suspends`), which run to their end in
the read loop; running a call is `common.calls.CallRunner`'s part.
The read loop lets the calls it just started run up to their first suspension
before it reads again, and everything finished by then goes out in the same
write as that next `XREADGROUP`: a fast handler's reply costs no write of its
own, and under load a batch costs one round trip. What finishes while the loop
is blocked in a read is written by the flusher task on a second connection.
Either way a batch is written in an order that makes a crash at any point safe
(`common.replies`): replies stored for deduplication, then pushed to the callers'
inboxes, then the entries acked and deleted. What finished and is not written yet is
the `common.outbox.Outbox`'s, which holds what Redis does not take for now (down, or
refusing writes: out of memory, a read-only replica...) and writes it again; while it
holds a batch Redis refused, the read loop takes no new calls. A result over
`RPC_MAX_PAYLOAD_BYTES` encoded is answered with `ResultTooLarge` (`common.calls`), and
a batch Redis refuses for good while it answers a PING is written entry by entry, the
one it refuses answered with an error (`ReplyWrites.write_apart`): one reply never
holds back the others, nor the worker's shutdown.

Redelivery (`common.redelivery`): every `reap_interval` a worker runs the
reclaim script, which moves the pending calls of every consumer without a live
lease (a SIGKILLed, stopped or partitioned instance) to itself, except within a grace
(one lease and one interval) after the service's reclaims were broken off (a Redis
outage, which ends the live workers' leases too, or a fresh start): time for every
live worker to renew before its calls are taken for a dead one's. A reclaimed call whose
id is in the deduplication window already completed: its stored reply is sent again
and it does not run twice. The lease is renewed from a thread (`common.lease`), so a
handler that blocks the event loop does not lose it, unless the loop stays blocked
past `LOOP_STALL_LIMIT` (taken for hung). Calls of a consumer whose lease lapsed while
it was still running (hung, or cut off from Redis) may run twice: delivery is
at-least-once, as documented. A call delivered more than `max_deliveries` times
(`RPC_MAX_DELIVERIES`) is not run again but answered with an error, or
dead-lettered (`common.calls`).

Hot path: `_consume`, `CallRunner._begin`, `ReplyWrites.commands` (covered by
`make bench-rpc`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import constants
from common.aio import Backoff, background, cancel_and_wait, cancelling
from common.calls import CallRunner, WorkerStats
from common.connection import REDIS_DOWN_ERRORS, RawConnection, pack_commands
from common.log import get_logger
from common.outage import Outage
from common.outbox import Outbox
from common.params import MethodSpec
from common.redelivery import Redelivery
from common.replies import ReplyWrites

log = get_logger("switchboard.worker")


class Worker(CallRunner):
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
        lease_ttl: float = 3.0,
        block_ms: int = 1000,
        retry_delay: float = 1.0,
        dead_letter_cap: int = 10_000,
        max_deliveries: int = 3,
        max_payload: int,
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
        self.max_deliveries = max_deliveries
        self.max_payload = max_payload
        self.stats = WorkerStats()
        self._bucket_seconds = max(dedup_window / 2, 1.0)
        self._executor = ThreadPoolExecutor(thread_pool, thread_name_prefix=f"{service}-handler")
        self.redelivery = Redelivery(
            redis,
            service,
            consumer,
            self._bucket_seconds,
            lease_ttl=lease_ttl,
            reap_interval=reap_interval,
        )
        # The read loop's connection (reads, and the writes that ride along) and
        # the flusher's (writes made while the read loop is blocked in a read).
        self._reader = RawConnection(redis)
        self._writer = RawConnection(redis)
        self._writes = ReplyWrites(service, self._bucket_seconds, dead_letter_cap)
        self._stream_names = {s.encode(): s for s in (self.stream, self.direct, *self.tasks)}
        # Methods whose handler can never suspend: run in the read loop, no task.
        self._inline = {name for name, spec in methods.items() if spec.never_suspends}
        self._inflight: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self.outbox = Outbox(self._writer, self._writes, self._slot_free)
        self._finish = self.outbox.finish
        self._started_tasks = False  # the read loop started calls since its last turn
        self._tasks: list[asyncio.Task[None]] = []
        # The read loop's delay between failed attempts (`redis_answered` cuts it short).
        self._read_backoff = Backoff()

    @property
    def inflight(self) -> int:
        """How many calls (and tasks) this worker is running now."""
        return len(self._inflight)

    async def start(self) -> None:
        """Create the consumer groups (both streams) and start consuming."""
        await self._ensure_groups()
        self._tasks = [
            background(self._consume(), name=f"{self.service}-consume"),
            background(self._reap(), name=f"{self.service}-reap"),
            background(self.outbox.run(), name=f"{self.service}-flush"),
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
        if not await self.outbox.drain(max(grace, 1.0)):
            # Their entries are left pending when Redis did not take their acks either:
            # another instance reclaims them.
            log.warning("replies not flushed before shutdown")
        for task in self._tasks:
            await cancel_and_wait(task)
        await self._reader.aclose()
        await self._writer.aclose()
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

    def redis_answered(self) -> None:
        """Redis answered another loop of this process (the heartbeat, after failing):
        a read or a flush waiting out a failure tries again now, not up to 2 s later."""
        self._read_backoff.wake()
        self.outbox.wake()

    def _free_slots(self) -> int:
        if self.outbox.held:  # Redis refuses writes: a call run now could not be answered
            return 0
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

        Every read carries, in the same write, the replies, acks and bookkeeping
        of what finished since the last one.
        """
        backoff = self._read_backoff
        outage = Outage(log, "redis unreachable, retrying", "redis reachable again")
        refused = Outage(log, "redis refused the call read, retrying", "calls read again")
        probe_first = True
        group, consumer = constants.WORKER_GROUP, self.consumer
        first = (self.stream, self.direct, self.tasks[0])
        everything = (*first, self.tasks[1])
        read_timeout = self.block_ms / 1000 + self._reader.timeout
        reads: dict[tuple[bool, int], bytes] = {}  # the read commands, packed once
        handed_off = False  # a batch failed with the last read: the flusher has it
        outbox = self.outbox
        while not self._stopping.is_set() and not cancelling():
            free = self._free_slots()
            if free <= 0:
                outbox.flush_soon()
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            per_stream = free if probe_first else max(1, free // 4)
            read = reads.get((probe_first, per_stream))
            if read is None:
                command: tuple[Any, ...] = ("XREADGROUP", "GROUP", group, consumer)
                command += ("COUNT", per_stream)
                streams = first if probe_first else everything
                if not probe_first:
                    command += ("BLOCK", self.block_ms)
                command += ("STREAMS", *streams, *(">",) * len(streams))
                read = reads[(probe_first, per_stream)] = pack_commands([command])
            batch = [] if handed_off else outbox.take()
            try:
                # In the `try`: a bug building a batch's commands must not end the loop
                # (the flusher writes the batch apart, the one at fault acked only).
                flush = self._writes.commands(batch) if batch else []
                await self._reader.send_packed(pack_commands(flush) + read)
                if batch:
                    outbox.written(batch, await self._reader.read(len(flush)))
                    batch = []
                (response,) = await self._reader.read(1, timeout=read_timeout)
            except Exception as exc:  # any: the connection is dropped, the next read remakes it
                outbox.requeue(batch)
                if batch:
                    # Redis may be refusing the batch, not down (`common.replies`): the
                    # flusher finds out and writes it; the next read goes without it.
                    handed_off = True
                    continue
                outage.failed(exc)
                await backoff.wait()
                continue
            except BaseException:
                outbox.requeue(batch)  # cancelled mid-write: the flusher writes it again
                raise
            if isinstance(response, ResponseError):
                await self._read_refused(response, refused, backoff)
                continue
            handed_off = False
            backoff.reset()
            outage.recovered()
            if refused.since is not None:  # rare: skip the call on the hot path
                refused.recovered()
            if isinstance(response, dict):  # RESP3
                response = list(response.items())
            if probe_first:
                probe_first = bool(response)
            else:
                probe_first = any(len(e) >= per_stream for _, e in response or ())
            outbox.in_read_loop = True
            try:
                for stream, entries in response or ():
                    name = self._stream_names.get(stream) or stream.decode()
                    for entry_id, flat in entries:
                        self._start(name, entry_id, _call_field(flat))
                if self._started_tasks:
                    # One turn of the loop: every call just started runs up to its
                    # first suspension, so those that finish at once (most fast
                    # handlers) ride along with the next read's write.
                    self._started_tasks = False
                    await asyncio.sleep(0)
            finally:
                outbox.in_read_loop = False
        outbox.flush_soon()

    async def _read_refused(self, error: ResponseError, refused: Outage, backoff: Backoff) -> None:
        """Redis answered the read with an error: make the groups again if a stream was
        deleted (expiry, FLUSHALL), else (a stream key of another type, say) wait and
        read again: the loop must not end while the worker runs."""
        failure: Exception = error
        if "NOGROUP" in str(error):
            try:
                await self._ensure_groups()
                return
            except Exception as exc:
                failure = exc
        refused.failed(failure)
        await backoff.wait()

    async def _reap(self) -> None:
        """Every `reap_interval`: put due task retries back, reclaim dead instances' calls."""
        # Quiet while Redis is unreachable (the consume loop says so); Redis refusing the
        # scripts (maxmemory reached) or a bug is said here, once per outage.
        outage = Outage(log, "reap failed, retrying", "reaping again")
        while not self._stopping.is_set() and not cancelling():
            await asyncio.sleep(self.reap_interval)
            try:
                await self.redelivery.move_due_retries()
                # Run with no room too (claiming nothing): Redis notes every reclaim, and
                # one missing for long reads as an outage, after which reclaiming waits.
                claimed = await self.redelivery.reclaim(max(self._free_slots(), 0))
                outage.recovered()
            except REDIS_DOWN_ERRORS:
                continue
            except Exception as exc:
                outage.failed(exc)
                continue
            if claimed:
                self.stats.redelivered += len(claimed)
                log.info("reclaimed calls of dead instances", extra={"fields": {"n": len(claimed)}})
            for stream, entry_id, fields, deliveries in claimed:
                self._start(stream, entry_id, fields.get(b"c"), max(deliveries, 2))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._inflight.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slot_free.set()

    def snapshot(self) -> dict[str, Any]:
        """Counters and per-method latency histograms as plain data."""
        return {
            "inflight": self.inflight,
            "expired": self.stats.expired,
            "malformed": self.stats.malformed,
            "redelivered": self.stats.redelivered,
            "deduplicated": self.stats.deduplicated,
            "retried": self.stats.retried,
            "dead_lettered": self.stats.dead_lettered,
            "abandoned": self.stats.abandoned,
            "methods": {name: s.snapshot() for name, s in self.stats.methods.items()},
        }


def _call_field(flat: Any) -> bytes | None:
    """The `c` field of a stream entry as XREADGROUP returns it (a flat list)."""
    if not flat:
        return None  # an entry deleted while pending
    if isinstance(flat, dict):
        return flat.get(b"c")
    if flat[0] == b"c":
        return bytes(flat[1])
    return dict(zip(flat[::2], flat[1::2], strict=False)).get(b"c")
