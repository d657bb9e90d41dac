"""Redis connections, configured once for every Switchboard process.

`connect()` is the only place a Redis client is built (`connect_configured()` builds
it as a process's settings say; `connect_sync()` is its blocking twin, for the rare
thread that must not depend on the event loop): AUTH
and TLS come from the URL (`redis://user:pass@host`, `rediss://`;
`unix:///path.sock` works too), commands are retried with jittered backoff across
short blips, and dead connections are detected by keepalive and periodic health
checks instead of hanging a caller. The pool shrinks again after a burst: connections
idle for `idle_timeout` are closed (`common.redis_pool`).
`RawConnection` is the hot paths' bare connection, built from such a client's
own settings.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import hiredis
import redis
import redis.asyncio as aioredis
from hiredis import pack_command as _hiredis_pack
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry

from common.redis_pool import TrimmedPool

if TYPE_CHECKING:  # (`common.settings` imports this module)
    from common.settings import Settings

# How often a `RawConnection` checks whether the read in progress is overdue.
_WATCH_EVERY = 0.25
# What hiredis's reader answers while a reply is incomplete.
_NOT_ENOUGH = object()


class RedisClosedConnection(RedisConnectionError):
    """Redis (or a proxy before it) closed a `RawConnection` in order, at end of stream:
    a restart, a client kill, an idle timeout; not a reset, a timeout or a refusal. By
    itself it does not say that Redis went away (`common.rejoin`). (Named apart from
    websockets' `ConnectionClosed`, which the WebSocket service catches throughout.)"""


class WriteRefused(Exception):
    """A write failed while Redis still answers a PING (`RawConnection.write_failure`):
    Redis refused that write, it is not down. It drops the connection of a command
    holding a value over its `proto-max-bulk-len`, so the same write would fail again
    forever, and the other commands of the write with it: the caller writes its parts
    apart. `error`: the write's own error (also its `__cause__`); for a worker's reply
    write (`common.replies.ReplyWrites.write`), maybe a local one building the
    commands, which writing apart finds the same way."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"redis refused the write: {error}")
        self.error = error
        self.__cause__ = error


# How long a pooled connection stays open unused (REDIS_POOL_IDLE_TIMEOUT's default),
# and how many idle ones a pool keeps however long they wait: the first command after
# a quiet spell does not pay for a new connection (a TLS handshake, with rediss://).
IDLE_TIMEOUT = 60.0
MIN_IDLE = 1

# Errors that mean "Redis is not reachable right now" as opposed to "Redis said no".
REDIS_DOWN_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
# The same, plus an `asyncio.timeout()` around a Redis call expiring.
REDIS_DOWN_OR_SLOW: tuple[type[Exception], ...] = (TimeoutError, *REDIS_DOWN_ERRORS)
# What a Redis call raises when Redis is down, slow or refusing; and for any other
# error reply too: `common.redis_failures.redis_failure` tells them apart.
REDIS_DOWN_OR_REFUSING: tuple[type[Exception], ...] = (*REDIS_DOWN_OR_SLOW, ResponseError)


def connect(
    url: str,
    *,
    name: str | None = None,
    max_connections: int = 64,
    socket_timeout: float | None = 10.0,
    pool_timeout: float = 10.0,
    idle_timeout: float = IDLE_TIMEOUT,
    min_idle: int = MIN_IDLE,
) -> aioredis.Redis:
    """An asyncio Redis client for `url` (bytes in, bytes out).

    The pool blocks (up to `pool_timeout`) when all `max_connections` are busy
    instead of failing, so a burst of concurrent calls queues for a connection.
    A connection unused for `idle_timeout` seconds is closed (0: never), but for the
    `min_idle` most recently used: a burst's connections do not stay open for good.
    """
    pool = TrimmedPool.from_url(
        url,
        idle_timeout=idle_timeout,
        min_idle=min_idle,
        max_connections=max_connections,
        timeout=pool_timeout,
        retry=Retry(_backoff(), retries=2),
        **_options(url, name, socket_timeout),
    )
    # `from_pool`: the client owns its pool, so its `aclose()` closes the pool's
    # connections (and its idle check); a client given a pool leaves it open.
    return aioredis.Redis.from_pool(pool)


def connect_configured(
    settings: Settings, url: str | None = None, *, name: str | None = None
) -> aioredis.Redis:
    """`connect()` as `settings` configure a process's client: to `url`, else their
    `REDIS_URL`, its pool's idle connections closed after `REDIS_POOL_IDLE_TIMEOUT`."""
    return connect(
        url or settings.require_redis_url(),
        name=name,
        idle_timeout=settings.redis_pool_idle_timeout,
    )


def connect_sync(
    url: str, *, name: str | None = None, socket_timeout: float | None = 10.0
) -> redis.Redis:
    """A blocking Redis client for `url`, configured as `connect()`'s (AUTH, TLS,
    retries, keepalive), for one thread's use. Its pool is not trimmed as `connect()`'s
    is: one thread's commands, one after the other, all use one connection (a lease's
    thread held 1, its heartbeat every second), which a `TrimmedPool` keeps anyway (its
    `min_idle`). `max_connections` only bounds a misuse from more threads."""
    pool = redis.ConnectionPool.from_url(
        url,
        max_connections=4,
        retry=SyncRetry(_backoff(), retries=2),
        **_options(url, name, socket_timeout),
    )
    return redis.Redis(connection_pool=pool)


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.05, cap=1.0)


