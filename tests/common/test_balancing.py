"""Balancing strategies (design §5): pure, deterministic, no Redis, no sleeps."""

from __future__ import annotations

import heapq
import random
import tracemalloc
from collections import Counter

import pytest

from common.balancing import STRATEGIES, Endpoint, Strategy, make_strategy
from tests.support.balancing import KEYS, FakeClock, eps, ids, many, owners

pytestmark = pytest.mark.timeout(30)


def test_strategy_names() -> None:
    assert STRATEGIES == ("round_robin", "weighted", "least_conn", "least_time", "hash", "random")


# -- round_robin ---------------------------------------------------------------------


def test_round_robin_exactly_even_over_three() -> None:
    rr = make_strategy("round_robin")
    a_b_c = eps("a", "b", "c")
    picks = ids(rr, a_b_c, 300)
    assert picks == "abc" * 100


def test_round_robin_exactly_even_when_the_list_changes() -> None:
    rr = make_strategy("round_robin")
    members = eps("a", "b", "c", "d")
    shuffler = random.Random(7)
    # The same set as a new list in a new order on every call, and as a tuple.
    counts = Counter(rr.pick(shuffler.sample(members[:3], 3)).instance_id for _ in range(30))
    assert counts == {"a": 10, "b": 10, "c": 10}
    counts = Counter(rr.pick(tuple(shuffler.sample(members, 4))).instance_id for _ in range(40))
    assert counts == {"a": 10, "b": 10, "c": 10, "d": 10}
    # An instance leaves: the others keep taking exact turns, continuing the cycle.
    without_b = [members[0], members[2], members[3]]
    assert sorted(Counter(ids(rr, without_b, 30)).values()) == [10, 10, 10]


def test_round_robin_pools_that_alternate_each_stay_even() -> None:
    rr = make_strategy("round_robin")
    v1, v2 = eps("a", "b"), eps("c", "d", "e")
    counts = Counter(rr.pick(v1 if i % 2 else v2).instance_id for i in range(120))
    assert counts == {"a": 30, "b": 30, "c": 20, "d": 20, "e": 20}


# -- weighted ------------------------------------------------------------------------


def test_weighted_5_1_1_interleaves_like_nginx() -> None:
    w = make_strategy("weighted")
    candidates = eps("c", "a", "b", a=5)  # candidate order does not matter
    assert ids(w, candidates, 7 * 100) == "aabacaa" * 100


def test_weighted_3_2_1_exact_proportions_and_interleaving() -> None:
    w = make_strategy("weighted")
    assert ids(w, eps("a", "b", "c", a=3, b=2), 6 * 50) == "abacba" * 50


def test_weighted_scales_and_clamps_weights() -> None:
    w = make_strategy("weighted")
    assert ids(w, eps("a", "b", "c", a=50, b=10, c=10), 7) == "aabacaa"  # gcd 10
    w = make_strategy("weighted")
    assert ids(w, eps("a", "b", "c", b=0, c=-3), 9) == "abc" * 3  # below 1 counts as 1


def test_weighted_long_cycles_are_stepped_live_and_stay_exact() -> None:
    w = make_strategy("weighted")
    candidates = eps("a", "b", "c", a=5000)  # a cycle of 5002: longer than the memo
    picks = ids(w, candidates, 2 * 5002)
    assert Counter(picks) == {"a": 10000, "b": 2, "c": 2}
    assert picks[:5002] == picks[5002:]
    b, c = picks.index("b"), picks.index("c")
    assert abs(b - 5002 / 3) < 5 and abs(c - 2 * 5002 / 3) < 5  # evenly spread, not bunched


# -- least_conn ----------------------------------------------------------------------


def test_least_conn_avoids_the_instance_with_many_in_flight() -> None:
    lc = make_strategy("least_conn", seed=1)
    a, b, c = eps("a", "b", "c")
    for _ in range(10):
        lc.started(a)
    counts = Counter(ids(lc, [a, b, c], 1000))
    assert counts["a"] == 0 and counts["b"] > 300 and counts["c"] > 300
    for _ in range(10):
        lc.finished(a, 0.01, True)
    assert Counter(ids(lc, [a, b, c], 1000))["a"] > 200


def test_least_conn_follows_in_flight_per_unit_of_weight() -> None:
    lc = make_strategy("least_conn", seed=2)
    a, b = eps("a", "b", b=3)
    assert ids(lc, [a, b], 50) == "b" * 50  # a tie at nothing in flight: the heavier
    for _ in range(3):
        lc.started(b)  # b: 4/3 per unit of weight against a: 1/1
    assert ids(lc, [a, b], 50) == "a" * 50


