"""A service also served over asyncredisrpc: `python -m tests.support.compat_service`.

Name from COMPAT_NAME, asyncredisrpc queue from COMPAT_QUEUE, adapter
concurrency from COMPAT_CONCURRENCY.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid
from decimal import Decimal

from common import Service
from common.compat import serve_asyncredisrpc
from common.errors import NotFound


def build(name: str = "compat") -> Service:
    svc = Service(name)
    running = 0
    peak = 0
    started = 0

    @svc.method
    async def add(a: int, b: int = 1) -> int:
        return a + b

    @svc.method
    def multiply(a: float, b: float) -> float:
        time.sleep(0.01)  # a sync handler: runs in a thread
        return a * b

    @svc.method
    async def profile(user: str, *, verbose: bool = False) -> dict[str, object]:
        return {
            "user": user,
            "verbose": verbose,
            "since": dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC),
            "id": uuid.UUID(int=7),
            "balance": Decimal("12.50"),
            "tags": ["a", "é"],
        }

    @svc.method
    async def fail(message: str = "boom") -> None:
        raise ValueError(message)

    @svc.method
    async def missing(key: str) -> None:
        raise NotFound(f"no such thing: {key}")

    @svc.method
    async def unencodable() -> object:
        return object()

    @svc.method
    async def slow(n: int, seconds: float = 0.05) -> int:
        nonlocal running, peak, started
        started += 1
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(seconds)
        finally:
            running -= 1
        return n

    @svc.method
    async def slow_stats() -> dict[str, int]:
        return {"started": started, "peak": peak}

    return svc


if __name__ == "__main__":
    service = build(os.environ.get("COMPAT_NAME", "compat"))
    serve_asyncredisrpc(
        service,
        os.environ.get("COMPAT_QUEUE") or None,
        concurrency=int(os.environ.get("COMPAT_CONCURRENCY", "64")),
    )
    service.run()
