"""Balancing strategies (design §5): pure, deterministic, no Redis, no sleeps."""

from __future__ import annotations

import ast
import heapq
import random
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from common.balancing import STRATEGIES, Endpoint, Strategy, make_strategy, select_version
from common.compiled import source_path

pytestmark = pytest.mark.timeout(30)


def eps(*names: str, **weights: int) -> list[Endpoint]:
    return [Endpoint(n, f"10.0.0.{i}:80", weights.get(n, 1)) for i, n in enumerate(names)]


def ids(strategy: Strategy, candidates: list[Endpoint], n: int, key: str | None = None) -> str:
    return "".join(strategy.pick(candidates, key).instance_id for _ in range(n))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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

KEYS = [f"user-{i}" for i in range(1000)]


def owners(strategy: Strategy, candidates: list[Endpoint]) -> dict[str, str]:
    return {k: strategy.pick(candidates, k).instance_id for k in KEYS}


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


def many(n: int) -> list[Endpoint]:
    return [Endpoint(f"i{k:03}", f"10.1.{k // 250}.{k % 250}:80", 1 + k * 37 % 1000)
            for k in range(n)]  # fmt: skip


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


# -- random, select_version, errors, state -------------------------------------------


def test_random_covers_all_in_proportion_to_weight() -> None:
    r = make_strategy("random", seed=8)
    assert set(ids(r, eps("a", "b", "c", "d"), 200)) == {"a", "b", "c", "d"}
    counts = Counter(ids(r, eps("a", "b", a=3), 4000))
    assert 2800 < counts["a"] < 3200
    first, again = make_strategy("random", seed=9), make_strategy("random", seed=9)
    assert ids(first, eps("a", "b", "c"), 100) == ids(again, eps("a", "b", "c"), 100)


def test_select_version() -> None:
    members = [Endpoint("a", "h:1", version="v1"), Endpoint("b", "h:2", version="v2")]
    assert select_version(members, None) == members
    assert select_version(members, "v2") == [members[1]]
    assert select_version(members, "v3") == []


def test_unknown_strategy_or_option_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="round_robin, weighted, least_conn"):
        make_strategy("fastest")
    with pytest.raises(ValueError, match="valid: seed"):
        make_strategy("least_conn", decay=1.0)
    with pytest.raises(ValueError, match="decay"):
        make_strategy("least_time", decay=0)
    with pytest.raises(ValueError, match="slots"):
        make_strategy("hash", slots="many")


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_rejects_no_candidates_and_takes_a_lone_one(name: str) -> None:
    strategy = make_strategy(name)
    for key in (None, "k"):
        with pytest.raises(ValueError, match="no candidates"):
            strategy.pick([], key)
        (only,) = eps("only")
        assert strategy.pick([only], key) == only
        strategy.started(only)
        strategy.finished(only, 0.01, True)


@pytest.mark.parametrize("name", ["round_robin", "weighted", "hash", "random"])
def test_state_per_candidate_set_is_bounded(name: str) -> None:
    strategy = make_strategy(name)
    for i in range(100):
        strategy.pick(eps(f"a{i}", f"b{i}"), "k")
        strategy.pick(eps(f"a{i}", f"b{i}"))
    assert 0 < strategy.tracked() <= 32


