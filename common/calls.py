"""Running one call: decode, check the deadline, run the handler, encode the outcome.

`CallRunner` is the half of `common.worker.Worker` that runs what the read loop
hands it: a call to an `async def` that cannot suspend (`MethodSpec.never_suspends`)
runs to its end right there, in its own context; any other call in a task of its
own (sync handlers in the worker's thread pool, so a CPU-bound handler never
blocks the loop). A redelivered call whose reply is in the deduplication window is
answered from it and not run again; one delivered more than `max_deliveries`
times (each worker running it died or was stopped before answering: a handler
that kills its process, `os._exit` or the OOM killer) is not run again: a call is
answered with a `RemoteError` (type `WorkerLost`), a task becomes a dead letter.
Every outcome goes to `_finish` as a `Finished` entry; failed tasks get a retry
with backoff or become dead letters.

Whatever a handler raises is its call's answer, `BaseException`s included
(`SystemExit`, `KeyboardInterrupt`, `GeneratorExit`): only a `CancelledError` of a
call's task that was cancelled keeps its meaning (the worker stopping: the call is
handed back). An error that cannot be encoded as it is (a `__str__` that raises,
unencodable `details`) is answered as a plain `RemoteError` naming its type, with
its code and message when they are text; a `retry_after` that is no number of
seconds is left out: every call gets an answer and every entry is acked. The
message a caller gets, and the log line, hold at most `MAX_ERROR_CHARS` characters.

A result the codec cannot encode (a type it does not carry, a string with a lone
surrogate) is answered with `InvalidResult` naming the cause, and one over
`RPC_MAX_PAYLOAD_BYTES` encoded with `ResultTooLarge` naming its size: the handler
did not fail, its result cannot travel. Either is logged once, with the method (an
error reply over the bound, `details` too large, is answered by its type, code and
message alone). A task whose result cannot travel is not run again (its handler
ran, and would answer the same): it becomes a dead letter.

Hot path: `_begin`, `_run_inline`, `_run`, `_done`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from common import codec, deadletters
from common.aio import cancelling
from common.errors import (
    InvalidParams,
    InvalidResult,
    MethodNotFound,
    RemoteError,
    ResultTooLarge,
    RpcError,
    ServiceError,
    SwitchboardError,
    quoted,
    shortened,
)
from common.log import get_logger, request_id_var
from common.metrics import MethodStats
from common.params import MethodSpec
from common.protocol import Call, error_reply, ok_reply
from common.redelivery import Redelivery
from common.replies import Finished

log = get_logger("switchboard.worker")

_MAX_RETRY_DELAY = 60.0
# Past 2**16 times the first delay, every retry waits `_MAX_RETRY_DELAY` anyway.
_MAX_BACKOFF_EXPONENT = 16
# How much of a handler's error message is sent back and logged.
MAX_ERROR_CHARS = 2000


@dataclass(slots=True)
class WorkerStats:
    methods: dict[str, MethodStats] = field(default_factory=dict)
    expired: int = 0  # calls skipped because their deadline passed while queued
    malformed: int = 0  # entries that could not be decoded (acked and dropped)
    redelivered: int = 0  # calls reclaimed from dead instances
    deduplicated: int = 0  # reclaimed calls answered from the stored reply, not re-run
    retried: int = 0  # failed tasks scheduled for another attempt
    dead_lettered: int = 0  # tasks that failed every attempt
    abandoned: int = 0  # delivered more than max_deliveries times, never answered: not run


class CallRunner:
    """Runs calls for a `Worker`, which provides the state declared here."""

    service: str
    methods: Mapping[str, MethodSpec]
    stats: WorkerStats
    retry_delay: float
    max_deliveries: int
    max_payload: int  # RPC_MAX_PAYLOAD_BYTES: the largest reply written
    redelivery: Redelivery
    _executor: ThreadPoolExecutor
    _inline: set[str]  # methods that never suspend: run without a task
    _started_tasks: bool  # calls were started in tasks since the read loop's last turn
    _finish: Callable[[Finished], None]  # queues an outcome for writing (`common.outbox`)

    def _track(self, task: asyncio.Task[None]) -> None:
        raise NotImplementedError

    def _start(self, stream: str, entry_id: bytes, data: bytes | None, deliveries: int = 1) -> None:
        """Decode an entry and start its call (`deliveries` > 1: reclaimed from a dead
        consumer, its delivery count after the claim)."""
        try:
            if data is None:
                raise ValueError("no call field")
            call = Call.decode(data)
        except Exception:
            self.stats.malformed += 1
            log.warning("malformed call entry dropped", extra={"fields": {"entry": str(entry_id)}})
            self._finish(Finished(stream, entry_id))
            return
        if deliveries > 1:
            run = self._run_redelivered(stream, entry_id, call, deliveries)
            self._track(asyncio.create_task(run))
        else:
            self._begin(stream, entry_id, call)

    async def _run_redelivered(
        self, stream: str, entry_id: bytes, call: Call, deliveries: int
    ) -> None:
        stored = await self.redelivery.stored_reply(call.call_id)
        if stored is not None:
            self.stats.deduplicated += 1
            self._finish(_finished(stream, entry_id, call, stored, remember=False))
            return
        if deliveries > self.max_deliveries:
            self._abandon(stream, entry_id, call, deliveries)
            return
        task = self._begin(stream, entry_id, call)
        if task is not None:
            await task  # keep this slot taken until the call is done

    def _abandon(self, stream: str, entry_id: bytes, call: Call, deliveries: int) -> None:
        """Answer (or dead-letter) a call that every worker it was handed to left unanswered."""
        self.stats.abandoned += 1
        log.warning(
            "call abandoned: delivered too often, never answered",
            extra={
                "fields": {"method": call.method, "deliveries": deliveries, "task": call.is_task}
            },
        )
        error = RemoteError(
            f"{quoted(call.method)} was not run again: its {deliveries - 1} earlier "
            "deliveries ended without an answer (the worker running it died or stopped)",
            remote_type="WorkerLost",
        )
        done = _finished(stream, entry_id, call, error_reply(call.call_id, error))
        if call.is_task:
            done.dead = deadletters.encode(call, error.to_dict())
            self.stats.dead_lettered += 1
        self._finish(done)

    def _begin(self, stream: str, entry_id: bytes, call: Call) -> asyncio.Task[None] | None:
        """Start the call in a task of its own (None when there is nothing to run)."""
        if time.time() > call.deadline:
            self.stats.expired += 1
            self._finish(Finished(stream, entry_id))
            return None
        spec = self.methods.get(call.method)
        if spec is None:
            error: SwitchboardError = MethodNotFound(
                f"{self.service} has no method {quoted(call.method)}"
            )
            self._complete(stream, entry_id, call, error_reply(call.call_id, error), error)
            return None
        if call.method in self._inline:
            # Its own context, as a task would give it; no task, as it cannot suspend.
            contextvars.copy_context().run(self._run_inline, stream, entry_id, call, spec)
            return None
        task = asyncio.create_task(self._run(stream, entry_id, call, spec))
        self._track(task)
        self._started_tasks = True
        return task

    def _count(self, call: Call) -> tuple[MethodStats, float]:
        """Count the call in its method's stats, set its request id; when it started."""
        stats = self.stats.methods.get(call.method)
        if stats is None:
            stats = self.stats.methods[call.method] = MethodStats()
        stats.calls += 1
        request_id_var.set(call.request_id)
        return stats, time.perf_counter()

    def _run_inline(self, stream: str, entry_id: bytes, call: Call, spec: MethodSpec) -> None:
        """Run a call whose handler never suspends (see `never_suspends`) to its end, here."""
        stats, started = self._count(call)
        try:
            args, kwargs = spec.bind(call.args, call.kwargs, call.who)
            coro = spec.fn(*args, **kwargs)
            try:
                coro.send(None)
            except StopIteration as stop:
                result = stop.value
            else:  # cannot happen for a body without await: refuse rather than hang
                coro.close()
                raise RuntimeError(f"{call.method} suspended without awaiting")
        except BaseException as exc:  # SystemExit etc. too (nothing cancels a call run here)
            self._done(stream, entry_id, call, stats, started, None, exc)
        else:
            self._done(stream, entry_id, call, stats, started, result, None)

    async def _run(self, stream: str, entry_id: bytes, call: Call, spec: MethodSpec) -> None:
        """Run one call in a task of its own (its own context and `current_task()`)."""
        stats, started = self._count(call)
        try:
            args, kwargs = spec.bind(call.args, call.kwargs, call.who)
            if spec.is_async:
                result = await spec.fn(*args, **kwargs)
            else:
                ctx = contextvars.copy_context()
                fn = functools.partial(ctx.run, spec.fn, *args, **kwargs)
                result = await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except BaseException as exc:  # SystemExit etc. too: the handler's answer, not ours
            if isinstance(exc, asyncio.CancelledError) and cancelling():
                raise  # the worker is stopping: the call is handed back
            self._done(stream, entry_id, call, stats, started, None, exc)
        else:
            self._done(stream, entry_id, call, stats, started, result, None)

    def _done(
        self,
        stream: str,
        entry_id: bytes,
        call: Call,
        stats: MethodStats,
        started: float,
        result: Any,
        exc: BaseException | None,
    ) -> None:
        """Encode the outcome of a call that ran, and queue it for writing. Never raises:
        an inline call runs in the read loop."""
        error: SwitchboardError | None = None
        if exc is None:
            try:
                reply = ok_reply(call.call_id, result)
            except (TypeError, ValueError, OverflowError) as encode_exc:  # the codec's refusal
                error = self._not_encodable(call, encode_exc)
            except BaseException as encode_exc:  # the result's own code ran (a model's fields)
                exc = encode_exc
            else:
                if len(reply) > self.max_payload:
                    error = self._too_large(call, len(reply))
        if exc is not None:
            error, reply = self._error_reply(call, exc)
        elif error is not None:
            reply = error_reply(call.call_id, error)
        if error is not None:
            stats.errors += 1
        stats.latency.observe(time.perf_counter() - started)
        self._complete(stream, entry_id, call, reply, error)

    def _complete(
        self,
        stream: str,
        entry_id: bytes,
        call: Call,
        reply: bytes,
        error: SwitchboardError | None,
    ) -> None:
        done = _finished(stream, entry_id, call, reply)
        if error is not None and call.is_task:
            self._after_task_failure(call, error, done)
        self._finish(done)

    def _after_task_failure(self, call: Call, error: SwitchboardError, done: Finished) -> None:
        """Schedule another attempt with backoff, or keep it as a dead letter."""
        permanent = isinstance(error, (MethodNotFound, InvalidParams, InvalidResult))
        if not permanent and call.attempt < call.max_attempts:
            exponent = min(call.attempt - 1, _MAX_BACKOFF_EXPONENT)
            delay = min(self.retry_delay * 2**exponent, _MAX_RETRY_DELAY)
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

    def _error_reply(self, call: Call, exc: BaseException) -> tuple[SwitchboardError, bytes]:
        """The error a failed call is answered with, and its encoded reply: the rich form
        (`_as_error`) when it encodes, else `_plain_error`'s, which always does."""
        fields: dict[str, Any] = {"method": call.method, "type": _type_name(exc)}
        try:
            error = self._as_error(call, exc)
        except BaseException:  # the error's own code ran (`__str__`): whatever it raised
            log.error(
                "handler raised an error that cannot be read",
                exc_info=exc,
                extra={"fields": fields},
            )
        else:
            try:
                reply = error_reply(call.call_id, error)
            except Exception:  # `_as_error` logged what the handler raised, if it was a bug
                log.error(
                    "handler error not encodable, answered by its type", extra={"fields": fields}
                )
            else:
                if len(reply) <= self.max_payload:
                    return error, reply
                fields["bytes"] = len(reply)  # its `details`: the message is cut already
                log.error("handler error too large, answered by its type", extra={"fields": fields})
        error = _plain_error(exc)
        return error, error_reply(call.call_id, error)

    def _not_encodable(self, call: Call, exc: BaseException) -> InvalidResult:
        """The answer to a call whose result the codec refused, logged once."""
        reason = codec.encode_failure(exc)
        fields = {"method": call.method, "error": shortened(reason, MAX_ERROR_CHARS)}
        log.error("result not encodable", extra={"fields": fields})
        return InvalidResult(
            f"the result of {self.service}.{call.method} cannot be sent over RPC: {fields['error']}"
        )

    def _too_large(self, call: Call, size: int) -> ResultTooLarge:
        """The answer to a call whose result encodes to `size` bytes, over the bound; logged."""
        fields = {"method": call.method, "bytes": size, "limit": self.max_payload}
        log.error("result too large", extra={"fields": fields})
        return ResultTooLarge.over(f"{self.service}.{call.method}", size, self.max_payload)

    def _as_error(self, call: Call, exc: BaseException) -> SwitchboardError:
        if isinstance(exc, RpcError) and not isinstance(exc, RemoteError):
            return exc  # InvalidParams etc. travel as themselves
        if isinstance(exc, SwitchboardError):
            # A RemoteError from a call the handler made passes its retry_after on too.
            retry_after = exc.retry_after if isinstance(exc, (ServiceError, RemoteError)) else None
            if retry_after is not None and not _is_seconds(retry_after):
                retry_after = None  # a handler's mistake; the error itself still travels
            return RemoteError(
                _bounded(exc.message),
                remote_type=type(exc).__name__,
                code=exc.code,
                retry_after=retry_after,
            )
        message = _bounded(str(exc))
        fields = {"method": call.method}
        if len(message) <= MAX_ERROR_CHARS:
            log.error("handler raised", exc_info=exc, extra={"fields": fields})
        else:  # the traceback would end with the whole message: its frames, and this
            fields["type"], fields["error"] = type(exc).__name__, message
            fields["traceback"] = "".join(traceback.format_tb(exc.__traceback__))
            log.error("handler raised", extra={"fields": fields})
        return RemoteError(message or type(exc).__name__, remote_type=type(exc).__name__)


