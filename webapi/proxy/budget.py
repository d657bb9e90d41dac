"""A retry budget: retries may add at most `ratio` extra load (plus a small floor).

Each request deposits `ratio` of a token; each retry spends one. Under a
failure storm retries stop as soon as the deposits run out, so the proxy never
multiplies the load on struggling upstreams (Envoy's and Finagle's approach).
"""

from __future__ import annotations


class RetryBudget:
    def __init__(self, ratio: float = 0.2, floor: float = 10.0, cap: float = 100.0) -> None:
        self.ratio, self.cap = ratio, cap
        self.tokens = floor

    def deposit(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
