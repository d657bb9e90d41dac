"""`RetryBudget`: retries bounded by a share of the requests plus a minimum rate, and
`BalancingPolicy.retry_budget`: one budget per service, limited by the live policy."""

from __future__ import annotations

import pytest

from common.balancing import RetryBudget
from common.balancing.policy import BalancingPolicy
from common.policy import PolicyStore, PolicyWatcher, RetryBudgetPolicy
from tests.common.policy_fixtures import nlp, store_fixture  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def spend_all(budget: RetryBudget) -> int:
    spent = 0
    while budget.try_spend():
        spent += 1
    return spent


def test_each_request_pays_for_a_share_of_a_retry() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, clock=Clock())
    assert spend_all(budget) == 1  # a fresh budget holds one retry (its cap here)
    for _ in range(4):
        budget.deposit()
    assert not budget.try_spend()  # four requests: 0.8 of a retry
    budget.deposit()
    assert budget.try_spend()  # the fifth makes one
    assert not budget.try_spend()
    assert budget.denied == 3  # (spend_all ends on a refusal too)


def test_time_adds_the_minimum_rate_whatever_the_traffic() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0, min_per_second=2, clock=clock)
    assert spend_all(budget) == 20  # starts full: ten seconds of the minimum rate
    clock.now += 0.4
    assert not budget.try_spend()  # 0.8 of a retry
    clock.now += 0.1
    assert budget.try_spend()
    clock.now += 3600  # a long calm banks no more than the cap
    assert spend_all(budget) == 20


def test_deposits_stop_at_the_cap() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=1, clock=Clock())
    spend_all(budget)
    for _ in range(1000):
        budget.deposit()
    assert spend_all(budget) == 10


def test_exhausted_tells_whether_the_last_retry_was_refused() -> None:
    budget = RetryBudget(ratio=1, min_per_second=0, clock=Clock())
    assert budget.try_spend() and not budget.exhausted
    assert not budget.try_spend() and budget.exhausted
    budget.deposit()
    assert budget.try_spend() and not budget.exhausted


def test_state_reports_the_balance_refilled_to_now_without_spending() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0, min_per_second=2, clock=clock)
    spend_all(budget)
    clock.now += 1.25
    state = {"available": 2.5, "cap": 20.0, "denied": 1, "exhausted": True}
    assert budget.state() == state
    assert budget.state() == state  # reading it spent nothing and moved nothing
    assert spend_all(budget) == 2


def test_new_limits_keep_the_balance_within_the_new_cap() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=10, clock=Clock())
    budget.configure(ratio=0.2, min_per_second=0.5)
    assert spend_all(budget) == 5
    with pytest.raises(ValueError):
        budget.configure(ratio=-0.1, min_per_second=1)


async def test_each_service_has_its_own_budget_limited_by_the_live_policy(
    store: PolicyStore,
) -> None:
    await store.put(nlp(retry_budget={"ratio": 0.5, "min_per_second": 0}), actor="t")
    watcher = PolicyWatcher(store.redis)
    await watcher.start()
    policy = BalancingPolicy(watcher, retry_budget=RetryBudgetPolicy(ratio=0, min_per_second=3))
    nlp_budget, other = policy.retry_budget("nlp"), policy.retry_budget("other")
    assert policy.retry_budget("nlp") is nlp_budget  # one per service, kept
    assert (nlp_budget.ratio, nlp_budget.min_per_second) == (0.5, 0)
    assert (other.ratio, other.min_per_second) == (0, 3)  # no policy of its own: the default
    assert spend_all(nlp_budget) == 1 and spend_all(other) == 30  # a storm on one spares the other

    await store.put(nlp(retry_budget={"ratio": 1, "min_per_second": 1}), actor="t")
    assert await watcher.refresh()
    assert policy.retry_budget("nlp") is nlp_budget  # re-limited in place
    assert (nlp_budget.ratio, nlp_budget.min_per_second) == (1, 1)
    await store.put(nlp(), actor="t")  # no budget in the policy any more: the default
    assert await watcher.refresh()
    assert (nlp_budget.ratio, nlp_budget.min_per_second) == (0, 3)