def _options(url: str, name: str | None, socket_timeout: float | None) -> dict[str, Any]:
    """The connection options `connect()` and `connect_sync()` share."""
    # TCP keepalive finds a peer gone silent; a unix socket has no such peer (and
    # redis-py's unix connection refuses the option).
    tcp: dict[str, Any] = {} if url.startswith("unix://") else {"socket_keepalive": True}
    return {
        "client_name": name,
        "socket_connect_timeout": 2.0,
        "socket_timeout": socket_timeout,
        "health_check_interval": 15,
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        **tcp,
    }


def as_text(value: bytes | str | int) -> str:
    """A Redis reply item as `str` (clients here return bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class _Replies(asyncio.Protocol):
    """The protocol a `RawConnection`'s socket gets once connected: replies parsed by
    hiredis as they arrive, and the one reader waiting for enough of them woken."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.replies: collections.deque[Any] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.wanted = 0  # how many replies the waiter waits for
        self.lost: BaseException | None = None
        self.writable: asyncio.Future[None] | None = None  # set while writing is paused

    def data_received(self, data: bytes) -> None:
        reader, replies = self.reader, self.replies
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not _NOT_ENOUGH:
                replies.append(reply)
        except Exception as exc:  # a protocol error: the stream cannot be trusted
            self.connection_lost(exc)
            return
        waiter = self.waiter
        if waiter is not None and len(replies) >= self.wanted and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = exc or RedisClosedConnection("connection closed by redis")
        for future in (self.waiter, self.writable):
            if future is not None and not future.done():
                future.set_exception(self.lost_error())

    def lost_error(self) -> RedisConnectionError:
        """The error of a read or write on the lost connection: `RedisClosedConnection`
        when Redis closed it in order."""
        closed = isinstance(self.lost, RedisClosedConnection)
        kind = RedisClosedConnection if closed else RedisConnectionError
        return kind(f"connection lost: {self.lost}")

    def pause_writing(self) -> None:
        if self.writable is None or self.writable.done():
            self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)


