"""The live policy: validation, the store (CAS, history, audit), the watcher, the CLI,
and version weights in `BalancingPolicy`, against a real Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import pytest
import redis.asyncio as aioredis

from common import constants
from common.balancing import STRATEGIES, Endpoint
from common.balancing.policy import BalancingPolicy
from common.embedded_redis import EmbeddedRedis
from common.errors import BadRequest, Conflict
from common.policy import (
    DEFAULT_POLICY,
    PolicyDocument,
    PolicyInvalid,
    PolicyStore,
    PolicyWatcher,
    StrategyName,
    changed_paths,
    validate_document,
    validate_json,
)
from common.policy.store import AUDIT_MAXLEN, HISTORY_KEEP
from tests.helpers import ROOT, wait_for_async

pytestmark = pytest.mark.timeout(60)

KEYS = (constants.POLICY_DOC, constants.POLICY_VERSION, constants.POLICY_HISTORY,
        constants.POLICY_AUDIT)  # fmt: skip


@pytest.fixture
async def store(redis_client: aioredis.Redis) -> AsyncIterator[PolicyStore]:
    """A store over an empty policy (the session's Redis is shared, so start clean)."""
    await redis_client.delete(*KEYS)
    yield PolicyStore(redis_client)


@pytest.fixture
async def watcher(store: PolicyStore) -> AsyncIterator[PolicyWatcher]:
    w = PolicyWatcher(store.redis, interval=0.05)
    await w.start()
    task = asyncio.create_task(w.run())
    yield w
    await w.close()
    task.cancel()


def nlp(**fields: Any) -> dict[str, Any]:
    return {"services": {"nlp": fields}}


# -- validation -------------------------------------------------------------------------


def routes(*prefixes: str) -> dict[str, Any]:
    return {"routes": [{"prefix": p, "service": "a"} for p in prefixes]}


def limit(**fields: Any) -> dict[str, Any]:
    return {"limits": [{"id": "a", "rate": 1, "period": 1, **fields}]}


WEIGHTS = "services.nlp.version_weights"
BAD_DOCUMENTS: list[tuple[str, object, str]] = [
    ("list", [1, 2], "(document)"),
    ("string", "services", "(document)"),
    ("null", None, "(document)"),
    ("number", 5, "(document)"),
    ("unknown top-level field", {"servics": {}}, "servics"),
    ("unknown service field", nlp(strategyy="hash"), "services.nlp.strategyy"),
    ("bad strategy", nlp(strategy="fastest"), "services.nlp.strategy"),
    ("timeout as text", nlp(timeout="3"), "services.nlp.timeout"),
    ("timeout zero", nlp(timeout=0), "services.nlp.timeout"),
    ("timeout too long", nlp(timeout=3601), "services.nlp.timeout"),
    ("connect timeout too long", nlp(connect_timeout=61), "services.nlp.connect_timeout"),
    ("retries as float", nlp(retries=1.5), "services.nlp.retries"),
    ("retries as bool", nlp(retries=True), "services.nlp.retries"),
    ("too many retries", nlp(retries=6), "services.nlp.retries"),
    ("negative weight", nlp(version_weights={"v1": -1, "v2": 5}), f"{WEIGHTS}.v1"),
    ("all-zero weights", nlp(version_weights={"v1": 0, "v2": 0}), WEIGHTS),
    ("weight as text", nlp(version_weights={"v1": "5"}), f"{WEIGHTS}.v1"),
    ("bad version tag", nlp(version_weights={"v 1": 5}), f"{WEIGHTS}.v 1"),
    ("bad service name", {"services": {"Bad Name": {}}}, "services.Bad Name"),
    ("routes not a list", {"routes": {"prefix": "/x/"}}, "routes"),
    ("reserved prefix /api/", routes("/api/x/"), "routes[0].prefix"),
    ("reserved prefix /health", routes("/healthz/"), "routes[0].prefix"),
    ("prefix covering reserved", routes("/"), "routes[0].prefix"),
    ("prefix without slash", routes("/x"), "routes[0].prefix"),
    ("prefix with ..", routes("/a/../b/"), "routes[0].prefix"),
    ("prefix with a query", routes("/a?b/"), "routes[0].prefix"),
    ("route without service", {"routes": [{"prefix": "/x/"}]}, "routes[0].service"),
    ("duplicate prefix", routes("/x/", "/y/", "/x/"), "routes[2].prefix"),
    ("duplicate limit id", {"limits": limit()["limits"] * 2}, "limits[1].id"),
    ("limit rate zero", limit(rate=0), "limits[0].rate"),
    ("limit bad key", limit(key="host"), "limits[0].key"),
    ("limit burst zero", limit(burst=0), "limits[0].burst"),
    ("limit period too long", limit(period=86401), "limits[0].period"),
    ("limit bad service", limit(service="**"), "limits[0].service"),
    ("limit unknown field", limit(x=1), "limits[0].x"),
    ("version as text", {"version": "3"}, "version"),
]


@pytest.mark.parametrize(("doc", "loc"), [(d, loc) for _, d, loc in BAD_DOCUMENTS],
                         ids=[name for name, _, _ in BAD_DOCUMENTS])  # fmt: skip
async def test_bad_documents_are_rejected_with_reasons_and_nothing_stored(
    store: PolicyStore, redis_client: aioredis.Redis, doc: object, loc: str
) -> None:
    with pytest.raises(PolicyInvalid) as info:
        validate_document(doc)
    locs = [e["loc"] for e in info.value.errors]
    assert any(at.startswith(loc) for at in locs), info.value.errors
    assert all(e["msg"] for e in info.value.errors)
    with pytest.raises(PolicyInvalid):
        await store.put(doc, actor="test")
    assert await redis_client.exists(*KEYS) == 0  # nothing stored, nothing audited


def test_policy_invalid_is_a_bad_request_with_details() -> None:
    with pytest.raises(PolicyInvalid) as info:
        validate_document(nlp(strategy="fastest", timeout=-1))
    exc = info.value
    assert isinstance(exc, BadRequest)
    body = exc.to_dict()
    assert body["code"] == "policy_invalid"
    assert {d["loc"] for d in body["details"]} == {"services.nlp.strategy", "services.nlp.timeout"}
    assert "services.nlp.strategy" in body["message"]


def test_every_error_is_reported_at_once() -> None:
    doc = {
        "services": {"nlp": {"strategy": "x", "version_weights": {"a": 0}}},
        "routes": [{"prefix": "/api/", "service": "a"}, {"prefix": "/y/", "service": "a"},
                   {"prefix": "/y/", "service": "a"}],
        "limits": [{"id": "l", "rate": 1, "period": 1}, {"id": "l", "rate": 0, "period": 1}],
        "extra": True,
    }  # fmt: skip
    with pytest.raises(PolicyInvalid) as info:
        validate_document(doc)
    assert {e["loc"] for e in info.value.errors} == {
        "services.nlp.strategy",
        "services.nlp.version_weights",
        "routes[0].prefix",
        "routes[2].prefix",
        "limits[1].rate",
        "limits[1].id",
        "extra",
    }


def test_malformed_json_is_invalid_too() -> None:
    with pytest.raises(PolicyInvalid) as info:
        validate_json('{"services": ')
    assert info.value.errors[0]["loc"] == "(document)"
    assert "not valid JSON" in info.value.errors[0]["msg"]
    assert validate_json('{"services": {"nlp": {"strategy": "hash"}}}').services["nlp"].strategy


def test_a_good_document_gets_its_defaults() -> None:
    doc = validate_document({
        "services": {"nlp": {"version_weights": {"v1": 90, "v2": 10}, "timeout": 5}},
        "routes": [{"prefix": "/models/", "service": "nlp"}],
        "limits": [{"id": "search", "service": "iptv", "rate": 20, "period": 1}],
    })  # fmt: skip
    assert doc.services["nlp"].strategy == "round_robin"
    assert doc.services["nlp"].timeout == 5.0 and doc.services["nlp"].retries is None
    assert doc.routes[0].strip_prefix is True and doc.routes[0].public is False
    limit = doc.limits[0]
    assert (limit.method, limit.key, limit.burst) == ("*", "credential", 20)  # burst = rate


def test_public_names() -> None:
    import common.policy

    assert sorted(common.policy.__all__) == [
        "DEFAULT_POLICY", "LimitRule", "PolicyDocument", "PolicyInvalid", "PolicyStore",
        "PolicyWatcher", "RESERVED_PREFIXES", "RouteRule", "ServicePolicy", "StrategyName",
        "changed_paths", "validate_document", "validate_json",
    ]  # fmt: skip


def test_default_policy_and_strategy_names() -> None:
    assert set(get_args(StrategyName)) == set(STRATEGIES)
    assert DEFAULT_POLICY.version == 0
    limits = {rule.id: rule for rule in DEFAULT_POLICY.limits}
    assert set(limits) == {"login", "register"}
    assert (limits["login"].rate, limits["login"].burst, limits["login"].key) == (30, 10, "ip")
    assert (limits["register"].rate, limits["register"].burst) == (10, 5)
    assert validate_document(DEFAULT_POLICY) == DEFAULT_POLICY  # it validates itself


def test_changed_paths() -> None:
    old = {
        "version": 1,
        "services": {"nlp": {"strategy": "hash", "version_weights": {"v1": 100}}, "old": {}},
        "routes": [{"prefix": "/a/", "service": "a"}],
        "limits": [{"id": "login", "rate": 30}, {"id": "gone", "rate": 1}],
    }
    new = {
        "version": 2,
        "services": {"nlp": {"strategy": "hash", "version_weights": {"v1": 90, "v2": 10}},
                     "iptv": {}},
        "routes": [{"prefix": "/a/", "service": "b"}],
        "limits": [{"id": "login", "rate": 20}, {"id": "added", "rate": 1}],
    }  # fmt: skip
    assert changed_paths(old, new) == [
        "limits.added",
        "limits.gone",
        "limits.login.rate",
        "routes",
        "services.iptv",
        "services.nlp.version_weights",
        "services.old",
    ]
    assert changed_paths(old, {**old, "version": 9}) == []


# -- the store --------------------------------------------------------------------------


async def test_get_is_the_default_until_something_is_stored(store: PolicyStore) -> None:
    assert await store.get() == DEFAULT_POLICY
    assert await store.current_version() == 0
    assert await store.history() == []
    assert await store.get_version(0) == DEFAULT_POLICY
    assert await store.get_version(1) is None


async def test_put_and_get_increment_the_version(store: PolicyStore) -> None:
    first = await store.put({**nlp(strategy="hash"), "version": 77}, actor="alice")
    assert first.version == 1  # the document's own version is ignored
    assert (await store.get()) == first
    second = await store.put(nlp(strategy="random"), actor="bob", expected_version=1)
    assert second.version == 2
    assert (await store.get()).services["nlp"].strategy == "random"
    assert await store.current_version() == 2
    assert (await store.get_version(1)) == first
    assert (await store.get_version(2)) == second


async def test_expected_version_conflict_changes_nothing(store: PolicyStore) -> None:
    await store.put(nlp(strategy="hash"), actor="alice", expected_version=0)
    with pytest.raises(Conflict) as info:
        await store.put(nlp(strategy="random"), actor="bob", expected_version=0)
    assert "version 1" in info.value.message
    assert (await store.get()).services["nlp"].strategy == "hash"
    assert await store.current_version() == 1
    assert len(await store.history()) == 1


async def test_concurrent_puts_each_get_their_own_version(store: PolicyStore) -> None:
    docs = await asyncio.gather(*(store.put(nlp(retries=i % 6), actor=f"w{i}") for i in range(10)))
    assert sorted(d.version for d in docs) == list(range(1, 11))
    assert await store.current_version() == 10
    assert [e["version"] for e in await store.history(20)] == list(range(10, 0, -1))


async def test_history_and_audit_entries(store: PolicyStore) -> None:
    await store.put(nlp(strategy="hash"), actor="alice")
    await store.put(nlp(strategy="hash", version_weights={"v1": 1}), actor="bob")
    entries = await store.history(10)
    assert [(e["version"], e["actor"]) for e in entries] == [(2, "bob"), (1, "alice")]
    assert entries[0]["changes"] == ["services.nlp.version_weights"]
    assert entries[1]["changes"] == ["limits.login", "limits.register", "services.nlp"]
    assert entries[0]["at"] >= entries[1]["at"] > 1_600_000_000  # Redis's clock, in seconds
    assert [e["version"] for e in await store.history(1)] == [2]


async def test_history_keeps_the_last_versions_and_the_audit_is_trimmed(
    store: PolicyStore, redis_client: aioredis.Redis
) -> None:
    total = AUDIT_MAXLEN + 150
    for i in range(total):
        await store.put(nlp(retries=i % 6), actor="loop")
    assert await redis_client.hlen(constants.POLICY_HISTORY) == HISTORY_KEEP  # type: ignore[misc]
    assert await store.get_version(total - HISTORY_KEEP) is None
    assert (await store.get_version(total - HISTORY_KEEP + 1)) is not None
    assert AUDIT_MAXLEN <= await redis_client.xlen(constants.POLICY_AUDIT) < total


async def test_put_accepts_a_document_object(store: PolicyStore) -> None:
    doc = PolicyDocument.model_validate(nlp(strategy="least_time"))
    assert (await store.put(doc, actor="a")).services["nlp"].strategy == "least_time"


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
        assert w.current.version == await store.current_version()
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


async def _at_version(watcher: PolicyWatcher, version: int) -> bool:
    return watcher.current.version == version


def _logged(caplog: Any, text: str) -> Any:
    async def check() -> bool:
        return any(text in record.getMessage() for record in caplog.records)

    return check


# -- the CLI ----------------------------------------------------------------------------


def _cli(redis_url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "common.policy", *args],
        env={"REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


async def test_cli(store: PolicyStore, redis_url: str, tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(nlp(strategy="least_conn", version_weights={"v2": 1})))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"services": {"nlp": {"strategy": "fastest", "retries": 9}}}))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _cli(redis_url, *args)

    checked = await asyncio.to_thread(run, "validate", str(good))
    assert checked.returncode == 0, checked.stderr
    assert "valid" in checked.stdout
    refused = await asyncio.to_thread(run, "validate", str(bad))
    assert refused.returncode != 0
    assert "services.nlp.strategy" in refused.stderr and "services.nlp.retries" in refused.stderr

    stored = await asyncio.to_thread(run, "put", str(good), "--expected-version", "0")
    assert stored.returncode == 0, stored.stderr
    assert "version 1" in stored.stdout
    assert (await store.get()).services["nlp"].strategy == "least_conn"

    not_stored = await asyncio.to_thread(run, "put", str(bad))
    assert not_stored.returncode != 0 and "services.nlp.retries" in not_stored.stderr
    conflict = await asyncio.to_thread(run, "put", str(good), "--expected-version", "0")
    assert conflict.returncode != 0 and "version 1" in conflict.stderr
    assert await store.current_version() == 1

    got = await asyncio.to_thread(run, "get")
    assert got.returncode == 0, got.stderr
    assert validate_document(json.loads(got.stdout)) == await store.get()

    history = await asyncio.to_thread(run, "history", "--json")
    assert history.returncode == 0, history.stderr
    entries = [json.loads(line) for line in history.stdout.splitlines()]
    assert len(entries) == 1 and entries[0]["actor"].startswith("cli:")
    assert entries[0]["changes"] == ["limits.login", "limits.register", "services.nlp"]
    table = await asyncio.to_thread(run, "history", "--limit", "5")
    assert "cli:" in table.stdout and "services.nlp" in table.stdout

    missing = await asyncio.to_thread(run, "validate", str(tmp_path / "nope.json"))
    assert missing.returncode != 0 and "cannot read" in missing.stderr
    assert (await asyncio.to_thread(run, "frobnicate")).returncode == 2


