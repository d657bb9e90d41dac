"""Fixtures and helpers shared by the `tests/common/test_policy*.py` modules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import constants
from common.policy import PolicyStore, PolicyWatcher

KEYS = (constants.POLICY_DOC, constants.POLICY_VERSION, constants.POLICY_HISTORY,
        constants.POLICY_AUDIT, constants.POLICY_EPOCH)  # fmt: skip


@pytest.fixture(name="store")
async def store_fixture(redis_client: aioredis.Redis) -> AsyncIterator[PolicyStore]:
    """A store over an empty policy (the session's Redis is shared, so start clean)."""
    await redis_client.delete(*KEYS)
    yield PolicyStore(redis_client)


@pytest.fixture(name="watcher")
async def watcher_fixture(store: PolicyStore) -> AsyncIterator[PolicyWatcher]:
    w = PolicyWatcher(store.redis, interval=0.05)
    await w.start()
    task = asyncio.create_task(w.run())
    yield w
    await w.close()
    task.cancel()


def nlp(**fields: Any) -> dict[str, Any]:
    """A whole document: service `nlp` with `fields`, and no limits (said, as a PUT must
    say it: `common.policy.sections`)."""
    return {"services": {"nlp": fields}, "limits": []}
