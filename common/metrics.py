"""In-process metrics: per-method counters and latency histograms.

Deliberately tiny and allocation-free on the hot path (an index lookup and two
increments per observation). Exposition to Prometheus (`/metrics`) is the
gateway's job and uses prometheus-client; this is what a worker reads about
itself (`Worker.snapshot()`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

# Upper bounds in seconds: from sub-millisecond RPCs to ML models taking seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


@dataclass(slots=True)
class Histogram:
    """Cumulative-free bucket counts (the last bucket is +Inf), with sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (None when empty or in +Inf)."""
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        for bound, n in zip(LATENCY_BUCKETS, self.counts, strict=False):
            seen += n
            if seen >= rank:
                return bound
        return None

    def snapshot(self) -> dict[str, Any]:
        buckets = {str(b): n for b, n in zip(LATENCY_BUCKETS, self.counts, strict=False)}
        buckets["+Inf"] = self.counts[-1]
        return {"count": self.count, "sum": self.total, "buckets": buckets}


@dataclass(slots=True)
class MethodStats:
    """What one method of a worker has done since start."""

    calls: int = 0
    errors: int = 0
    latency: Histogram = field(default_factory=Histogram)

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "p50": self.latency.quantile(0.5),
            "p99": self.latency.quantile(0.99),
            "latency": self.latency.snapshot(),
        }
