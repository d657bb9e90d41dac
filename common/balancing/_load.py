"""Strategies that follow the load: least_conn and least_time (power of two choices).

Both sample two distinct candidates at random and take the less loaded, which
spreads load nearly as well as scanning all of them, in O(1), and without the
herd that "always the least loaded" sends to one instance between updates.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Sequence

from common.balancing._base import Endpoint, Strategy, no_candidates


def _two(candidates: Sequence[Endpoint], n: int, bits: int) -> tuple[Endpoint, Endpoint]:
    """Two distinct candidates, both indices from one 32-bit draw (bias below 1e-7)."""
    i = bits % n
    j = bits // n % (n - 1)
    return candidates[i], candidates[j + 1 if j >= i else j]


class LeastConn(Strategy):
    """Fewer requests in flight per unit of weight wins; ties to the heavier, then at random."""

    name = "least_conn"
    options = ("seed",)

    def __init__(self, *, seed: int | None = None) -> None:
        self._bits = random.Random(seed).getrandbits
        self._inflight: dict[str, int] = {}  # only instances with requests in flight

    def pick(self, candidates: Sequence[Endpoint], key: str | None = None) -> Endpoint:
        n = len(candidates)
        if n < 2:
            if n:
                return candidates[0]
            raise no_candidates()
        a, b = _two(candidates, n, self._bits(32))
        get = self._inflight.get
        # (in flight + 1) / weight, cross-multiplied; on a tie `a`, the first of a random pair.
        if (get(b.instance_id, 0) + 1) * a.weight < (get(a.instance_id, 0) + 1) * b.weight:
            return b
        return a

    def started(self, ep: Endpoint) -> None:
        self._inflight[ep.instance_id] = self._inflight.get(ep.instance_id, 0) + 1

    def finished(self, ep: Endpoint, seconds: float, ok: bool) -> None:
        left = self._inflight.pop(ep.instance_id, 0) - 1
        if left > 0:
            self._inflight[ep.instance_id] = left

    def tracked(self) -> int:
        return len(self._inflight)


class _Latency:
    __slots__ = ("cost", "inflight", "since", "stamp", "touched", "waiting")

    def __init__(self, now: float) -> None:
        self.cost = 0.0  # peak-EWMA latency in seconds, as of `stamp`
        self.stamp = now  # when `cost` was last set
        self.inflight = 0  # requests waiting for their answer, and connections held
        self.waiting = 0  # of those, the requests waiting for their answer
        self.since = now  # the instance's last answer, or when it began to be waited on
        self.touched = now  # last started/finished, for forgetting


# Load of an instance that has never answered but has a request in flight: above any
# measured load, so a new instance gets one probe at a time until it answers (Finagle).
PENALTY = 1e9


class LeastTime(Strategy):
    """Power of two choices on peak-EWMA latency x (in flight + 1) / weight.

    The estimate follows Finagle's and linkerd's PeakEwma, written in closed form:
    an observation above the current estimate replaces it at once (the peak), and
    the estimate decays toward zero with time constant `decay` (10 s), so it reads
    `max(latency_i * exp(-(now - t_i) / decay))` over past observations. While
    requests flow this tracks recent latency (a 200 ms instance now answering in
    10 ms is back at 10 ms after decay x ln 20, 30 s); when an instance gets no
    traffic its cost keeps falling until it is cheaper than the others and gets a
    probe, whose answer sets the cost again: no instance starves, and a slow one
    costs a probe every ~decay x ln(slow / fast) seconds. Decaying toward zero
    rather than toward the others' median keeps each instance's estimate its own.
    What stops a decayed instance from taking a burst is the wait: while requests
    wait for an instance's answer, the time since its last answer (or since it was
    first waited on) is a latency it is showing now, and its cost is at least that.
    So an instance that went quiet and slow costs more with every moment its first
    requests of a burst go unanswered (the others' answers set their costs within
    their latency), and gets about its share of the burst, as with least_conn, not
    all of it. A connection the caller holds (`connected`) has its answer: it adds
    to the load until `closed`, but is not waited on.

    A new (or forgotten) instance costs 0, so it is probed at once, one request at
    a time until it answers. A failure counts as at least `failure_penalty`
    seconds, so an instance that fails fast does not look fastest. State of an
    instance untouched for `forget_after` seconds with nothing in flight is dropped,
    and so is that of an instance gone from the registry (`forget_departed`), at once.
    """

    name = "least_time"
    options = ("decay", "failure_penalty", "forget_after", "seed", "clock")

    def __init__(
        self,
        *,
        decay: float = 10.0,
        failure_penalty: float = 0.5,
        forget_after: float = 300.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not decay > 0 or not forget_after > 0 or not failure_penalty >= 0:
            raise ValueError("decay and forget_after must be > 0, failure_penalty >= 0")
        self._decay = decay
        self._failure_penalty = failure_penalty
        self._forget_after = forget_after
        self._bits = random.Random(seed).getrandbits
        self._clock = clock
        self._stats: dict[str, _Latency] = {}
        self._next_sweep = clock() + forget_after

    def _load(self, ep: Endpoint, now: float) -> float:
        s = self._stats.get(ep.instance_id)
        if s is None:
            return 0.0
        cost = s.cost * math.exp((s.stamp - now) / self._decay)
        if cost == 0.0 and s.inflight:
            return PENALTY + s.inflight
        if s.waiting and now - s.since > cost:  # overdue: it shows that latency now
            cost = now - s.since
        return cost * (s.inflight + 1) / ep.weight

    def pick(self, candidates: Sequence[Endpoint], key: str | None = None) -> Endpoint:
        n = len(candidates)
        if n < 2:
            if n:
                return candidates[0]
            raise no_candidates()
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        a, b = _two(candidates, n, self._bits(32))
        return b if self._load(b, now) < self._load(a, now) else a

    def _stat(self, ep: Endpoint, now: float) -> _Latency:
        s = self._stats.get(ep.instance_id)
        if s is None:
            s = self._stats[ep.instance_id] = _Latency(now)
        s.touched = now
        return s

    def started(self, ep: Endpoint) -> None:
        now = self._clock()
        s = self._stat(ep, now)
        s.inflight += 1
        if not s.waiting:
            s.since = now
        s.waiting += 1

    def finished(self, ep: Endpoint, seconds: float, ok: bool) -> None:
        now = self._clock()
        s = self._stat(ep, now)
        if s.inflight:
            s.inflight -= 1
        if s.waiting:
            s.waiting -= 1
        # `_learn`, written out: this runs once per request.
        latency = seconds if seconds > 0 else 0.0  # also maps NaN to 0
        if not ok:
            latency = max(latency, self._failure_penalty)
        current = s.cost * math.exp((s.stamp - now) / self._decay)
        s.cost = max(latency, current)
        s.stamp = s.since = now

    def connected(self, ep: Endpoint, seconds: float) -> None:
        now = self._clock()
        s = self._stat(ep, now)
        if s.waiting:
            s.waiting -= 1
        s.since = now
        self._learn(s, now, seconds, True)

    def closed(self, ep: Endpoint, seconds: float, ok: bool) -> None:
        now = self._clock()
        s = self._stat(ep, now)
        if s.inflight:
            s.inflight -= 1
        self._learn(s, now, seconds, ok)

    def _learn(self, s: _Latency, now: float, seconds: float, ok: bool) -> None:
        """The estimate takes in `seconds` (as `finished` does)."""
        latency = seconds if seconds > 0 else 0.0  # also maps NaN to 0
        if not ok:
            latency = max(latency, self._failure_penalty)
        current = s.cost * math.exp((s.stamp - now) / self._decay)
        s.cost = max(latency, current)
        s.stamp = now

    def forget_departed(self, live: Collection[str]) -> None:
        # One with requests still in flight keeps its count until they end (then the
        # sweep drops it): it may be back, as an instance whose lease lapsed once.
        stats = self._stats
        for k in [k for k, s in stats.items() if k not in live and not s.inflight]:
            del stats[k]

    def _sweep(self, now: float) -> None:
        horizon = now - self._forget_after
        stale = [k for k, s in self._stats.items() if not s.inflight and s.touched < horizon]
        for k in stale:
            del self._stats[k]
        self._next_sweep = now + self._forget_after

    def tracked(self) -> int:
        return len(self._stats)