# -- least_time ----------------------------------------------------------------------


def simulate(
    lt: Strategy, clock: FakeClock, latency: dict[str, float], members: list[Endpoint], n: int
) -> list[str]:
    """`n` requests, one at a time, 10 ms apart; each takes its instance's latency."""
    picks = []
    for _ in range(n):
        ep = lt.pick(members)
        lt.started(ep)
        clock.now += latency[ep.instance_id]
        lt.finished(ep, latency[ep.instance_id], True)
        clock.now += 0.010
        picks.append(ep.instance_id)
    return picks


def test_least_time_prefers_the_fast_instance_and_returns_to_a_recovered_one() -> None:
    clock = FakeClock()
    lt = make_strategy("least_time", seed=3, clock=clock)
    members = eps("fast", "slow")
    latency = {"fast": 0.010, "slow": 0.200}
    picks = simulate(lt, clock, latency, members, 3000)  # about 60 s
    assert picks.count("slow") < 10  # the first probes, then one every ~30 s
    assert "slow" in picks[1000:]  # decay: it is probed again, not starved

    latency["slow"] = 0.010
    picks = simulate(lt, clock, latency, members, 3000)
    assert picks[1500:].count("slow") > 500  # back to a fair share once fast again


def test_least_time_weighs_latency_by_requests_in_flight() -> None:
    clock = FakeClock()
    lt = make_strategy("least_time", seed=4, clock=clock)
    fast, slower = eps("fast", "slower")
    for ep, seconds in ((fast, 0.010), (slower, 0.030)):
        lt.started(ep)
        lt.finished(ep, seconds, True)
    assert ids(lt, [fast, slower], 20) == "fast" * 20
    for _ in range(5):
        lt.started(fast)  # 10 ms x 6 against 30 ms x 1
    assert lt.pick([fast, slower]).instance_id == "slower"


def test_least_time_nobody_starves() -> None:
    clock = FakeClock()
    lt = make_strategy("least_time", seed=5, clock=clock)
    members = eps("a", "b", "c", "d")
    latency = {"a": 0.005, "b": 0.020, "c": 0.080, "d": 0.300}
    simulate(lt, clock, latency, members, 1000)
    for _ in range(3):  # three windows of about 60 s each
        counts = Counter(simulate(lt, clock, latency, members, 4000))
        assert set(counts) == set(latency)
        assert counts["a"] > counts["b"] > counts["d"]


def test_least_time_probes_a_new_instance_one_request_at_a_time() -> None:
    clock = FakeClock()
    lt = make_strategy("least_time", seed=6, clock=clock)
    a, b, new = eps("a", "b", "n")
    simulate(lt, clock, {"a": 0.01, "b": 0.01}, [a, b], 100)
    assert ids(lt, [a, b, new], 30).count("n") > 10  # it costs 0 until it has answered
    lt.started(new)
    assert "n" not in ids(lt, [a, b, new], 200)  # its probe is out: wait for the answer
    lt.finished(new, 0.005, True)  # answered, and faster than the others
    assert ids(lt, [a, b, new], 30).count("n") > 10


def test_least_time_does_not_prefer_an_instance_that_fails_fast() -> None:
    clock = FakeClock()
    lt = make_strategy("least_time", seed=7, clock=clock)
    good, failing = eps("good", "failing")
    lt.finished(good, 0.050, True)
    lt.finished(failing, 0.001, False)
    clock.now += 1
    assert ids(lt, [good, failing], 50) == "good" * 50


def burst(
    lt: Strategy,
    clock: FakeClock,
    latency: dict[str, float],
    members: list[Endpoint],
    clients: int,
    seconds: float,
) -> tuple[Counter[str], Counter[str]]:
    """`clients` concurrent clients, each sending its next request as soon as the last
    is answered, for `seconds`: the requests answered and those still waiting, by
    instance."""
    end = clock.now + seconds
    answered: Counter[str] = Counter()
    out: list[tuple[float, int, Endpoint]] = []
    for client in range(clients):
        ep = lt.pick(members)
        lt.started(ep)
        heapq.heappush(out, (clock.now + latency[ep.instance_id], client, ep))
    while out[0][0] <= end:
        clock.now, client, ep = heapq.heappop(out)
        lt.finished(ep, latency[ep.instance_id], True)
        answered[ep.instance_id] += 1
        ep = lt.pick(members)
        lt.started(ep)
        heapq.heappush(out, (clock.now + latency[ep.instance_id], client, ep))
    return answered, Counter(ep.instance_id for _, _, ep in out)


