"""Choosing an upstream instance: the balancing strategies of design §5.

`make_strategy(name, **options)` returns a `Strategy`; the gateway calls
`pick(candidates, key)` for every proxied request (hot path), then `started(ep)`
when the request goes out and `finished(ep, seconds, ok)` when it ends. Keep one
strategy object per pool of interchangeable instances (a service, or a service's
version); the candidates are that pool's healthy members, in any order, in a new
list each time if need be. Strategies are not thread-safe: one event loop each.

    round_robin  each candidate in turn, in instance-id order: exactly even
    weighted     nginx's smooth weighted round-robin (5/1/1: a a b a c a a)
    random       random, in proportion to weight
    least_conn   power of two choices on in-flight requests per unit of weight
    least_time   power of two choices on peak-EWMA latency x (in flight + 1)
    hash         consistent (weighted rendezvous) hash of `key`, sticky; round-robin without one

The first three live in `_rotation`, the next two in `_load`, hash in `_hashing`.
`HealthBook` (`_health`) narrows the candidates to the instances not ejected
after connect errors, timeouts or failure streaks; `RetryBudget` (`_budget`)
bounds how many failed tries may be retried elsewhere.
`weight` is relative capacity everywhere; values below 1 count as 1. State is
bounded: per candidate set, the 16 sets used last; per instance, only while requests
are in flight (least_conn) or for `forget_after` seconds after the last request
(least_time). `forget_departed(live)` drops, at once, what is kept of instances no
longer registered (the sets holding one, their latency); `BalancingPolicy.follow`
calls it at each change of a service's instances, so instances that come and go
leave nothing behind.
"""

from __future__ import annotations

from typing import Any

from common.compiled import prefer_compiled

# Before any submodule is imported: the compiled build, when fresh (`common.compiled`).
prefer_compiled(__name__, __path__)

from common.balancing._base import Endpoint, Strategy, select_version  # noqa: E402
from common.balancing._budget import RetryBudget  # noqa: E402
from common.balancing._hashing import ConsistentHash  # noqa: E402
from common.balancing._health import HealthBook  # noqa: E402
from common.balancing._load import LeastConn, LeastTime  # noqa: E402
from common.balancing._rotation import RandomChoice, RoundRobin, Weighted  # noqa: E402

__all__ = [
    "STRATEGIES",
    "Endpoint",
    "HealthBook",
    "RetryBudget",
    "Strategy",
    "make_strategy",
    "select_version",
]

_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (RoundRobin, Weighted, LeastConn, LeastTime, ConsistentHash, RandomChoice)
}
STRATEGIES: tuple[str, ...] = tuple(_CLASSES)


def make_strategy(name: str, **options: Any) -> Strategy:
    """A new strategy by name (one of `STRATEGIES`), with its keyword options.

    Options: least_conn and random take `seed`; least_time takes `decay`,
    `failure_penalty`, `forget_after`, `seed` and `clock`; hash takes `slots`.
    Raises ValueError for an unknown name, an unknown option or a bad value.
    """
    cls = _CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown balancing strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        valid = ", ".join(cls.options) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {name!r}; valid: {valid}")
    try:
        return cls(**options)
    except TypeError as exc:  # an option of the wrong type (compiled: mypyc's message)
        given = ", ".join(sorted(options))
        raise ValueError(f"bad option for {name!r} ({given}): {exc}") from exc
