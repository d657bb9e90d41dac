"""A service whose handlers fail in every awkward way a handler can, for the worker's
fault tests: `python -m tests.support.faulty_service` (name from FAULTY_NAME).

`*_inline` handlers have no `await`, so the worker runs them in its read loop; the
others suspend once first, so they run in a task of their own; `*_sync` ones run in
the thread pool.
"""

from __future__ import annotations

import asyncio
import os

from common import Service
from common.errors import BadRequest, InvalidParams


class BadStr(Exception):
    """An exception whose message cannot even be read."""

    def __str__(self) -> str:
        raise RuntimeError("str failed")


class Weird(BaseException):
    """A `BaseException` that is neither an `Exception` nor one of Python's own."""


def _unencodable_details() -> InvalidParams:
    return InvalidParams("bad", details=[{"cause": ValueError("x")}])


def _bad_retry_after() -> BadRequest:
    error = BadRequest("slow down")
    error.retry_after = object()  # type: ignore[assignment]
    return error


def build(name: str = "faulty") -> Service:
    svc = Service(name)

    @svc.method
    async def ok(x: int = 1) -> int:
        await asyncio.sleep(0)
        return x

    @svc.method
    async def ok_inline(x: int = 1) -> int:
        return x

    @svc.method
    async def system_exit() -> None:
        await asyncio.sleep(0)
        raise SystemExit(3)

    @svc.method
    async def system_exit_inline() -> None:
        raise SystemExit(3)

    @svc.method
    def system_exit_sync() -> None:
        raise SystemExit(3)

    @svc.method
    async def keyboard_interrupt() -> None:
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    @svc.method
    def keyboard_interrupt_sync() -> None:
        raise KeyboardInterrupt

    @svc.method
    async def generator_exit() -> None:
        await asyncio.sleep(0)
        raise GeneratorExit

    @svc.method
    async def weird() -> None:
        await asyncio.sleep(0)
        raise Weird("weird")

    @svc.method
    async def weird_inline() -> None:
        raise Weird("weird")

    @svc.method
    async def cancelled_by_itself() -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future  # a CancelledError, though nothing cancelled this call

    @svc.method
    async def bad_str() -> None:
        await asyncio.sleep(0)
        raise BadStr

    @svc.method
    async def bad_str_inline() -> None:
        raise BadStr

    @svc.method
    def bad_str_sync() -> None:
        raise BadStr

    @svc.method
    async def bad_details() -> None:
        await asyncio.sleep(0)
        raise _unencodable_details()

    @svc.method
    async def bad_details_inline() -> None:
        raise _unencodable_details()

    @svc.method
    async def bad_retry_after() -> None:
        await asyncio.sleep(0)
        raise _bad_retry_after()

    @svc.method
    async def surrogate_message() -> None:
        await asyncio.sleep(0)
        raise ValueError("half a pair: \ud800")

    @svc.method
    async def huge_message(size: int) -> None:
        await asyncio.sleep(0)
        raise ValueError("x" * size)

    @svc.method
    async def fail() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    @svc.method
    async def fail_inline() -> None:
        raise RuntimeError("boom")

    @svc.method
    async def record(key: str) -> None:
        await svc.redis.rpush(key, "ran")

    @svc.method
    async def die() -> None:
        await asyncio.sleep(0)
        os._exit(9)

    return svc


if __name__ == "__main__":
    build(os.environ.get("FAULTY_NAME", "faulty")).run()
