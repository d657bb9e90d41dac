"""The I/O of `common.client.RpcClient`: one enqueue writer, one inbox reader.

Enqueues go through one writer task that sends every call issued meanwhile in a
single pipelined round trip of the enqueue script (which also answers "is anyone
alive?" and "is the backlog under its bound?"): at one caller that is one round
trip per call, at many callers far fewer. Replies come back on the client's one
inbox (a Redis list), read by one task that resolves the waiting futures by call
id. The writer and the reader each own one bare connection (`RawConnection`):
redis-py's per-command machinery costs more than the round trip itself.

When no other call is waiting for a reply (always, at one caller), the reader's
connection is idle, and `_enqueue_call` writes the enqueue script and the
inbox's BLPOP onto it in one write, from the caller's own task: one write and one
waking task per call, as in the raw pipelined-list floor of `bench.rpc`.

Hot path: `_enqueue_call`, `_write_enqueues`, `_read_inbox`, `_deliver`. What an
enqueue that was not taken becomes (its error, the rejoin grace) is
`common.client_refusals`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError, RedisError, ResponseError

from common import codec, constants
from common.aio import Backoff, cancelling
from common.client_refusals import ClientRefusals, redis_failed
from common.connection import REDIS_DOWN_ERRORS, RawConnection, WriteRefused, pack_commands
from common.errors import (
    PayloadTooLarge,
    ServiceUnavailable,
    error_from_wire,
    quoted,
)
from common.log import get_logger
from common.outage import Outage
from common.protocol import DROPPED, ENQUEUE_SCRIPT, NO_INSTANCE, OVER_BACKLOG, TASK_SCRIPT, Call
from common.redis_failures import REDIS_DOWN_OR_REFUSING

log = get_logger("switchboard.client")

_INBOX_BATCH = 256
_ENQUEUE_BATCH = 512
# How long a `drop` task's submit waits for Redis before counting the task as dropped.
DROP_WAIT_SECONDS = 0.25


@dataclass(slots=True)
class Enqueue:
    script: str  # a key of _SCRIPTS
    # EVALSHA's arguments after the SHA: the number of keys, the keys, the arguments.
    args: tuple[bytes | str | float | int, ...]
    # For a call: the future of its *reply*, failed here only if the enqueue fails
    # (one future per call). For a task: resolved with the enqueue script's result.
    future: asyncio.Future[Any]
    service: str = ""
    instance: str | None = None
    deadline: float = math.inf  # the call's (epoch seconds): `common.rejoin` fails it before

    @property
    def awaits_reply(self) -> bool:
        """A call's enqueue: its future is the reply's, resolved when the reply arrives."""
        return self.script == "call"


_SCRIPTS = {"call": ENQUEUE_SCRIPT, "task": TASK_SCRIPT}
# What SCRIPT LOAD would answer: EVALSHA needs no round trip to learn it.
_SHAS = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in _SCRIPTS.items()}


class ClientIO(ClientRefusals):
    """The writer and reader half of `RpcClient`, which sets the state declared here
    (and `ClientRefusals`', the rare path of a refused enqueue)."""

    inbox: str
    _enqueuer: RawConnection
    _receiver: RawConnection
    _pending: dict[str, asyncio.Future[Any]]  # call id -> the future of its reply
    _writer: asyncio.Task[None] | None
    _outbox: asyncio.Queue[Enqueue]
    _reader_parked: bool
    _reader_wake: asyncio.Event
    _direct: Enqueue | None
    _blpop: bytes
    _writes: int  # batches the writer has finished, sent or failed
    _stalled_at: int  # `_writes` when a drop submit last gave up waiting, else -1
    max_payload: int  # RPC_MAX_PAYLOAD_BYTES: the largest envelope sent
    _inbox_backoff: Backoff  # the inbox reader's, between failed reads

    async def start(self) -> None:
        raise NotImplementedError

    async def _submit(self, item: Enqueue) -> Any:
        if self._writer is None:
            await self.start()
        self._outbox.put_nowait(item)
        return await item.future

    async def _submit_drop(self, item: Enqueue) -> Any:
        """`_submit` for a `drop` task: never an RPC or Redis error, never a wait
        longer than `DROP_WAIT_SECONDS`. `DROPPED` when Redis is unreachable or slow.

        A submit that gives up unqueues its task (the writer skips it) unless the
        task is already in the batch being written: that one may still run.
        """
        if self._stalled_at == self._writes:
            return DROPPED  # the writer is still stuck on the batch a drop gave up on
        try:
            async with asyncio.timeout(DROP_WAIT_SECONDS):
                return await self._submit(item)
        except TimeoutError:
            self._stalled_at = self._writes
        except (ServiceUnavailable, RedisError):
            pass
        return DROPPED

    async def _enqueue_call(
        self, service: str, call: Call, instance: str | None, reply: asyncio.Future[Any]
    ) -> None:
        """Send or queue the call's enqueue; a failed enqueue fails `reply` itself."""
        if instance:
            stream = constants.direct_stream(service, instance)
        else:
            stream = constants.call_stream(service)
        item = Enqueue(
            script="call",
            args=(
                3,
                constants.instances_key(service),
                stream,
                constants.limits_key(service),
                self._encoded(call, service),
                instance or "",
            ),
            future=reply,
            service=service,
            instance=instance,
            deadline=call.deadline,
        )
        if self._reader_parked:
            # Nobody else awaits a reply: the enqueue and the BLPOP for its reply
            # go in one write on the reader's idle connection.
            self._reader_parked = False
            sent = False
            try:
                enqueue = pack_commands([("EVALSHA", _SHAS["call"], *item.args)])
                await self._receiver.send_packed(enqueue + self._blpop)
                sent = True
            except REDIS_DOWN_OR_REFUSING:
                pass  # (noted by the connection) the writer tries again on its own
            finally:
                if sent:
                    self._direct = item
                self._reader_wake.set()  # even when cancelled: the reader must go on
            if sent:
                return
        self._outbox.put_nowait(item)

    def _encoded(self, call: Call, service: str) -> bytes:
        """The call's envelope; `PayloadTooLarge` over `RPC_MAX_PAYLOAD_BYTES`, before
        anything is sent: Redis drops the connection of a write with a value over its
        own limit, and the other calls of the same write would fail with it."""
        data = call.encode()
        if len(data) > self.max_payload:
            raise PayloadTooLarge(
                f"the arguments of {quoted(f'{service}.{call.method}')} encode to "
                f"{len(data)} bytes, over the {self.max_payload}-byte limit "
                "(RPC_MAX_PAYLOAD_BYTES)"
            )
        return data

    async def _write_enqueues(self) -> None:
        """The one writer: every enqueue waiting is sent in one pipelined round trip."""
        while not cancelling():
            batch = [await self._outbox.get()]
            while len(batch) < _ENQUEUE_BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            # Skipped: the enqueues whose caller gave up already (a call's timeout, a
            # drop task's bounded wait).
            batch = [item for item in batch if not item.future.done()]
            try:
                results = await self._send_enqueues(batch) if batch else []
            except WriteRefused:
                # Redis refused the write: it is not down (or no longer: the reader,
                # which may be waiting out the outage, reads the replies now).
                self._inbox_backoff.wake()
                await self._send_apart(batch)
                continue
            except REDIS_DOWN_OR_REFUSING as exc:  # never ends the writer: later calls need it
                _fail(batch, exc)
                continue
            finally:
                self._writes += 1
            if self._inbox_backoff.failing and not any(isinstance(r, Exception) for r in results):
                # Redis took the enqueues: the reader, waiting out a failure, reads the
                # replies now instead of up to 2 s later.
                self._inbox_backoff.wake()
            for item, result in zip(batch, results, strict=True):
                self._enqueued(item, result)

    async def _send_apart(self, batch: list[Enqueue]) -> None:
        """Send the enqueues of a write Redis refused (`WriteRefused`) one by one: Redis
        drops the connection of a command holding a value over its own limit
        (`proto-max-bulk-len`, set lower than `RPC_MAX_PAYLOAD_BYTES`), and the other
        calls of that write must not fail with it. One refused alone (twice:
        `_send_enqueues` tries again) is `PayloadTooLarge`; once Redis no longer answers,
        the rest fail as in an outage."""
        for i, item in enumerate(batch):
            try:
                (result,) = await self._send_enqueues([item])
            except WriteRefused:
                if not item.future.done():
                    item.future.set_exception(_refused_by_redis(item))
                continue
            except REDIS_DOWN_OR_REFUSING as exc:
                _fail(batch[i:], exc)
                return
            self._enqueued(item, result)

    def _enqueued(self, item: Enqueue, result: Any) -> None:
        """Act on the enqueue script's result (an entry id unless refused). Hot path."""
        if item.future.done():
            return  # the caller timed out meanwhile
        if type(result) is bytes:  # an entry id: taken (the common case, tested first)
            if item.awaits_reply:
                self._reached.add(item.service)
            else:
                item.future.set_result(result)
        elif isinstance(result, Exception):  # e.g. the script's write refused (OOM)
            if _protocol_error(result):  # read before Redis closed the connection
                item.future.set_exception(_refused_by_redis(item))
            else:
                self._touch.failed()
                item.future.set_exception(redis_failed(result))
        elif result == NO_INSTANCE and self._rejoin.park(item):
            pass  # just after an outage: enqueued again once an instance is back
        elif result == NO_INSTANCE and self._touch.closes_unchecked():
            self._off_loop(item, self._after_close(item))  # was that close a restart?
        elif not item.awaits_reply:
            item.future.set_result(result)
        elif result in (NO_INSTANCE, OVER_BACKLOG):
            self._off_loop(item, self._fail_call(item, result))
        else:
            self._reached.add(item.service)

    async def _send_enqueues(self, batch: list[Enqueue]) -> list[Any]:
        """The enqueue scripts' results (a `ResponseError` in the slot of a refused one);
        `WriteRefused` when Redis, still answering, will not take the write."""
        commands = [("EVALSHA", _SHAS[item.script], *item.args) for item in batch]
        try:
            results = await self._enqueuer.execute(commands)
        except REDIS_DOWN_ERRORS:
            # The connection may have died idle (a Redis restart): one retry on a
            # fresh one, as redis-py's own retry would. At-least-once: a batch
            # that did get in before the connection broke is enqueued twice.
            results = await self._enqueuer.execute_refusable(commands)
            # The grace counts from here: the connection noted the failure when it saw
            # it, maybe a read timeout ago, and a "no instance" among these results is
            # one of the rejoin's to park (`_enqueued`), not to fail.
            self._touch.failed()
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            # Redis restarted (its script cache is empty): EVAL loads the script.
            again = [("EVAL", _SCRIPTS[batch[i].script], *batch[i].args) for i in missing]
            loaded = await self._enqueuer.execute_refusable(again)
            for i, result in zip(missing, loaded, strict=True):
                results[i] = result
        return results

    async def _read_inbox(self) -> None:
        """BLPOP the inbox while replies are awaited; with several awaited, LPOP the
        ones queued up in the same write. Parked while none is awaited."""
        backoff = self._inbox_backoff
        outage = Outage(log, "reply inbox unreachable", "reply inbox reachable again")
        conn = self._receiver
        drain_then_blpop = pack_commands([("LPOP", self.inbox, _INBOX_BATCH)]) + self._blpop
        timeout = 1 + conn.timeout
        drain = False
        while not cancelling():
            try:
                direct, self._direct = self._direct, None
                if direct is not None:
                    (entry,) = await conn.read(1)
                    if isinstance(entry, NoScriptError):
                        self._outbox.put_nowait(direct)  # the writer loads the script
                    else:
                        self._enqueued(direct, entry)
                    direct = None
                elif not self._pending:
                    self._reader_wake.clear()
                    self._reader_parked = True
                    await self._reader_wake.wait()
                    continue
                else:
                    # At one caller the LPOP would be one wasted command per call.
                    if drain:
                        await conn.send_packed(drain_then_blpop)
                        # Delivered before the BLPOP's answer, which may take a while.
                        (drained,) = await conn.read(1)
                        if isinstance(drained, ResponseError):
                            raise drained
                        for raw in drained or ():
                            self._deliver(raw)
                    else:
                        await conn.send_packed(self._blpop)
                (popped,) = await conn.read(1, timeout=timeout)
                if isinstance(popped, ResponseError):
                    raise popped
                if popped is not None:
                    self._deliver(popped[1])
                drain = len(self._pending) > 0
                backoff.reset()
                outage.recovered()
            except REDIS_DOWN_OR_REFUSING as exc:
                if direct is not None and not direct.future.done():
                    self._outbox.put_nowait(direct)  # its enqueue's fate is unknown: again
                # A refused LPOP leaves its BLPOP's reply due: read later, it would be
                # taken for the answer to the next command (an enqueue's, say).
                await conn.discard()
                if isinstance(exc, ResponseError):
                    self._touch.failed()  # an error reply (the connection notes its failures)
                outage.failed(exc)
                drain = True
                await backoff.wait()
            finally:
                self._reader_parked = False

    def _deliver(self, raw: Any) -> None:
        """Resolve the future of the call `raw` answers. Never raises, whatever `raw`
        holds: the inbox reader serves every call of the process. Hot path."""
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
            return
        error = reply.get("e")
        if not isinstance(error, dict):
            # Rare path: a buggy worker. Its caller gets a RemoteError, not a hang.
            log.warning("malformed error reply", extra={"fields": {"call_id": quoted(reply["id"])}})
        future.set_exception(error_from_wire(error))


def _protocol_error(exc: Exception) -> bool:
    """Whether `exc` is Redis's answer to a command it could not read (then it closes the
    connection): from us, a value over its `proto-max-bulk-len`."""
    return isinstance(exc, ResponseError) and str(exc).startswith("Protocol error")


def _refused_by_redis(item: Enqueue) -> PayloadTooLarge:
    """The error of a call Redis refused to take (`_send_apart`), logged."""
    size = max((len(a) for a in item.args if isinstance(a, bytes)), default=0)
    fields = {"target_service": item.service, "bytes": size}
    log.warning("call refused by redis", extra={"fields": fields})
    return PayloadTooLarge.refused(item.service, size)


def _fail(items: list[Enqueue], cause: Exception) -> None:
    """Fail the enqueues of `items` whose caller still waits, Redis having failed with
    `cause` (`redis_failed`): each with an error of its own, which its caller marks
    with the service it called (`RpcError.service`; items of several services fail
    together)."""
    for item in items:
        if not item.future.done():
            item.future.set_exception(redis_failed(cause))