def _finished(
    stream: str, entry_id: bytes, call: Call, reply: bytes | None, *, remember: bool = True
) -> Finished:
    """What is written for `call` (entry `entry_id` of `stream`): `reply` to its inbox, worth
    writing until its deadline, past which its caller waits no more (a task's has none:
    nobody waits for it, `common.outbox`). Hot path."""
    deadline = None if call.reply_to is None else call.deadline
    return Finished(stream, entry_id, call.call_id, call.reply_to, reply, remember,
                    method=call.method, deadline=deadline)  # fmt: skip


def _bounded(message: str) -> str:
    return shortened(message, MAX_ERROR_CHARS) if type(message) is str else message


def _is_seconds(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value >= 0


def _type_name(exc: BaseException) -> str:
    """The exception's class name as text UTF-8 can carry (a name may hold a lone surrogate)."""
    return type(exc).__name__.encode(errors="replace").decode()


def _plain_error(exc: BaseException) -> RemoteError:
    """An error made of plain text only, so its reply always encodes: the type name, and
    the code and message when they are strings (made UTF-8-safe)."""
    name = _type_name(exc)
    code, message = None, f"{name} (its message could not be encoded)"
    try:
        if isinstance(exc, SwitchboardError):
            text = exc.message
            if type(exc.code) is str:
                code = exc.code.encode(errors="replace").decode()
        else:
            text = str(exc)
        if type(text) is str:
            message = shortened(text, MAX_ERROR_CHARS).encode(errors="replace").decode()
    except BaseException:  # a `__str__` or property that raises: the type name says enough
        pass
    return RemoteError(message or name, remote_type=name, code=code)
