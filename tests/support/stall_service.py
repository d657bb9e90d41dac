"""A service whose handler may block its event loop, for the lease tests:
`python -m tests.support.stall_service` (name from STALL_NAME)."""

from __future__ import annotations

import asyncio
import os
import time

from common import Service


def build(name: str = "stall") -> Service:
    svc = Service(name)

    @svc.method
    async def charge(key: str, seconds: float, block: bool = True) -> str:
        """Records this run (the side effect) in `key`, then takes `seconds` on its first
        run only, blocking the event loop (`block`, as a sync library call or a CPU-bound
        step would) or not; a redelivered run answers at once. Answers who ran it."""
        runs = await svc.redis.rpush(key, svc.instance_id)
        if runs == 1:
            if block:
                time.sleep(seconds)  # noqa: ASYNC251 (the mistake under test)
            else:
                await asyncio.sleep(seconds)
        return svc.instance_id

    @svc.method
    async def stats() -> dict[str, object]:
        assert svc.worker is not None
        return svc.worker.snapshot()

    return svc


if __name__ == "__main__":
    build(os.environ.get("STALL_NAME", "stall")).run()
