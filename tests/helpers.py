"""Test helpers: real processes on 127.0.0.1, and polling with a deadline (never bare sleeps)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import redis
import redis.asyncio as aioredis

from common import tokens
from common.apikeys import new_key, record_key, user_keys_key
from common.embedded_redis import free_port
from common.errors import Unauthorized

if TYPE_CHECKING:
    from common.credentials import Authenticator
    from common.service import Service

ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "ROOT",
    "Clock",
    "ServiceProcess",
    "db_url",
    "free_port",
    "fresh_db",
    "issue_api_key",
    "serve_in_task",
    "wait_for",
    "wait_for_async",
]


def db_url(redis_url: str, db: int) -> str:
    """The same server, another database: a test module's private keyspace."""
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


@contextlib.asynccontextmanager
async def fresh_db(url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the database of `url`, flushed before and after use."""
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


class Clock:
    """The wall clock, moved forward on demand (`offset`), for expiry and retirement."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def issue_api_key(
    redis_url: str, scopes: Sequence[str], *, user_id: str = "test-admin", name: str = "tests"
) -> str:
    """An API key with `scopes`, stored as the auth service stores one (shown once: here)."""
    text, record = new_key(user_id, name, scopes)
    client = redis.Redis.from_url(redis_url)
    try:
        with client.pipeline(transaction=True) as pipe:
            pipe.hset(record_key(record.key_id), mapping=record.to_fields())  # type: ignore[arg-type]
            pipe.sadd(user_keys_key(record.user_id), record.key_id)
            pipe.execute()
    finally:
        client.close()
    return text


def issue_user_token(url: str, subject: str, name: str) -> str:
    """A bearer JWT (scopes `*`, 10 minutes) signed with the current key of the keyring
    in Redis at `url`, as the auth service would issue it."""

    async def issue() -> str:
        client = aioredis.Redis.from_url(url)
        try:
            key = await tokens.Keyring(client).current()
        finally:
            await client.aclose()
        return tokens.issue(key, subject=subject, name=name, roles=["user"], scopes=["*"],
                            session_id=uuid.uuid4().hex, ttl=600)  # fmt: skip

    return asyncio.run(issue())


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last error: {last_exc!r})")


async def serve_in_task(svc: Service, url: str) -> asyncio.Task[None]:
    """Run `svc` in a task and return once its worker's three loops are running."""
    task = asyncio.create_task(svc.serve(url))
    await wait_for_async(lambda: svc.worker is not None and len(svc.worker._tasks) == 3)
    return task


async def serve_until_live(svc: Service, url: str) -> asyncio.Task[None]:
    """Run `svc` in a task and return once its instance holds a heartbeat lease (live)."""
    task = asyncio.create_task(svc.serve(url))
    probe = aioredis.Redis.from_url(url)
    try:
        await wait_for_async(lambda: probe.zcard(f"sb:{{{svc.name}}}:instances"))
    finally:
        await probe.aclose()
    return task


async def wait_for_async(
    predicate: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Async twin of `wait_for`: `predicate` may return an awaitable (awaited) or a value."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        except Exception as exc:
            last_exc = exc
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last error: {last_exc!r})")


class ServiceProcess:
    """A real service process (e.g. `python -m webapi`) with the repo root on PYTHONPATH.

    Output goes to a log file whose tail is shown when a test needs it.
    """

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        name: str | None = None,
    ) -> None:
        self.args = [sys.executable if a == "python" else a for a in args]
        self.name = name or "-".join(a for a in args[1:3] if not a.startswith("-"))
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p
        )
        full_env.update(env or {})
        self.env = full_env
        log_dir = log_dir or Path(os.environ.get("TEST_LOG_DIR", "/tmp/switchboard-test-logs"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name.replace('/', '_')}-{os.getpid()}-{id(self)}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_records(self, msg: str) -> list[dict[str, Any]]:
        """The process's JSON log lines whose message is `msg`, oldest first."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f'"msg": {json.dumps(msg)}' in line:
                records.append(json.loads(line))
        return records

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process and wait for it; SIGKILL its group if it does not exit."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def pid_listening_on(port: int) -> int:
    """The pid of this test run's child process listening on TCP `port`."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            for conn in child.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    return int(child.pid)
    raise LookupError(f"no child process listens on port {port}")


@contextlib.contextmanager
def peak_rss_growth(process: psutil.Process, interval: float = 0.02) -> Iterator[list[int]]:
    """While the block runs, how far `process`'s resident memory rose above where it
    was at the start (bytes, sampled every `interval`): read `[0]` after the block."""
    start = process.memory_info().rss
    growth = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            with contextlib.suppress(psutil.Error):
                growth[0] = max(growth[0], process.memory_info().rss - start)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield growth
    finally:
        done.set()
        sampler.join()


async def eventually_refused(auth: Authenticator, credential: str, message: str) -> None:
    """Poll until `auth` refuses `credential` with `message` (revocations travel by pub/sub)."""

    async def refused() -> bool:
        try:
            await auth.authenticate(credential)
        except Unauthorized as exc:
            return exc.message == message
        return False

    await wait_for_async(refused, timeout=10)


def forged_admin_jwt() -> str:
    """An unsigned (`alg: none`) JWT claiming every scope and the admin role."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {"sub": "root", "roles": ["admin", "user"], "scope": "* admin",
              "exp": 4102444800, "iss": "switchboard", "aud": "switchboard"}  # fmt: skip
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


# Forwarding fields a client may write to tell a backend where it came from or how it
# arrived (`common.forwarding`): the gateway and the relay drop each, or replace it.
SPOOFED_FORWARDING = [
    ("Forwarded", "for=6.6.6.6;host=evil.example;proto=https"),
    ("X-Real-IP", "6.6.6.6"),
    ("X-Client-IP", "6.6.6.6"),
    ("True-Client-IP", "6.6.6.6"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Forwarded-Server", "evil.example"),
    ("x-forwarded-ssl", "on"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-For", "6.6.6.6"),
]
# The names of those that are dropped (the others are set by the front door itself).
DROPPED_FORWARDING = frozenset({"forwarded", "x-real-ip", "x-client-ip", "true-client-ip",
                                "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server",
                                "x-forwarded-ssl"})  # fmt: skip


@contextlib.asynccontextmanager
async def tcp_instance(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 whose connections `handle` serves (an instance that
    misbehaves as a test needs); its address, "host:port"."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