# -- version weights in BalancingPolicy -------------------------------------------------

ENDPOINTS = [
    Endpoint("a1", "127.0.0.1:1", version="v1"),
    Endpoint("a2", "127.0.0.1:2", version="v1"),
    Endpoint("b1", "127.0.0.1:3", version="v2"),
    Endpoint("b2", "127.0.0.1:4", version="v2"),
]


async def _balancer(store: PolicyStore, weights: dict[str, int]) -> BalancingPolicy:
    await store.put(nlp(version_weights=weights), actor="t")
    w = PolicyWatcher(store.redis)
    await w.start()
    return BalancingPolicy(w)


def _versions(
    policy: BalancingPolicy,
    endpoints: list[Endpoint] = ENDPOINTS,
    version: str | None = None,
    n: int = 200,
) -> Counter[str]:
    strategy = policy.strategy("nlp")
    picks = (strategy.pick(policy.for_request("nlp", endpoints, version)) for _ in range(n))
    return Counter(ep.version for ep in picks)


async def test_version_weights_send_everything_to_the_weighted_version(store: PolicyStore) -> None:
    policy = await _balancer(store, {"v1": 100, "v2": 0})
    assert _versions(policy) == Counter({"v1": 200})
    await store.put(nlp(version_weights={"v1": 0, "v2": 100}), actor="t")
    assert await policy.watcher.refresh()  # what the watcher's run() does on the change event
    assert _versions(policy) == Counter({"v2": 200})
    # The strategy still spreads the requests inside the chosen version.
    strategy = policy.strategy("nlp")
    picks = Counter(strategy.pick(policy.for_request("nlp", ENDPOINTS, None)).instance_id
                    for _ in range(100))  # fmt: skip
    assert picks == Counter({"b1": 50, "b2": 50})


