"""Helpers of the balancing strategies' tests (`tests/common/test_balancing*.py`)."""

from __future__ import annotations

from common.balancing import Endpoint, Strategy


def eps(*names: str, **weights: int) -> list[Endpoint]:
    return [Endpoint(n, f"10.0.0.{i}:80", weights.get(n, 1)) for i, n in enumerate(names)]


def ids(strategy: Strategy, candidates: list[Endpoint], n: int, key: str | None = None) -> str:
    return "".join(strategy.pick(candidates, key).instance_id for _ in range(n))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def many(n: int) -> list[Endpoint]:
    return [Endpoint(f"i{k:03}", f"10.1.{k // 250}.{k % 250}:80", 1 + k * 37 % 1000)
            for k in range(n)]  # fmt: skip


# The keys the hash strategy's tests place.
KEYS = [f"user-{i}" for i in range(1000)]


def owners(strategy: Strategy, candidates: list[Endpoint]) -> dict[str, str]:
    return {k: strategy.pick(candidates, k).instance_id for k in KEYS}
