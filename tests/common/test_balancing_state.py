"""Balancing strategies (design §5): random, version selection, errors, and the state
each keeps (bounded, forgotten with its instances). Pure: no Redis, no sleeps."""

from __future__ import annotations

import ast
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from common.balancing import STRATEGIES, Endpoint, make_strategy, select_version
from common.compiled import source_path
from tests.support.balancing import KEYS, FakeClock, eps, ids, many, owners

pytestmark = pytest.mark.timeout(30)


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
