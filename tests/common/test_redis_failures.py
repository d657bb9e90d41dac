"""`common.redis_failures.redis_failure`: the kind of each Redis failure, in the forms
Redis 6 and 7 and redis-py give it (the servers' own are met in
test_rpc_redis_refusals.py), and no kind for an error that is a bug or bad data."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.redis_failures import redis_failure, redis_failure_message

_parse = Connection(host="127.0.0.1", port=1)._parser.parse_error

_REPLIES = [
    ("OOM command not allowed when used memory > 'maxmemory'.", "out_of_memory"),
    ("OOM command not allowed when used memory > 'maxmemory'. script: f_1, on @user_script:18.",
     "out_of_memory"),  # Redis 7, inside a script
    ("ERR Error running script (call to f_9e): @user_script:18: @user_script: 18: "
     "-OOM command not allowed when used memory > 'maxmemory'.", "out_of_memory"),  # Redis 6
    ("READONLY You can't write against a read only replica.", "read_only"),
    ("ERR Error running script (call to f_9e): @user_script:18: @user_script: 18: "
     "-READONLY You can't write against a read only replica.", "read_only"),
    ("MISCONF Redis is configured to save RDB snapshots, but it is currently not able "
     "to persist on disk.", "persistence_failed"),
    ("LOADING Redis is loading the dataset in memory", "loading"),
    ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
     "busy"),
    ("NOAUTH Authentication required.", "auth"),
    ("WRONGPASS invalid username-password pair or user is disabled.", "auth"),
    # A transaction's EXEC refused (the worker's reply writes: `common.replies`).
    ("EXECABORT Transaction discarded because of: OOM command not allowed when used "
     "memory > 'maxmemory'.", "out_of_memory"),
    ("EXECABORT Transaction discarded because of: READONLY You can't write against a "
     "read only replica.", "read_only"),
    ("EXECABORT Transaction discarded because of previous errors.", None),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", None),
    ("ERR Error running script (call to f_9e): @user_script:3: user_script:3: "
     "Script attempted to access nonexistent global variable 'x'", None),
    ("BUSYKEY Target key name already exists.", None),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "kind"), _REPLIES)
def test_the_kind_of_an_error_reply(reply: str, kind: str | None) -> None:
    assert redis_failure(_parse(reply)) == kind


def test_the_kind_of_an_error_reply_in_a_pipeline() -> None:
    """redis-py's pipeline prefixes the command to the reply (a known class it keeps)."""
    busy = ResponseError("Command # 1 (HEXISTS sb:catalog x) of pipeline caused error: "
                         "('BUSY Redis is busy running a script. You can only call SCRIPT "
                         "KILL or SHUTDOWN NOSAVE.',)")  # fmt: skip
    assert redis_failure(busy) == "busy"
    wrong = ResponseError("Command # 1 (HGET k f) of pipeline caused error: ('WRONGTYPE "
                          "Operation against a key holding the wrong kind of value',)")  # fmt: skip
    assert redis_failure(wrong) is None


def test_the_kind_of_redis_out_of_reach() -> None:
    assert redis_failure(RedisConnectionError("Error 111 connecting to 10.0.0.1:6379")) == (
        "unreachable"
    )
    assert redis_failure(ConnectionResetError()) == "unreachable"
    assert redis_failure(RedisTimeoutError("Timeout reading from socket")) == "timeout"
    assert redis_failure(TimeoutError()) == "timeout"
    assert redis_failure(ValueError("not redis")) is None


def test_messages_name_the_kind_never_the_text() -> None:
    refused = _parse("OOM command not allowed when used memory > 'maxmemory'.")
    assert redis_failure_message(refused) == "redis refused the write: out of memory"
    down = RedisConnectionError("Error 111 connecting to 10.0.0.1:6379")
    assert redis_failure_message(down) == "redis unreachable"
