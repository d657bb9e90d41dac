"""Redis up but refusing while a gateway or websocket service starts (out of memory, a
read-only replica, a failed save, a script running too long, the credentials):
`Authenticator.start` (the signing keys, then `RevocationView.start`) and
`PolicyWatcher.start` return instead of raising (which stopped the service from
starting), each failure is logged once as its loop's outage with its kind, never the
policy's as an invalid document, and what could not be loaded is loaded once Redis
answers. A private redis-server put in each state (`tests.support.redis_states`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from common.connection import connect
from common.credentials import Authenticator
from common.embedded_redis import EmbeddedRedis
from common.policy import PolicyWatcher
from tests.helpers import wait_for_async
from tests.support.redis_states import STATES, private_redis_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(60)

# The first signing key is written at start: every state refuses that write.
KINDS = ["out_of_memory", "read_only", "persistence_failed", "busy", "auth"]


@pytest.fixture
def admin(private_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    """An admin connection to a Redis emptied for the test: no keyring, no policy."""
    client = redis.Redis(port=private_redis.port)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


def _outages(caplog: Any, message: str) -> list[tuple[str, str | None]]:
    return [(r.__dict__["fields"]["kind"], r.__dict__["fields"].get("at"))
            for r in caplog.records if r.getMessage() == message]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
async def test_the_authenticator_starts_while_redis_refuses(
    kind: str, private_redis: EmbeddedRedis, admin: redis.Redis, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    client = connect(private_redis.url)
    auth = Authenticator(client, configured_secret="s" * 32, resync_interval=3600)
    try:
        with STATES[kind](admin):
            await auth.start()
            assert auth._keys == {}
        assert _outages(caplog, "signing keys resync failed") == [(kind, "start")]
        # `resync_interval` is an hour: only the retry of what was never loaded runs.
        await wait_for_async(lambda: auth._keys and auth.revocations.loaded, timeout=10)
        if kind == "busy":  # the revocations could not be read either
            assert _outages(caplog, "revocation resync failed") == [("busy", "start")]
    finally:
        await auth.close()
        await client.aclose()
    assert any(r.getMessage() == "signing keys resynced" for r in caplog.records)


async def test_the_policy_watcher_takes_a_refusal_for_an_outage_not_an_invalid_document(
    private_redis: EmbeddedRedis, admin: redis.Redis, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.policy")
    client = connect(private_redis.url)
    watcher = PolicyWatcher(client, interval=3600)  # refreshed by hand below
    try:
        with STATES["busy"](admin):
            await watcher.start()
            assert await watcher.refresh() is False
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        outages = _outages(caplog, "policy not refreshed, keeping the version applied")
        assert outages == [("busy", None)]  # logged once: the refresh after start was quiet
        await watcher.refresh()
        assert any(r.getMessage() == "policy store reachable again" for r in caplog.records)
    finally:
        await watcher.close()
        await client.aclose()
