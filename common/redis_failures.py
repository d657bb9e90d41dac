"""What kind of Redis failure an error is: Redis down, or Redis up and refusing.

Both are a Redis-side failure that no request of a caller's fixes, so both are
answered the same way: a 503 (`redis_unavailable`, or `service_unavailable` for an
RPC call), retried by every background loop; but the message, the health answer
and the log line say which it is, so an operator is not sent looking for a network
problem when Redis is full or the password is wrong. The kinds (`redis_failure`):

```
unreachable          no connection (refused, reset, closed)
timeout              no answer in time
auth                 the credentials were refused: a wrong or missing password
                     (WRONGPASS, NOAUTH); retried, as a rotated password can come right
out_of_memory        -OOM: maxmemory reached with the noeviction policy; writes refused
read_only            -READONLY: a replica (say, after a failover); writes refused
persistence_failed   -MISCONF: Redis cannot save to disk; writes refused
loading              -LOADING: Redis is loading its data set
busy                 -BUSY: a script has run past Redis's script time limit
```

Any other error reply (`WRONGTYPE`, a script's own error) is no kind: a bug or bad
data, left to surface as such. Only the kind and its message (`redis_failure_message`)
are ever shown to a client: redis-py's text names Redis's address.
"""

from __future__ import annotations

import re

from redis.asyncio import Redis
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import constants
from common.connection import REDIS_DOWN_OR_REFUSING
from common.errors import ServiceUnavailable

# (REDIS_DOWN_OR_REFUSING is the connection's: every failure it notes is of these kinds.)
__all__ = ["REDIS_DOWN_OR_REFUSING", "REFUSALS", "check_writable", "is_refusal", "redis_failure",
           "redis_failure_message", "store_unavailable"]  # fmt: skip

_MESSAGES = {
    "unreachable": "redis unreachable",
    "timeout": "redis unreachable",
    "auth": "redis refused the credentials",
    "out_of_memory": "redis refused the write: out of memory",
    "read_only": "redis refused the write: read-only replica",
    "persistence_failed": "redis refused the write: it cannot save to disk",
    "loading": "redis is loading its data",
    "busy": "redis is busy running a script",
}
# Kinds that are Redis answering "no", not Redis out of reach.
REFUSALS = frozenset(_MESSAGES) - {"unreachable", "timeout"}
# REDIS_DOWN_OR_REFUSING (imported from `common.connection`, whose connections note
# these failures): what a Redis call raises when Redis is down, slow or refusing; and
# for any other error reply too: `redis_failure` tells them apart.

# The error code of a refusal, at the start of an error reply, where Redis 6 quotes
# it inside a script's error ("Error running script ...: @user_script: 18: -OOM ..."),
# where redis-py's pipeline quotes it ("Command # 1 (...) of pipeline caused
# error: ('BUSY ...',)"), or where Redis quotes why it refused a transaction's EXEC
# ("EXECABORT Transaction discarded because of: OOM ...": the code redis-py strips).
_REFUSAL_CODES = {
    "OOM": "out_of_memory",
    "READONLY": "read_only",
    "MISCONF": "persistence_failed",
    "LOADING": "loading",
    "BUSY": "busy",
    "NOAUTH": "auth",
    "WRONGPASS": "auth",
}
_CODE = re.compile(
    r"(?:^|: -|: \('|discarded because of: )(OOM|READONLY|MISCONF|LOADING|BUSY|NOAUTH|WRONGPASS) "
)

# redis-py's classes for the codes it knows (it strips the code from their text).
_REFUSAL_CLASSES: tuple[tuple[type[Exception], str], ...] = (
    (AuthenticationError, "auth"),
    (OutOfMemoryError, "out_of_memory"),
    (ReadOnlyError, "read_only"),
    (BusyLoadingError, "loading"),
)


def redis_failure(exc: BaseException) -> str | None:
    """The kind of Redis failure `exc` is (see the module's docstring), or None when it
    is none (a bug, bad data: an error reply of another kind, or not a Redis error)."""
    for cls, kind in _REFUSAL_CLASSES:  # before ConnectionError: some subclass it
        if isinstance(exc, cls):
            return kind
    if isinstance(exc, ResponseError):
        found = _CODE.search(str(exc))
        return None if found is None else _REFUSAL_CODES[found.group(1)]
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "unreachable"
    return None


def is_refusal(exc: BaseException) -> bool:
    """Whether `exc` is Redis up but refusing for now (`REFUSALS`: out of memory, a
    read-only replica, ...): the same write is to be made again later."""
    return redis_failure(exc) in REFUSALS


def redis_failure_message(exc: BaseException, kind: str | None = None) -> str:
    """What a caller is told of the Redis failure `exc` (of `kind`, if known already):
    "redis unreachable", "redis refused the write: out of memory"... Never redis-py's
    text, which names Redis's address."""
    return _MESSAGES.get(kind or redis_failure(exc) or "unreachable", "redis unreachable")


def store_unavailable(exc: BaseException) -> ServiceUnavailable:
    """The answer to a credential that cannot be checked while Redis cannot be read
    (`exc`): a 503 naming the kind of failure, never redis-py's text (it names Redis's
    address: raise it `from exc`, the cause is for the log)."""
    return ServiceUnavailable(f"credential store unavailable: {redis_failure_message(exc)}")


async def check_writable(redis: Redis) -> None:
    """Raise what a write to Redis would raise now (nothing if Redis takes writes).

    A `SET ... XX` of a key that never exists: Redis vets it as any write (memory,
    replica, disk, credentials), then writes nothing, so nothing reaches the AOF or
    the replicas. A PING would answer "PONG" from a Redis refusing every write.
    """
    await redis.set(constants.WRITE_PROBE, b"", xx=True)
