"""Strategies that take turns or draw lots: round_robin, weighted, random."""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Collection, Sequence
from itertools import accumulate

from common.balancing._base import Endpoint, Pools, Strategy

# Longest smooth weighted cycle kept as a list; longer ones are stepped live, O(n) a pick.
MAX_CYCLE = 4096


class Cycle:
    """A cycle through `members`: nginx's smooth weighted round-robin, memoised.

    With equal weights the cycle is the members in order, starting at `pos`.
    Otherwise the first pass computes it (each step O(n): every current weight
    grows by its weight, the largest is picked and loses the total) and later
    passes replay it in O(1); after `total` steps the current weights are all
    zero again, so the replay is exact.
    """

    __slots__ = ("current", "members", "pos", "schedule", "total", "weights")

    def __init__(self, members: tuple[Endpoint, ...], weights: list[int], pos: int) -> None:
        gcd = math.gcd(*weights)
        self.members = members
        self.weights = [w // gcd for w in weights]
        self.total = sum(self.weights)
        self.current = [0] * len(members)
        self.schedule = list(members) if self.total == len(members) else []
        self.pos = pos if self.schedule else 0

    def next(self) -> Endpoint:
        pos = self.pos
        self.pos = pos + 1 if pos + 1 < self.total else 0
        if pos < len(self.schedule):
            return self.schedule[pos]
        current, best = self.current, 0
        for i, w in enumerate(self.weights):
            current[i] += w
            if current[i] > current[best]:
                best = i
        current[best] -= self.total
        ep = self.members[best]
        if self.total <= MAX_CYCLE:
            self.schedule.append(ep)
        return ep


class RoundRobin(Strategy):
    """Each candidate in turn, in instance-id order, whatever order they come in."""

    name = "round_robin"
    _weighted = False

    def __init__(self) -> None:
        self._pools = Pools(self._new_cycle)
        self._last_id = ""

    def _new_cycle(self, members: tuple[Endpoint, ...]) -> Cycle:
        weights = [ep.weight if self._weighted else 1 for ep in members]
        # A changed set carries on after the instance picked last, not from the top.
        after = bisect_right([ep.instance_id for ep in members], self._last_id)
        return Cycle(members, weights, after % len(members))

    def pick(self, candidates: Sequence[Endpoint], key: str | None = None) -> Endpoint:
        ep = self._pools.get(candidates).next()
        self._last_id = ep.instance_id
        return ep

    def forget_departed(self, live: Collection[str]) -> None:
        self._pools.forget_departed(live)

    def tracked(self) -> int:
        return len(self._pools)


class Weighted(RoundRobin):
    """nginx's smooth weighted round-robin: weights 5/1/1 give a a b a c a a."""

    name = "weighted"
    _weighted = True


class _Draw:
    __slots__ = ("cumulative", "members")

    def __init__(self, members: tuple[Endpoint, ...]) -> None:
        self.members = members
        weights = [ep.weight for ep in members]
        equal = min(weights) == max(weights)
        self.cumulative = None if equal else list(accumulate(weights))


class RandomChoice(Strategy):
    """Random, in proportion to weight (uniform when the weights are equal)."""

    name = "random"
    options = ("seed",)

    def __init__(self, *, seed: int | None = None) -> None:
        self._bits = random.Random(seed).getrandbits
        self._pools = Pools(_Draw)

    def pick(self, candidates: Sequence[Endpoint], key: str | None = None) -> Endpoint:
        draw = self._pools.get(candidates)
        members, cumulative = draw.members, draw.cumulative
        # 32 random bits modulo a small number: a bias below 1e-7, and twice as fast
        # as randrange.
        if cumulative is None:
            return members[self._bits(32) % len(members)]
        return members[bisect_right(cumulative, self._bits(32) % cumulative[-1])]

    def forget_departed(self, live: Collection[str]) -> None:
        self._pools.forget_departed(live)

    def tracked(self) -> int:
        return len(self._pools)
