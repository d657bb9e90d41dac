"""Redis connections, configured once for every Switchboard process.

`connect()` is the only place a Redis client is built: AUTH and TLS come from
the URL (`redis://user:pass@host`, `rediss://`), commands are retried with
jittered backoff across short blips, and dead connections are detected by
keepalive and periodic health checks instead of hanging a caller.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
