"""Version weights and per-service strategies in `BalancingPolicy`, driven by the policy."""

from __future__ import annotations

from collections import Counter

import pytest

from common.balancing import Endpoint
from common.balancing.policy import BalancingPolicy
from common.policy import PolicyStore, PolicyWatcher
from tests.common.policy_fixtures import nlp, store_fixture  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)


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
    await store.put({"services": {"nlp": {"strategy": "hash"}, "iptv": {}}, "limits": []},
                    actor="t")  # fmt: skip
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