@contextmanager
def comparisons() -> Iterator[list[int]]:
    """Counts the field-by-field comparisons of endpoints made meanwhile: the calls of
    `Endpoint.__eq__`, which `dataclass` writes in Python whether or not the module is
    compiled (a compiled class cannot be subclassed here to count them)."""
    code, counted = Endpoint.__eq__.__code__, [0]

    def count(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is code:
            counted[0] += 1

    sys.setprofile(count)
    try:
        yield counted
    finally:
        sys.setprofile(None)


@pytest.mark.parametrize("name", ["round_robin", "weighted", "hash", "random"])
def test_equal_endpoints_made_anew_are_compared_once_not_at_every_pick(name: str) -> None:
    # `BalancingPolicy` makes an instance's endpoint anew when it left and came back
    # with the same record (after a Redis outage, say): equal to the one before, a new
    # object. (While a record stays, its endpoint stays the same object:
    # tests/webapi/test_proxy_churn.py.)
    def made() -> list[Endpoint]:
        return [Endpoint(f"i{k}", f"10.0.0.{k}:80") for k in range(20)]

    strategy = make_strategy(name)
    strategy.pick(made(), "k")
    anew = made()
    with comparisons() as compared:
        for _ in range(50):
            strategy.pick(list(anew), "k")
    assert 0 < compared[0] <= 20  # the set once, then identity (was 20 a pick)


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_of_departed_instances_is_forgotten(name: str) -> None:
    # Instances come and go (a rolling deploy): what is kept is of the live ones alone.
    strategy = make_strategy(name)
    staying = eps("s0", "s1")
    for wave in range(20):
        members = [*staying, *(Endpoint(f"w{wave}-{i}", f"10.9.{wave}.{i}:80") for i in range(3))]
        for n in range(12):
            for candidates in (members, members[:-1]):  # (an ejection: another set)
                ep = strategy.pick(candidates, f"k{n}")
                strategy.started(ep)
                strategy.finished(ep, 0.01, True)
        strategy.forget_departed({ep.instance_id for ep in staying})
    strategy.pick(staying, "k")
    # One set (of the live instances) or the live instances themselves; least_conn
    # only counts requests in flight.
    assert strategy.tracked() <= (0 if name == "least_conn" else 2)


def test_least_time_keeps_a_departed_instance_while_it_has_requests_in_flight() -> None:
    lt = make_strategy("least_time")
    a, b = eps("a", "b")
    for ep in (a, b):
        lt.started(ep)
    lt.finished(a, 0.01, True)
    lt.forget_departed(set())
    assert lt.tracked() == 1  # b's request still counts until it ends
    lt.finished(b, 0.01, True)
    lt.forget_departed(set())
    assert lt.tracked() == 0


def test_hash_after_a_departure_is_the_same_as_a_fresh_strategys() -> None:
    h = make_strategy("hash")
    members = many(50)
    before = owners(h, members)
    h.forget_departed({ep.instance_id for ep in members[1:]})
    after = owners(h, members[1:])
    assert after == owners(make_strategy("hash"), members[1:])
    assert {k for k in KEYS if before[k] != after[k]} == {
        k for k in KEYS if before[k] == members[0].instance_id
    }


def test_least_conn_keeps_state_only_while_requests_are_in_flight() -> None:
    lc = make_strategy("least_conn")
    for ep in eps(*(f"i{n}" for n in range(50))):
        lc.started(ep)
        lc.started(ep)
        assert lc.tracked() == 1
        lc.finished(ep, 0.1, True)
        lc.finished(ep, 0.1, False)
        lc.finished(ep, 0.1, True)  # one too many does no harm
    assert lc.tracked() == 0


def test_least_time_forgets_instances_not_seen_for_a_while() -> None:
    clock = FakeClock()
    lt = make_strategy("least_time", clock=clock, forget_after=60.0)
    members = eps(*(f"i{n}" for n in range(50)))
    for ep in members:
        lt.started(ep)
        lt.finished(ep, 0.01, True)
    busy = members[0]
    lt.started(busy)
    assert lt.tracked() == 50
    clock.now += 59
    lt.pick(members[:2])
    assert lt.tracked() == 50
    clock.now += 62
    lt.pick(members[:2])
    assert lt.tracked() == 1  # only the one with a request still in flight


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_strategys_options_are_its_init_keywords(name: str) -> None:
    """`make_strategy` checks options against `Strategy.options`, not the signature:
    compiled by mypyc, a class has none `inspect` can read (it read as no option at all,
    and least_time's `decay`, which the gateway passes, was refused). Read from the
    source, which the compiled build is made of."""
    cls = type(make_strategy(name))
    keywords: list[str] = []
    for klass in cls.__mro__:
        source = sys.modules[klass.__module__].__file__
        if klass is object or source is None:
            continue
        path = Path(source)
        if path.suffix != ".py":  # the compiled build: its source in the checkout
            path = source_path(klass.__module__)
        tree = ast.parse(path.read_text())
        inits = [node for top in tree.body if isinstance(top, ast.ClassDef)
                 and top.name == klass.__name__ for node in top.body
                 if isinstance(node, ast.FunctionDef) and node.name == "__init__"]  # fmt: skip
        if inits:
            keywords = [arg.arg for arg in inits[0].args.kwonlyargs]
            break
    assert tuple(keywords) == cls.options
    # Each is taken (with its default where it has one; a clock must be callable).
    values: dict[str, Any] = {"seed": 1, "clock": time.monotonic, "slots": 64, "decay": 2.0,
                              "failure_penalty": 0.1, "forget_after": 60.0}  # fmt: skip
    for option in cls.options:
        assert type(make_strategy(name, **{option: values[option]})) is cls
