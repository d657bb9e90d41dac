"""A small service for tests: `python -m tests.support.calc_service` (name from CALC_NAME),
or a process of it started by `start_worker`."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal

from common import Service
from common.errors import InvalidParams, NotFound
from common.log import request_id_var
from tests.helpers import ServiceProcess


@dataclass
class Point:
    x: int
    y: int


def build(name: str = "calc", concurrency: int | None = None) -> Service:
    svc = Service(name, concurrency=concurrency)
    runs: dict[str, int] = {}

    @svc.method
    async def add(a: int, b: int = 1) -> int:
        return a + b

    @svc.method
    async def sleep(seconds: float) -> float:
        await asyncio.sleep(seconds)
        runs["sleep"] = runs.get("sleep", 0) + 1
        return seconds

    @svc.method
    def blocking(seconds: float) -> str:
        time.sleep(seconds)
        return threading.current_thread().name

    @svc.method
    async def fail(message: str = "boom") -> None:
        raise ValueError(message)

    @svc.method
    async def refuse(value: float) -> None:
        """Refuses `value` with it in the error's details (NaN stays NaN there)."""
        raise InvalidParams("refused", details=[{"loc": ["value"], "input": value}])

    @svc.method
    async def missing(key: str) -> None:
        raise NotFound(f"no such thing: {key}")

    @svc.method
    async def whoami() -> dict[str, str | None]:
        return {"request_id": request_id_var.get(), "instance": svc.instance_id}

    @svc.method
    async def echo(
        when: dt.datetime,
        day: dt.date,
        ident: uuid.UUID,
        amount: Decimal,
        blob: bytes,
        point: Point,
    ) -> dict[str, object]:
        return {
            "when": when,
            "day": day,
            "ident": ident,
            "amount": amount,
            "blob": blob,
            "point": point,
        }

    @svc.method
    async def record(key: str, value: str) -> None:
        await svc.redis.rpush(key, value)

    @svc.method
    async def run_count(method: str) -> int:
        return runs.get(method, 0)

    @svc.method
    async def work(x: int, ms: float = 5.0) -> int:
        """A short handler for load tests: waits `ms` and answers `x`."""
        await asyncio.sleep(ms / 1000)
        return x

    @svc.method
    async def flaky(key: str, fail_times: int) -> int:
        """Fails its first `fail_times` runs (counted in Redis), then succeeds."""
        runs_so_far = int(await svc.redis.incr(f"{key}:runs"))
        if runs_so_far <= fail_times:
            raise RuntimeError(f"failure {runs_so_far} of {fail_times}")
        await svc.redis.rpush(key, str(runs_so_far))
        return runs_so_far

    @svc.method
    async def opaque() -> dict[bytes, int]:
        """A map with a bytes key: msgpack carries it, JSON cannot hold it."""
        return {b"key": 1}

    @svc.method
    async def blob(utf8: bool = False) -> bytes:
        """Bytes: UTF-8 text, or not (a PNG's first bytes)."""
        return "café".encode() if utf8 else b"\x89PNG\r\n\x1a\n\x00\xff"

    @svc.method
    async def text(size: int) -> str:
        """A result of `size` characters (bytes encoded, give or take the envelope)."""
        return "x" * size

    @svc.method
    def gate(path: str, fail: bool = False) -> str:
        """Waits until a file exists at `path` (a test makes it: the handler ends when the
        test says, not after some time), then answers its text, or raises it (`fail`)."""
        while not os.path.exists(path):
            time.sleep(0.01)
        with open(path) as file:
            text = file.read()
        if fail:
            raise RuntimeError(text)
        return text

    @svc.method
    async def stats() -> dict[str, object]:
        assert svc.worker is not None
        return svc.worker.snapshot()

    return svc


def start_worker(redis_url: str, name: str = "calc", **env: str) -> ServiceProcess:
    """A worker process of `build(name)` on `redis_url`, started (not yet live: wait for
    it); `env`: more of its environment. Its log is named after `name`."""
    full_env = {"REDIS_URL": redis_url, "CALC_NAME": name, **env}
    return ServiceProcess(
        ["python", "-m", "tests.support.calc_service"], env=full_env, name=name
    ).start()


if __name__ == "__main__":
    build(os.environ.get("CALC_NAME", "calc")).run()