class RawConnection:
    """One dedicated Redis connection for a hot loop: commands pipelined by hand.

    redis-py's command machinery (pool checkout, per-command response callbacks,
    a pipeline object per batch, a task per timed send, a stream reader between
    the socket and the parser) costs far more than the round trip on the RPC hot
    path, so the client's enqueue writer and inbox reader and the worker's
    read/flush loop each own one of these instead. A redis-py `Connection` built
    from the client's own pool settings makes the connection and its handshake
    (so AUTH, TLS, db and client name come from the same URL); then the socket's
    protocol is replaced by `_Replies`, which feeds hiredis as data arrives.
    Commands are written with `pack_commands` below. Replies are raw RESP values
    (bytes, ints, lists); an error reply is returned as its `ResponseError`
    (e.g. `NoScriptError`) in its slot. A read that outlives its timeout raises
    redis-py's `TimeoutError`; the timeout is enforced by one coarse watchdog per
    connection (`_watch`), not a timer per read. A connection error, a timeout or
    a cancellation mid-read drops the socket (it may hold unread replies); the
    next write reconnects.
    """

    def __init__(self, redis: aioredis.Redis, *, timeout: float = 10.0) -> None:
        pool = redis.connection_pool
        # Our own timeout covers each batch of replies, so the connection itself
        # gets none: redis-py would otherwise wrap each send in `wait_for`.
        kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self._conn: Any = pool.connection_class(**kwargs)
        self._proto: _Replies | None = None
        self._transport: asyncio.Transport | None = None
        self.timeout = timeout
        # The read in progress: its task, when its replies are due (loop time),
        # whether the watchdog cancelled it.
        self._reading: asyncio.Task[Any] | None = None
        self._read_by = 0.0
        self._expired = False
        self._watchdog: asyncio.TimerHandle | None = None
        # When (time.monotonic) the connection was last found closed by Redis in order
        # (`RedisClosedConnection`: a restart, a client kill, an idle timeout), and when
        # Redis last failed it otherwise: a read or a write that raised (Redis down, slow,
        # refusing the handshake; not a cancellation), or the connection found broken (a
        # reset, a keepalive timeout, a protocol error) by a write, which makes a new
        # connection and succeeds: the one loss nobody is told of. (`common.lost_touch`.)
        self.found_closed_at = -math.inf
        self.failed_at = -math.inf

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send `commands` in one write and return their replies in order."""
        await self.send(commands)
        return await self.read(len(commands))

    async def send(self, commands: Sequence[Sequence[Any]]) -> None:
        """Write `commands` without waiting for their replies (see `read`)."""
        await self.send_packed(pack_commands(commands))

    async def send_packed(self, data: bytes) -> None:
        """Write commands already packed by `pack_commands`."""
        try:
            proto = self._proto
            if proto is None or proto.lost is not None:
                await self._connect()  # (`_drop` notes the loss)
                proto = self._proto
                assert proto is not None
            transport = self._transport
            assert transport is not None
            transport.write(data)
            # No timer on the wait: it happens only when the socket's send buffer is
            # full, and the replies' read that follows has one.
            if proto.writable is not None and not proto.writable.done():
                await proto.writable
        except BaseException as exc:
            await self._drop()
            self._failed(exc)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError("timeout connecting to redis") from exc
            raise

    async def _connect(self) -> None:
        await self._drop()
        conn = self._conn
        async with asyncio.timeout(self.timeout):  # the handshake's replies too
            await conn.connect()
        parser = conn._parser
        reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=parser.parse_error,
            notEnoughData=_NOT_ENOUGH,
        )
        proto = _Replies(reader)
        stream = conn._reader  # what redis-py read past the handshake (nothing, normally)
        buffered = bytes(getattr(stream, "_buffer", b"")) if stream is not None else b""
        transport = conn._writer.transport
        transport.set_protocol(proto)
        self._proto, self._transport = proto, transport
        if buffered:
            proto.data_received(buffered)

    async def read(self, n: int, *, timeout: float | None = None) -> list[Any]:
        """The next `n` replies (one timeout for all of them: `timeout`, or the default)."""
        proto = self._proto
        if proto is not None and len(proto.replies) >= n:  # already here: no waiting
            replies = proto.replies
            return [replies.popleft() for _ in range(n)]
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("RawConnection.read() must run in a task")
        loop = task.get_loop()
        self._read_by = loop.time() + (self.timeout if timeout is None else timeout)
        self._reading = task
        self._expired = False
        cancelling = task.cancelling()
        if self._watchdog is None:
            self._watchdog = loop.call_later(_WATCH_EVERY, self._watch)
        try:
            if proto is None:
                raise RedisConnectionError("not connected")
            while len(proto.replies) < n:
                if proto.lost is not None:
                    raise proto.lost_error()
                proto.wanted = n
                proto.waiter = waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    proto.waiter = None
        except BaseException as exc:
            timed_out = (
                self._expired
                and isinstance(exc, asyncio.CancelledError)
                and task.uncancel() <= cancelling
            )
            self._reading = None
            await self._drop()
            if timed_out:
                self.failed_at = time.monotonic()
                raise RedisTimeoutError("timeout reading from redis") from None
            self._failed(exc)
            raise
        finally:
            self._reading = None
        replies = proto.replies
        return [replies.popleft() for _ in range(n)]

    async def execute_refusable(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """`execute`; if it fails with Redis down, `WriteRefused` when Redis still answers
        a PING (`write_failure`), else that failure."""
        try:
            return await self.execute(commands)
        except REDIS_DOWN_ERRORS as exc:
            failure = exc
        raise await self.write_failure(failure)

    async def write_failure(self, exc: Exception) -> Exception:
        """What a write that failed with `exc` tells: `WriteRefused` when Redis answers a
        PING here (reconnecting: the write's connection was dropped), so it refused that
        write rather than being down; `exc` itself when it does not."""
        try:
            (pong,) = await self.execute([("PING",)])
        except Exception:  # any: down, slow, or refusing the connection
            return exc
        return exc if isinstance(pong, Exception) else WriteRefused(exc)

    def _watch(self) -> None:
        """Cancel a read whose replies are overdue, as `asyncio.timeout` would.

        One coarse timer per connection instead of a timer per read: arming and
        disarming a timer for every read cost more than the rest of the read.
        """
        self._watchdog = None
        task = self._reading
        if task is None:
            return  # idle: the next read starts the watchdog again
        loop = task.get_loop()
        if not self._expired and loop.time() > self._read_by:
            self._expired = True
            task.cancel()
        self._watchdog = loop.call_later(_WATCH_EVERY, self._watch)

    async def discard(self) -> None:
        """Drop the connection with any replies still due on it (a caller that stops
        reading midway); the next write makes a new one."""
        await self._drop()

    def _failed(self, exc: BaseException) -> None:
        """Note `exc`, raised by a read or a write, in `failed_at` if it is Redis failing
        (not a close in order, which `_drop` notes, nor a cancellation or a bug)."""
        if isinstance(exc, REDIS_DOWN_OR_REFUSING) and not isinstance(exc, RedisClosedConnection):
            self.failed_at = time.monotonic()

    async def _drop(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.lost is not None:
            if isinstance(proto.lost, RedisClosedConnection):
                self.found_closed_at = time.monotonic()
            else:
                self.failed_at = time.monotonic()
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()  # unread replies are not worth a graceful close
        with contextlib.suppress(Exception):
            await self._conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        await self._drop()


def pack_commands(commands: Sequence[Sequence[Any]]) -> bytes:
    """RESP for `commands` (str, bytes, int or float arguments), in one buffer.

    What redis-py's `Connection.pack_commands` produces for these types, at a
    fraction of its cost (it is on every hot-path write): hiredis's packer in C,
    half the cost of `_pack_in_python` (measured 2026-11-21: 5.8 against 11.4 µs
    for a worker's reply batch); that one takes what hiredis refuses (bytearray,
    and raises for bools and other types).
    """
    try:
        return b"".join([_hiredis_pack(tuple(command)) for command in commands])
    except TypeError:
        return _pack_in_python(commands)


def _pack_in_python(commands: Sequence[Sequence[Any]]) -> bytes:
    out: list[bytes] = []
    append = out.append
    for command in commands:
        append(b"*%d\r\n" % len(command))
        for arg in command:
            kind = type(arg)
            if kind is bytes:
                data = arg
            elif kind is str:
                data = arg.encode()
            elif kind is int:
                data = b"%d" % arg
            else:
                data = _encode_other(arg)
            append(b"$%d\r\n" % len(data))
            append(data)
            append(b"\r\n")
    return b"".join(out)


def _encode_other(arg: Any) -> bytes:
    if isinstance(arg, bool):
        raise TypeError("cannot send a bool to redis")
    if isinstance(arg, (bytes, bytearray, memoryview)):
        return bytes(arg)
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    raise TypeError(f"cannot send {type(arg).__name__} to redis")
