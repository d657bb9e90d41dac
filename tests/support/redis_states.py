"""Putting a real redis-server into the states in which it is up but refuses commands
(`common.redis_failures`), and taking it out again: for a private server of a test.

Each is a context manager on an admin connection (`redis.Redis`, which stays
authenticated and is spared by `auth`'s client kill); the state holds inside it.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
import redis

from common.embedded_redis import EmbeddedRedis
from tests.helpers import free_port, wait_for

# What a client is told of each (`common.redis_failures.redis_failure_message`).
MESSAGES = {
    "out_of_memory": "redis refused the write: out of memory",
    "read_only": "redis refused the write: read-only replica",
    "persistence_failed": "redis refused the write: it cannot save to disk",
    "busy": "redis is busy running a script",
    "auth": "redis refused the credentials",
}


@contextmanager
def out_of_memory(admin: redis.Redis) -> Iterator[None]:
    """maxmemory reached with noeviction: every write is `-OOM`."""
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    try:
        yield
    finally:
        admin.config_set("maxmemory", "0")


@contextmanager
def read_only(admin: redis.Redis) -> Iterator[None]:
    """A replica (of a master nobody runs): every write is `-READONLY`."""
    admin.replicaof("127.0.0.1", str(free_port()))
    try:
        yield
    finally:
        admin.replicaof("NO", "ONE")


@contextmanager
def persistence_failed(admin: redis.Redis) -> Iterator[None]:
    """An RDB save that failed (its directory removed under Redis): `-MISCONF`."""
    before = admin.config_get("dir")["dir"]
    with tempfile.TemporaryDirectory() as gone:
        admin.config_set("dir", gone)
    admin.config_set("save", "3600 1")
    admin.config_set("stop-writes-on-bgsave-error", "yes")
    admin.bgsave()
    wait_for(lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "err")
    try:
        yield
    finally:
        admin.config_set("save", "")  # no save points: the failed save refuses nothing
        admin.config_set("dir", before)


@contextmanager
def busy(admin: redis.Redis) -> Iterator[None]:
    """A script running past the script time limit: every other command is `-BUSY`."""
    admin.config_set("lua-time-limit", "10")
    kwargs = admin.connection_pool.connection_kwargs
    runner = redis.Redis(host=kwargs["host"], port=kwargs["port"])
    thread = threading.Thread(target=_run_forever, args=(runner,), daemon=True)
    thread.start()
    probe = redis.Redis(host=kwargs["host"], port=kwargs["port"])
    wait_for(lambda: _busy(probe))
    try:
        yield
    finally:
        probe.script_kill()
        thread.join(10)
        runner.close()
        probe.close()
        # Until it is restored, any client's script running past 10 ms (a loaded box)
        # makes Redis answer BUSY for that moment: this command included.
        wait_for(lambda: admin.config_set("lua-time-limit", "5000"))


@contextmanager
def auth(admin: redis.Redis, password: str = "s3cret-rotated") -> Iterator[None]:
    """A password set, and every client but `admin` disconnected: they come back without
    it (`-NOAUTH`, or redis-py's HELLO error)."""
    admin.config_set("requirepass", password)
    admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    try:
        yield
    finally:
        admin.config_set("requirepass", "")


@contextmanager
def small_values(admin: redis.Redis) -> Iterator[None]:
    """Redis's limit on one value (`proto-max-bulk-len`, 512 MB by default) at its
    smallest, 1 MB: a command holding a longer value gets its connection dropped."""
    before = admin.config_get("proto-max-bulk-len")["proto-max-bulk-len"]
    admin.config_set("proto-max-bulk-len", "1mb")
    try:
        yield
    finally:
        admin.config_set("proto-max-bulk-len", before)


# Every state by its kind, for tests parametrized over them.
STATES: dict[str, Callable[[redis.Redis], AbstractContextManager[None]]] = {
    "out_of_memory": out_of_memory,
    "read_only": read_only,
    "persistence_failed": persistence_failed,
    "busy": busy,
    "auth": auth,
}


def _run_forever(runner: redis.Redis) -> None:
    with contextlib.suppress(redis.ResponseError):  # "Script killed by user with SCRIPT KILL"
        runner.eval("while true do end", 0)


def _busy(probe: redis.Redis) -> bool:
    try:
        probe.ping()
    except redis.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False


@pytest.fixture(name="private_redis", scope="module")
def private_redis_fixture() -> Iterator[EmbeddedRedis]:
    """A redis-server of the test module's own: it is made to refuse writes."""
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="admin")
def admin_fixture(private_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client of `private_redis`, to put it into a state and back out."""
    client = redis.Redis(port=private_redis.port)
    try:
        yield client
    finally:
        client.close()
