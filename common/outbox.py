"""What a worker finished and has not written yet, and the flusher that writes it.

`common.worker.Worker` hands every finished call here (`Outbox.finish`). Its read
loop takes what finished since its last turn (`take`) and writes it in the same
write as its next read; what finishes while the read loop is blocked in a read is
written by the flusher (`run`), on a connection of its own. Either way a batch is
written as `common.replies.ReplyWrites` says, in its crash-safe order.

What Redis does not take is not dropped:

- Redis down (no connection, no answer): the batch is kept and written again with
  backoff, until Redis is back.
- Redis up but refusing writes for now (`common.replies.refusal`: out of memory at
  maxmemory with noeviction, a read-only replica while a failover completes, a save
  that failed, a script past its time limit, loading, the credentials): each refused
  command gets an error reply; the batch is held and written again the same way. While
  a batch is held (`held`) the worker takes no new calls, so what it holds stays
  within its concurrency; a handler run now could not be answered anyway. A reply is
  held until its call's deadline, past which no caller waits for it: it is dropped
  (logged) and its entry acked only. A task's writes (its retry or dead letter), which
  no caller waits for, are held `TASK_HOLD_SECONDS` at most, then dropped the same way.
- Redis refusing one entry for good (a value over its `proto-max-bulk-len`: it drops
  the connection and still answers a PING, `WriteRefused`): `ReplyWrites.write_apart`.

Each outage is logged once as it starts and once as it ends (`common.outage`).
A batch's writes and its acks are taken all or nothing (`common.replies`): the entries
of a batch held stay pending, so a worker killed while it holds them leaves their calls
to be redelivered (run again: their replies were never stored) as any dead worker's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.exceptions import ResponseError

from common.aio import Backoff, cancelling
from common.connection import RawConnection, WriteRefused
from common.log import get_logger
from common.outage import Outage
from common.protocol import DEFAULT_SEND_TTL
from common.redis_failures import is_refusal
from common.replies import Finished, ReplyWrites, acked_only, error_replies, refusal

log = get_logger("switchboard.worker")

_MAX_FLUSH_BATCH = 512
# How long a task's writes are held while Redis refuses them (see the docstring): the
# default time a task may wait to start (`RpcClient.send`'s ttl).
TASK_HOLD_SECONDS = DEFAULT_SEND_TTL


class Outbox:
    """The finished entries of one worker not written yet, and its flusher."""

    def __init__(self, conn: RawConnection, writes: ReplyWrites, resumed: asyncio.Event) -> None:
        """`conn`: the flusher's connection; `resumed`: set when Redis takes the writes it
        refused again (the worker's read loop waits for it while `held`)."""
        self.conn = conn
        self.writes = writes
        self.finished: list[Finished] = []
        self.unflushed = 0  # finished entries not yet written
        self.all_flushed = asyncio.Event()
        self.wanted = asyncio.Event()  # the flusher has something to write
        self.in_read_loop = False  # finishing now: the read loop writes it next
        self.held = False  # a batch Redis refused is held: take no new calls
        self._resumed = resumed
        self._backoff = Backoff()
        self._outage = Outage(log, "reply flush failed, retrying", "replies flushed again")

    def wake(self) -> None:
        """Redis answered another loop of this process: a write waiting out a failure
        tries again now, not at the end of its backoff."""
        self._backoff.wake()

    def finish(self, done: Finished) -> None:
        """Queue `done` for writing. Hot path."""
        self.finished.append(done)
        self.unflushed += 1
        self.all_flushed.clear()
        if not self.in_read_loop:
            self.wanted.set()  # the read loop may be blocked: the flusher writes it

    def flush_soon(self) -> None:
        """Have the flusher write what is finished: the read loop, which would write it
        with its next read, is not reading now (no free slot, or stopping)."""
        if self.finished:
            self.wanted.set()

    def take(self) -> list[Finished]:
        """The next batch to write (the oldest first)."""
        batch = self.finished[:_MAX_FLUSH_BATCH]
        del self.finished[:_MAX_FLUSH_BATCH]
        self.flush_soon()  # the rest
        return batch

    def requeue(self, batch: list[Finished]) -> None:
        """A write of `batch` failed: the flusher writes it again (it is never dropped)."""
        if batch:
            self.finished[:0] = batch
            self.wanted.set()

    def written(self, batch: list[Finished], replies: list[Any]) -> None:
        """The read loop wrote `batch` and got `replies`. Should Redis have refused it for
        now, the flusher writes it again, and no new call is taken meanwhile."""
        if self._settle(batch, replies) is not None:
            self.held = True
            self.requeue(batch)

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for everything finished to be written; whether it was."""
        if self.unflushed:
            self.wanted.set()
            try:
                await asyncio.wait_for(self.all_flushed.wait(), timeout)
            except TimeoutError:
                return False
        return True

    async def run(self) -> None:
        """The flusher: write what finishes while the read loop is blocked in a read."""
        while not cancelling():
            await self.wanted.wait()
            self.wanted.clear()
            batch = self.take()
            while batch and not cancelling():
                batch = await self._write(batch)

    async def _write(self, batch: list[Finished]) -> list[Finished]:
        """Write `batch`; what is left to write again (after a backoff, if Redis failed)."""
        try:
            # `ReplyWrites.write` inlined: one coroutine less per flush (a hot path).
            replies = await self.conn.execute(self.writes.commands(batch))
        except Exception as exc:  # any: a flusher that ends leaves replies unwritten
            if not isinstance(await self.conn.write_failure(exc), WriteRefused):
                return await self._again(batch, exc)  # down: delivered once Redis is back
            # Redis answers: it refused this write for good (a value over its limit?)
            replies, left, refused = await self.writes.write_apart(self.conn, batch)
            self._settle(batch[: len(batch) - len(left)], replies)
            if refused is not None:
                return await self._again(left, refused)
            if not left:
                self._accepted()
            return left  # if any, Redis stopped answering: the next write finds out
        except BaseException:
            self.requeue(batch)  # cancelled mid-write: written again
            raise
        refused = self._settle(batch, replies)
        if refused is not None:
            return await self._again(batch, refused)
        self._accepted()
        return []

    def _accepted(self) -> None:
        """A batch is written: an outage is over, and new calls are taken again."""
        self._backoff.reset()
        self._outage.recovered()
        if self.held:
            self.held = False
            self._resumed.set()

    async def _again(self, batch: list[Finished], exc: Exception) -> list[Finished]:
        """After `batch` failed with `exc`: say so (once per outage), wait, and give back
        what to write again: all of it, but what Redis refuses past its bound."""
        self._outage.failed(exc)
        if is_refusal(exc):
            self.held = True
            batch = _past_bounds_acked(batch)
        await self._backoff.wait()
        return batch

    def _settle(self, batch: list[Finished], replies: list[Any]) -> ResponseError | None:
        """Count `batch` as written with `replies`, unless Redis refused it for now: then
        that refusal, and nothing counted. An error reply of another kind (a key of
        the wrong type) is logged: a bug or bad data, which writing again cannot fix."""
        errors = error_replies(replies)
        if errors:
            refused = refusal(errors)
            if refused is not None:
                return refused
            fields = {"error": str(errors[0])}
            log.error("reply flush: redis refused a command", extra={"fields": fields})
        self.unflushed -= len(batch)
        if self.unflushed <= 0:
            self.all_flushed.set()
        return None


def _past_bounds_acked(batch: list[Finished]) -> list[Finished]:
    """`batch`, held while Redis refuses it, with the entries past their bound (a call's
    deadline, `TASK_HOLD_SECONDS` for a task's writes) acked only; each kind logged."""
    now = time.time()
    kept: list[Finished] = []
    calls: list[str] = []
    tasks: list[str] = []
    for done in batch:
        if done.call_id is not None:  # an ack alone is held until written
            if done.deadline is None:  # a task's: its bound starts at its first refusal
                done.deadline = now + TASK_HOLD_SECONDS
            if now > done.deadline:
                (tasks if done.inbox is None else calls).append(done.method)
                done = acked_only(done)
        kept.append(done)
    if calls:
        fields: dict[str, Any] = {"n": len(calls), "methods": sorted(set(calls))}
        message = "replies dropped: redis refused them past their deadline"
        log.error(message, extra={"fields": fields})
    if tasks:
        fields = {"n": len(tasks), "methods": sorted(set(tasks)), "seconds": TASK_HOLD_SECONDS}
        log.error("task writes dropped: redis refused them too long", extra={"fields": fields})
    return kept
