"""`webapi.proxy.deadlines`: timeouts swept periodically instead of a timer each."""

from __future__ import annotations

import asyncio

from webapi.proxy.deadlines import Deadlines


async def test_a_deadline_fires_once_within_the_resolution_and_a_cleared_one_never() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop, resolution=0.02)
    fired: dict[str, float] = {}
    start = loop.time()
    deadlines.set("a", start + 0.05, lambda: fired.setdefault("a", loop.time()))
    deadlines.set("b", start + 0.05, lambda: fired.setdefault("b", loop.time()))
    deadlines.clear("b")
    await asyncio.sleep(0.2)
    assert set(fired) == {"a"}
    assert fired["a"] - start >= 0.05  # never early
    assert len(deadlines) == 0  # and the sweep stopped with nothing due
    deadlines.close()


async def test_a_callback_may_rearm_its_own_deadline() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop, resolution=0.01)
    count = 0

    def again() -> None:
        nonlocal count
        count += 1
        if count < 3:
            deadlines.set("k", loop.time() + 0.01, again)

    deadlines.set("k", loop.time() + 0.01, again)
    await asyncio.sleep(0.3)
    assert count == 3 and len(deadlines) == 0
    deadlines.close()
