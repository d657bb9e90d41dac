"""The policy watcher: pub/sub, polling, and keeping the last good policy."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import constants
from common.embedded_redis import EmbeddedRedis
from common.policy import DEFAULT_POLICY, PolicyStore, PolicyWatcher, validate_document
from common.policy.watcher import RESTORE_ACTOR
from tests.common.policy_fixtures import (  # noqa: F401 (fixtures)
    KEYS,
    nlp,
    store_fixture,
    watcher_fixture,
)
from tests.helpers import wait_for_async

pytestmark = pytest.mark.timeout(60)


# -- the watcher ------------------------------------------------------------------------


async def test_watcher_sees_a_change_through_pubsub(store: PolicyStore) -> None:
    w = PolicyWatcher(store.redis, interval=3600)  # polling would take an hour
    await w.start()
    seen: list[int] = []
    w.on_change(lambda doc: seen.append(doc.version))
    task = asyncio.create_task(w.run())
    try:
        assert w.current == DEFAULT_POLICY

        async def applied() -> bool:
            # Put until one lands after the subscription is up (the first may precede it).
            if w.current.version == 0:
                await store.put(nlp(strategy="hash"), actor="t")
            return w.current.services.get("nlp") is not None

        await wait_for_async(applied, timeout=10, interval=0.2)
        assert w.current.version == (await store.stamp())[0]
        assert seen and seen[-1] == w.current.version
    finally:
        await w.close()
        await asyncio.wait_for(task, 5)  # close() ends run()


async def test_watcher_polls_when_the_publish_was_missed(
    store: PolicyStore, watcher: PolicyWatcher, redis_client: aioredis.Redis
) -> None:
    doc = validate_document(nlp(strategy="weighted")).model_copy(update={"version": 5})
    # Written by hand: no PUBLISH, so only the poll of the version key can find it.
    await redis_client.set(constants.POLICY_DOC, doc.to_json())
    await redis_client.set(constants.POLICY_VERSION, 5)

    async def applied() -> bool:
        return watcher.current.version == 5

    await wait_for_async(applied, timeout=5)
    assert watcher.current.services["nlp"].strategy == "weighted"


async def test_watcher_keeps_the_last_policy_when_the_stored_one_is_corrupt(
    store: PolicyStore, watcher: PolicyWatcher, redis_client: aioredis.Redis, caplog: Any
) -> None:
    good = await store.put(nlp(strategy="hash"), actor="t")
    await wait_for_async(lambda: _at_version(watcher, good.version), timeout=5)
    caplog.set_level(logging.ERROR, logger="switchboard.policy")
    await redis_client.set(constants.POLICY_DOC, json.dumps({"services": {"nlp": {"x": 1}}}))
    await redis_client.set(constants.POLICY_VERSION, good.version + 1)
    await wait_for_async(_logged(caplog, "stored policy is invalid"), timeout=5)
    assert watcher.current == good


async def test_a_stored_limit_the_gateway_cannot_build_is_refused_and_logged_once(
    store: PolicyStore, redis_client: aioredis.Redis, caplog: Any
) -> None:
    """A document written before its rule was validated (or by hand): keeping it out
    of `current` keeps it off the request path, where the gateway would fail on it."""
    w = PolicyWatcher(redis_client, interval=3600)  # refreshed by hand below
    good = await store.put(nlp(strategy="hash"), actor="t")
    await w.start()
    assert w.current == good
    caplog.set_level(logging.ERROR, logger="switchboard.policy")
    unbuildable = {"id": "daily", "service": "*", "method": "*", "key": "credential",
                   "rate": 1, "period": 86400.0, "burst": 1_000_000}  # fmt: skip
    raw = {**good.model_dump(mode="json"), "version": good.version + 1, "limits": [unbuildable]}
    await redis_client.set(constants.POLICY_DOC, json.dumps(raw))
    await redis_client.set(constants.POLICY_VERSION, good.version + 1)
    for _ in range(3):  # what three polls would do
        assert await w.refresh() is False
    assert w.current == good
    refused = [r for r in caplog.records if "stored policy is invalid" in r.getMessage()]
    assert len(refused) == 1
    assert "limit 'daily'" in refused[0].__dict__["fields"]["error"]
    fixed = await store.put({"services": {}, "limits": []}, actor="t")
    assert await w.refresh() is True and w.current == fixed


async def test_a_stored_version_that_is_no_integer_is_refused_and_logged_once(
    store: PolicyStore, redis_client: aioredis.Redis, caplog: Any
) -> None:
    w = PolicyWatcher(redis_client, interval=3600)  # refreshed by hand below
    good = await store.put(nlp(strategy="hash"), actor="t")
    await w.start()
    caplog.set_level(logging.ERROR, logger="switchboard.policy")
    await redis_client.set(constants.POLICY_VERSION, "abc")
    for _ in range(3):  # what three polls would do
        assert await w.refresh() is False
    assert w.current == good
    refused = [r for r in caplog.records if "stored policy is invalid" in r.getMessage()]
    assert len(refused) == 1 and not refused[0].exc_info
    assert "policy version is not an integer ('abc')" in refused[0].__dict__["fields"]["error"]


async def test_watcher_keeps_the_last_policy_while_redis_is_down(
    tmp_path: Path, caplog: Any
) -> None:
    server = EmbeddedRedis(appendonly=True, data_dir=tmp_path).start()
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5)
    w = PolicyWatcher(client, interval=0.05)
    task: asyncio.Task[None] | None = None
    try:
        store = PolicyStore(client)
        first = await store.put(nlp(strategy="hash"), actor="t")
        await w.start()
        assert w.current == first
        task = asyncio.create_task(w.run())
        caplog.set_level(logging.WARNING, logger="switchboard.policy")
        server.stop(keep_data=True)
        await wait_for_async(_logged(caplog, "policy not refreshed"), timeout=15)
        assert w.current == first  # not the default: Redis blinking changes nothing
        server = EmbeddedRedis(port=server.port, appendonly=True, data_dir=tmp_path).start()
        second = await store.put(nlp(strategy="random"), actor="t")
        await wait_for_async(lambda: _at_version(w, second.version), timeout=15)
        assert w.current.services["nlp"].strategy == "random"
    finally:
        await w.close()
        if task is not None:
            task.cancel()
        await client.aclose()
        server.stop()


async def test_replicas_write_the_policy_back_when_redis_restarts_empty(caplog: Any) -> None:
    server = EmbeddedRedis().start()  # no persistence: a restart loses everything
    clients = [aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5) for _ in "ab"]
    replicas = [PolicyWatcher(client, interval=0.05) for client in clients]
    tasks: list[asyncio.Task[None]] = []
    try:
        store = PolicyStore(clients[0])
        await store.put(nlp(strategy="hash"), actor="t")
        held = await store.put(nlp(strategy="weighted", retries=3), actor="t")
        for w in replicas:
            await w.start()
            assert w.current == held
            tasks.append(asyncio.create_task(w.run()))
        caplog.set_level(logging.ERROR, logger="switchboard.policy")
        server.stop()
        server = EmbeddedRedis(port=server.port).start()

        async def restored() -> bool:
            return all(w.current.version == 1 for w in replicas)

        await wait_for_async(restored, timeout=15)
        # Both replicas raced; one wrote, the other loaded its copy: one audited restore.
        assert [e["actor"] for e in await store.history()] == [RESTORE_ACTOR]
        stored = await store.get()
        assert stored.version == 1 and stored.services == held.services
        assert all(w.current == stored for w in replicas)
        assert await _logged(caplog, "no policy stored")()
    finally:
        for w in replicas:
            await w.close()
        for task in tasks:
            task.cancel()
        for client in clients:
            await client.aclose()
        server.stop()


async def test_a_late_change_message_writes_nothing_back(
    store: PolicyStore, watcher: PolicyWatcher
) -> None:
    await store.put(nlp(strategy="hash"), actor="t")
    second = await store.put(nlp(strategy="random"), actor="t")
    await wait_for_async(lambda: _at_version(watcher, second.version), timeout=5)
    assert await watcher.refresh(1) is False  # the first put's message, arriving last
    assert watcher.current == second
    assert len(await store.history()) == 2


@pytest.mark.parametrize("held_versions", [1, 2])
async def test_a_policy_written_after_redis_lost_its_data_is_applied(
    store: PolicyStore, redis_client: aioredis.Redis, held_versions: int
) -> None:
    # Written after the loss, before the watcher looked: with the number the watcher
    # holds (only the store's epoch tells them apart), or a lower one.
    w = PolicyWatcher(store.redis, interval=3600)  # refreshed by hand below
    for retries in range(held_versions):
        await store.put(nlp(strategy="hash", retries=retries), actor="t")
    await w.start()
    assert w.current.version == held_versions
    await redis_client.delete(*KEYS)
    after = await store.put(nlp(strategy="random"), actor="admin")
    assert after.version == 1
    assert await w.refresh() is True
    assert w.current == after
    assert [e["actor"] for e in await store.history()] == ["admin"]  # nothing written back


async def _at_version(watcher: PolicyWatcher, version: int) -> bool:
    return watcher.current.version == version


def _logged(caplog: Any, text: str) -> Any:
    async def check() -> bool:
        return any(text in record.getMessage() for record in caplog.records)

    return check