def test_least_time_an_instance_that_went_quiet_and_slow_takes_no_whole_burst() -> None:
    # The probe's case: three instances at 5 ms, a quiet spell during which every
    # estimate decays toward zero and "a" turns slow, then a burst of 20 clients.
    clock = FakeClock()
    lt = make_strategy("least_time", seed=8, clock=clock)
    members = eps("a", "b", "c")
    latency = {"a": 0.005, "b": 0.005, "c": 0.005}
    simulate(lt, clock, latency, members, 200)
    clock.now += 40
    latency["a"] = 20.0
    answered, waiting = burst(lt, clock, latency, members, clients=20, seconds=6)
    assert waiting["a"] <= 10  # about its share of the first requests, not all 20
    assert answered["b"] + answered["c"] > 10_000  # the others kept serving


def test_least_time_a_held_connection_is_load_but_not_a_wait() -> None:
    # A relayed connection has its answer (`connected`): however long it is held,
    # its instance is not "overdue", only loaded by it.
    clock = FakeClock()
    lt = make_strategy("least_time", seed=9, clock=clock)
    big, small = eps("big", "small", big=3)
    for ep in (big, small):
        lt.started(ep)
        lt.finished(ep, 0.010, True)
    lt.started(big)
    clock.now += 0.010
    lt.connected(big, 0.010)
    clock.now += 60  # held a minute: 10 ms x 2 / 3 against 10 ms x 1, both decayed
    assert ids(lt, [big, small], 20).count("big") > 5
    lt.closed(big, 0.010, True)
    assert lt.tracked() == 2


# -- hash ----------------------------------------------------------------------------


def test_hash_is_sticky_and_spreads_keys_evenly() -> None:
    h = make_strategy("hash")
    members = eps("a", "b", "c")
    first = owners(h, members)
    assert owners(h, list(reversed(members))) == first
    assert owners(make_strategy("hash"), members) == first  # another gateway replica
    for share in Counter(first.values()).values():
        assert 250 <= share <= 420  # 333 each if perfectly even


def test_hash_moves_only_the_keys_of_the_instance_that_left_or_came() -> None:
    h = make_strategy("hash")
    members = eps("a", "b", "c", "d")
    before = owners(h, members)
    after = owners(h, [ep for ep in members if ep.instance_id != "b"])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "b"} and 150 < len(moved) < 350
    back = owners(h, members)
    assert back == before  # and when it returns, exactly its keys come back


def test_hash_is_the_same_in_every_process() -> None:
    h = make_strategy("hash")
    # crc32 and blake2b, not Python's per-process str hash: fixed for good.
    assert ids(h, eps("a", "b", "c"), 1, key="session-42") == "c"
    assert "".join(h.pick(eps("a", "b", "c"), f"k{i}").instance_id for i in range(12)) == (
        "caaabbababbc"
    )


def test_hash_spreads_by_weight_and_round_robins_without_a_key() -> None:
    h = make_strategy("hash")
    shares = Counter(owners(h, eps("a", "b", a=3)).values())
    assert 650 < shares["a"] < 850
    assert ids(h, eps("a", "b", "c"), 9) == "abc" * 3


def test_hash_honours_weights_above_64() -> None:
    shares = Counter(owners(make_strategy("hash"), eps("a", "b", a=200, b=100)).values())
    assert 600 < shares["a"] < 730  # 667 if exact (a ring capped both at 64: 500)


def test_hash_of_200_weighted_instances_moves_only_their_keys() -> None:
    h = make_strategy("hash")
    members = many(200)
    before = owners(h, members)
    gone = {members[7].instance_id, members[150].instance_id}
    after = owners(h, [ep for ep in members if ep.instance_id not in gone])
    assert {k for k in KEYS if before[k] != after[k]} == {k for k in KEYS if before[k] in gone}
    assert owners(h, members) == before
    # What a set maps to does not depend on the sets seen before (instances came,
    # went, both): a replica that saw none of them (a fresh strategy) agrees.
    for changed in (members[:-1], members[:100], members[:101], members[1:101], members[5:]):
        assert owners(h, changed) == owners(make_strategy("hash"), changed)


def test_hash_state_of_a_candidate_set_is_small() -> None:
    # A ring of 160 points per unit of weight held ~100 MB for this set and took
    # seconds to build; the slot table is a list of `SLOTS` references.
    h = make_strategy("hash")
    members = [Endpoint(f"i{k}", f"10.2.0.{k}:80", 1000) for k in range(200)]
    tracemalloc.start()
    try:
        h.pick(members, "k")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1_000_000