async def test_a_requested_version_overrides_the_weights(store: PolicyStore) -> None:
    policy = await _balancer(store, {"v2": 100})
    assert _versions(policy, version="v1") == Counter({"v1": 200})
    assert policy.for_request("nlp", ENDPOINTS, "v9") == []  # the caller answers 503


async def test_a_weighted_version_without_candidates_falls_back(store: PolicyStore) -> None:
    policy = await _balancer(store, {"v1": 50, "v2": 50})
    only_v1 = [ep for ep in ENDPOINTS if ep.version == "v1"]
    assert _versions(policy, only_v1) == Counter({"v1": 200})
    policy = await _balancer(store, {"v3": 100})  # nobody runs v3 (yet)
    assert _versions(policy) == Counter({"v1": 100, "v2": 100})  # as without weights


async def test_version_weights_split_the_traffic(store: PolicyStore) -> None:
    await store.put(nlp(version_weights={"v1": 3, "v2": 1}), actor="t")
    w = PolicyWatcher(store.redis)
    await w.start()
    import random

    policy = BalancingPolicy(w, rng=random.Random(7))
    share = _versions(policy, n=4000)["v1"] / 4000
    assert 0.7 < share < 0.8
    # A keyed (sticky) request always lands on the same version.
    for key in ("user-1", "user-2", "user-3"):
        assert len({policy.for_request("nlp", ENDPOINTS, None, key)[0].version
                    for _ in range(20)}) == 1  # fmt: skip


async def test_a_strategy_change_recreates_only_that_services_strategy(store: PolicyStore) -> None:
    await store.put({"services": {"nlp": {"strategy": "hash"}, "iptv": {}}}, actor="t")
    w = PolicyWatcher(store.redis)
    await w.start()
    policy = BalancingPolicy(w)
    nlp_strategy, iptv_strategy = policy.strategy("nlp"), policy.strategy("iptv")
    assert nlp_strategy.name == "hash" and iptv_strategy.name == "round_robin"
    await store.put({"services": {"nlp": {"strategy": "least_time"}, "iptv": {}}}, actor="t")
    await w.refresh()
    assert policy.strategy("nlp").name == "least_time"
    assert policy.strategy("iptv") is iptv_strategy
    assert policy.strategy("unknown").name == "round_robin"
