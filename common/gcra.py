"""GCRA, the generic cell rate algorithm: its values and its in-process form.

GCRA keeps one number per key, the *theoretical arrival time* (TAT): with
emission interval `T = period / rate` and burst `B`, a request is allowed when
`TAT - now <= (B - 1) * T`, and then moves the TAT on by `T`. A fresh key
therefore allows exactly `B` requests back to back, then one every `T`. Times
are whole microseconds, so the arithmetic is exact.

`common.ratelimit` runs it in Redis for every replica at once; `LocalGcra` is
the same algorithm in one process, for when Redis is unreachable.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

# A TAT (us since the epoch, about 2**51 today) is exact in a Lua double below 2**53:
# windows (burst * interval) up to 2**50 us, about 35 years, leave room.
_MAX_WINDOW_US = 2**50


def window_error(rate: int, period: float, burst: int) -> str | None:
    """Why `Limit(rate, period, burst)` would be refused, or None when it would not.

    The one rule: the policy validator asks it too, so a limit it accepts can be built.
    """
    if rate < 1 or not 0 < period < float("inf") or burst < 1:
        return "rate >= 1, period > 0, burst >= 1"
    if _interval_us(rate, period) * burst > _MAX_WINDOW_US:
        return (
            f"burst * period / rate ({burst * period / rate:.0f} s) is longer than the "
            f"longest window the rate limiter keeps ({_MAX_WINDOW_US // 1_000_000} s, "
            "about 35 years)"
        )
    return None


def _interval_us(rate: int, period: float) -> int:
    return max(1, round(period * 1_000_000 / rate))


@dataclass(frozen=True, slots=True)
class Limit:
    """`rate` requests per `period` seconds, `burst` (>= 1) of them back to back.

    The emission interval is kept in whole microseconds (at least 1).
    """

    rate: int
    period: float
    burst: int
    _t_us: int = field(init=False, repr=False, compare=False)
    _tau_us: int = field(init=False, repr=False, compare=False)
    _argv: str = field(init=False, repr=False, compare=False)  # "T tau" for the script

    def __post_init__(self) -> None:
        error = window_error(self.rate, self.period, self.burst)
        if error:
            raise ValueError(f"invalid limit {self!r}: {error}")
        t_us = _interval_us(self.rate, self.period)
        object.__setattr__(self, "_t_us", t_us)
        object.__setattr__(self, "_tau_us", (self.burst - 1) * t_us)
        object.__setattr__(self, "_argv", f"{t_us} {(self.burst - 1) * t_us}")

    @property
    def interval(self) -> float:
        """Seconds between two requests once the burst is spent."""
        return self.period / self.rate


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one request, from its most restrictive check.

    `limit` is that check's burst, `remaining` how many more requests it would
    allow right now, `reset` the seconds until it is full again and
    `retry_after` the seconds until this request would be allowed (0 when it is).
    """

    allowed: bool
    limit: int
    remaining: int
    reset: float
    retry_after: float


# What `check([])` answers: nothing to enforce.
NO_LIMIT = Decision(allowed=True, limit=0, remaining=0, reset=0.0, retry_after=0.0)

Checks = Sequence[tuple[str, Limit]]


class LocalGcra:
    """The same GCRA as the script, in this process alone (used while Redis is down).

    At most `max_keys` keys are kept: past that, keys whose bucket is full again
    are dropped, then the oldest ones (a dropped key starts afresh).
    """

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max(1, max_keys)
        self._tats: dict[str, int] = {}

    def clear(self) -> None:
        self._tats = {}

    def check(self, checks: Checks) -> Decision:
        """Hot path while Redis is down: mirrors `common.ratelimit.GCRA_SCRIPT` for one request."""
        now = time.monotonic_ns() // 1000
        tats = self._tats
        pending: dict[str, int] = {}
        ok = True
        best = (-1, 0, 0, 0)  # retry, -remaining, reset, limit: the largest is the most restrictive
        for key, limit in checks:
            t, tau = limit._t_us, limit._tau_us
            tat = pending.get(key) or tats.get(key, 0)
            if tat < now:
                tat = now
            if tat - now > tau:
                ok = False
                candidate = (tat - now - tau, 0, tat - now, limit.burst)
            else:
                pending[key] = tat + t
                reset = tat + t - now
                candidate = (0, -((tau - reset) // t + 1), reset, limit.burst)
            if candidate[:3] > best[:3]:
                best = candidate
        if ok:
            tats.update(pending)
            if len(tats) > self.max_keys:
                self._prune(now)
        retry, neg_remaining, reset, burst = best
        return Decision(ok, burst, -neg_remaining, reset / 1e6, retry / 1e6)

    def _prune(self, now: int) -> None:
        # Down to 90% of the bound, so the O(n) sweep runs once per many inserts.
        tats = {key: tat for key, tat in self._tats.items() if tat > now}
        excess = len(tats) - self.max_keys * 9 // 10
        if excess > 0:
            for key in list(tats)[:excess]:
                del tats[key]
        self._tats = tats


__all__ = ["NO_LIMIT", "Checks", "Decision", "Limit", "LocalGcra"]
