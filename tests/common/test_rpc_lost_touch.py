"""The RPC client's restart check (`common.lost_touch`): a call refused for "no live
instance" just after Redis closed a connection of the client's asks Redis whether it
restarted, and is held by the rejoin grace (`common.rejoin`) if it did.

The INFO the check asks is answered by a real Redis; `HeldInfo` only holds the answer
back (or replaces it) so that a test lands a restart, a close or the client's own
close while a check is under way, which no timing could do reliably.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from common import RpcClient, constants
from common.embedded_redis import EmbeddedRedis
from common.errors import ServiceUnavailable
from tests.helpers import wait_for_async
from tests.support.leases import ONE_SECOND_LEASES, THREE_SECOND_LEASES
from tests.support.redis_closes import HeldInfo, closed, kill_connections, uptime_at_least

pytestmark = pytest.mark.timeout(60)

# Where Redis's uptime plays a part, a lease, and so a grace, of 3 s (THREE_SECOND_LEASES):
# a Redis whose uptime reads 3 did not just restart, and one that did is asked well within
# that. (Redis's uptime is whole seconds of its clock: up to 1 s off either way.)


def _name() -> str:
    return f"calc_{uuid.uuid4().hex[:8]}"


async def test_a_restart_during_a_check_is_checked_again() -> None:
    # A check begins (a task refused after a client kill, Redis up for longer than a
    # lease: no loss), and Redis restarts before it ends. A task refused after the
    # restart must not take the check under way for its own: that one read the old
    # Redis's uptime. It waits for a check begun after the close it found, which sees
    # the restart: both tasks are held by the grace.
    server = old = EmbeddedRedis().start()
    name, fence = _name(), _name()
    held = HeldInfo.connect(old.url)
    client = RpcClient(redis=held, settings=THREE_SECOND_LEASES)
    sent: list[asyncio.Task[bool]] = []
    try:
        await held.hset(constants.CATALOG, name, "{}")  # known, and no worker
        await wait_for_async(lambda: uptime_at_least(held, 3))
        with pytest.raises(ServiceUnavailable, match="no live instance"):
            await client.send(f"{name}.add", 1)  # connects the writer's connection
        await kill_connections(old.url, client)
        held.hold()
        sent.append(asyncio.create_task(client.send(f"{name}.add", 1)))
        await asyncio.wait_for(held.asked.wait(), 10)  # the old Redis answered the check
        server.stop()
        server = EmbeddedRedis(old.port).start()
        await wait_for_async(lambda: closed(client))
        sent.append(asyncio.create_task(client.send(f"{name}.add", 2)))
        # Enqueued after the task above, by the same writer: once it is answered, that
        # task has been refused and has joined the check under way (if it does).
        assert await client.send(f"{fence}.add", 3, policy="drop") is False
        held.release()
        await wait_for_async(lambda: sent[1].done() or client.parked_total == 2)
        assert client.parked_total == 2, sent[1]
        assert not sent[1].done()
    finally:
        held.release()
        await client.close()
        await asyncio.gather(*sent, return_exceptions=True)
        await held.aclose()
        server.stop()


@pytest.mark.parametrize(
    "answer",
    [{"uptime_in_seconds": {"a": 1, "b": 2}}, asyncio.CancelledError()],
    ids=["no_number", "cancelled"],
)
async def test_a_check_that_cannot_read_the_uptime_still_settles_the_call(
    answer: object,
) -> None:
    # What a proxy or a Redis-like server might answer to INFO: an uptime that is no
    # number (redis-py reads "uptime_in_seconds:a=1,b=2" as a dict). Redis did not say:
    # the close counts as a loss, and the call is held for the grace, then told "no live
    # instance". A check that ends cancelled under the call: the call is told at once.
    # Never the caller's timeout, as when the error killed the task settling the call.
    server = EmbeddedRedis().start()
    name = _name()
    held = HeldInfo.connect(server.url)
    client = RpcClient(redis=held, settings=ONE_SECOND_LEASES)  # uptime plays no part
    try:
        await held.hset(constants.CATALOG, name, "{}")  # known, and no worker
        with pytest.raises(ServiceUnavailable, match="no live instance"):
            await client.call(f"{name}.add", 1)  # connects the client's connection
        await kill_connections(server.url, client)
        held.answer_next(answer)
        with pytest.raises(ServiceUnavailable, match="no live instance"):
            await client.call(f"{name}.add", 1, timeout=5)
        assert client.parked_total == (0 if isinstance(answer, BaseException) else 1)
    finally:
        await client.close()
        await held.aclose()
        server.stop()


async def test_closing_the_client_during_a_check_tells_the_caller_and_leaves_no_task() -> None:
    # A task refused after a close waits for the restart check when the client closes:
    # its caller is told "RPC client closed" then (not, once the check ends, parked on
    # the closed client for a grace, or told "no live instance"), and nothing of the
    # client's is left running: not the check's run, not the task waiting for it.
    server = EmbeddedRedis().start()
    name = _name()
    held = HeldInfo.connect(server.url)
    client = RpcClient(redis=held, settings=THREE_SECOND_LEASES)
    try:
        await held.hset(constants.CATALOG, name, "{}")  # known, and no worker
        with pytest.raises(ServiceUnavailable, match="no live instance"):
            await client.send(f"{name}.add", 1)  # connects the writer's connection
        await kill_connections(server.url, client)
        held.hold()
        sent = asyncio.create_task(client.send(f"{name}.add", 1))
        await asyncio.wait_for(held.asked.wait(), 10)
        await client.close()
        held.release()  # had the check gone on, it would end now
        with pytest.raises(ServiceUnavailable, match="RPC client closed"):
            await asyncio.wait_for(sent, 10)
        assert client.parked_total == 0
        left = asyncio.all_tasks() - {asyncio.current_task()}
        assert not left, left
    finally:
        held.release()
        await client.close()
        await held.aclose()
        server.stop()
