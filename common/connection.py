"""Redis connections, configured once for every Switchboard process.

`connect()` is the only place a Redis client is built: AUTH and TLS come from
the URL (`redis://user:pass@host`, `rediss://`), commands are retried with
jittered backoff across short blips, and dead connections are detected by
keepalive and periodic health checks instead of hanging a caller.
`RawConnection` is the hot paths' bare connection, built from such a client's
own settings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from hiredis import pack_command as _hiredis_pack
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# How often a `RawConnection` checks whether the read in progress is overdue.
_WATCH_EVERY = 0.25

# Errors that mean "Redis is not reachable right now" as opposed to "Redis said no".
REDIS_DOWN_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
# The same, plus an `asyncio.timeout()` around a Redis call expiring.
REDIS_DOWN_OR_SLOW: tuple[type[Exception], ...] = (TimeoutError, *REDIS_DOWN_ERRORS)


def connect(
    url: str,
    *,
    name: str | None = None,
    max_connections: int = 64,
    socket_timeout: float | None = 10.0,
    pool_timeout: float = 10.0,
) -> aioredis.Redis:
    """An asyncio Redis client for `url` (bytes in, bytes out).

    The pool blocks (up to `pool_timeout`) when all `max_connections` are busy
    instead of failing, so a burst of concurrent calls queues for a connection.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        client_name=name,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return aioredis.Redis(connection_pool=pool)


def as_text(value: bytes | str | int) -> str:
    """A Redis reply item as `str` (clients here return bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RawConnection:
    """One dedicated Redis connection for a hot loop: commands pipelined by hand.

    redis-py's command machinery (pool checkout, per-command response callbacks,
    a pipeline object per batch, a task per timed send) costs far more than the
    round trip on the RPC hot path, so the client's enqueue writer and inbox
    reader and the worker's read/flush loop each own one of these instead: a
    bare redis-py `Connection` built from the client's own pool settings (so
    AUTH, TLS, db and client name come from the same URL), written with
    `pack_commands` below and read with the hiredis parser. Replies are raw RESP
    values (bytes, ints, lists), an error reply is returned as its
    `ResponseError` (e.g. `NoScriptError`) in its slot. A read that outlives its
    timeout raises redis-py's `TimeoutError`; the timeout is enforced by one
    coarse watchdog per connection (`_watch`), not a timer per read. A
    connection error, a timeout or a cancellation mid-read drops the socket (it
    may hold unread replies); the next write reconnects.
    """

    def __init__(self, redis: aioredis.Redis, *, timeout: float = 10.0) -> None:
        pool = redis.connection_pool
        # Our own timeout covers each batch of replies, so the connection itself
        # gets none: redis-py would otherwise wrap each send in `wait_for` (a
        # task per send on 3.11) and each read in a timer.
        kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self._conn: Any = pool.connection_class(**kwargs)
        self.timeout = timeout
        self.pending = 0  # replies sent for and not read yet
        # The read in progress: its task, when its replies are due (loop time),
        # whether the watchdog cancelled it.
        self._reading: asyncio.Task[Any] | None = None
        self._read_by = 0.0
        self._expired = False
        self._watchdog: asyncio.TimerHandle | None = None

    async def execute(
        self, commands: Sequence[Sequence[Any]], *, timeout: float | None = None
    ) -> list[Any]:
        """Send `commands` in one write and return their replies in order."""
        await self.send(commands)
        return await self.read(len(commands), timeout=timeout)

    async def send(self, commands: Sequence[Sequence[Any]]) -> None:
        """Write `commands` without waiting for their replies (see `read`)."""
        await self.send_packed(pack_commands(commands), len(commands))

    async def send_packed(self, data: bytes, n: int) -> None:
        """Write `n` commands already packed by `pack_commands`."""
        conn = self._conn
        try:
            if not conn.is_connected:
                async with asyncio.timeout(self.timeout):  # the handshake's replies too
                    await conn.connect()
            # No timer on the write itself: it only waits when the socket's send
            # buffer is full, and the replies' read that follows has one.
            await conn.send_packed_command(data, check_health=False)
        except BaseException as exc:
            await self._drop()
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError("timeout connecting to redis") from exc
            raise
        self.pending += n

    async def read(self, n: int, *, timeout: float | None = None) -> list[Any]:
        """The next `n` replies (one timeout for all of them: `timeout`, or the default)."""
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
        conn = self._conn
        out: list[Any] = []
        try:
            for _ in range(n):
                try:
                    out.append(await conn.read_response(disconnect_on_error=False))
                except ResponseError as exc:
                    out.append(exc)
                self.pending -= 1
        except BaseException as exc:
            timed_out = (
                self._expired
                and isinstance(exc, asyncio.CancelledError)
                and task.uncancel() <= cancelling
            )
            self._reading = None
            await self._drop()
            if timed_out:
                raise RedisTimeoutError("timeout reading from redis") from None
            raise
        finally:
            self._reading = None
        return out

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

    async def _drop(self) -> None:
        self.pending = 0
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
