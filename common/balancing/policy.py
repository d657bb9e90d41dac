"""Which strategy balances each service, read live from Redis, and endpoints from records.

Shared by everything that routes to registered instances (the gateway's proxy,
the websocket relay): the per-service strategy names in `sb:policy:balancing`
are re-read every `interval` (a changed name re-creates that service's
strategy; Redis unreachable keeps the last known policy), and registry records
become `Endpoint`s once per instance, not once per request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from common import constants
from common.aio import cancelling
from common.balancing import STRATEGIES, Endpoint, Strategy, make_strategy
from common.connection import REDIS_DOWN_ERRORS, as_text
from common.registry import InstanceRecord

DEFAULT_STRATEGY = "round_robin"


class BalancingPolicy:
    """The strategy of each service, changeable at runtime."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        interval: float = 1.0,
        options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.redis = redis
        self.interval = interval
        self.options = options or {}  # per strategy name, e.g. {"least_time": {"decay": 2}}
        self._names: dict[str, str] = {}
        self._strategies: dict[str, Strategy] = {}
        self._endpoints: dict[str, Endpoint] = {}

    def strategy(self, service: str) -> Strategy:
        """The service's strategy object (hot path: a dict lookup)."""
        strategy = self._strategies.get(service)
        if strategy is None:
            name = self._names.get(service, DEFAULT_STRATEGY)
            strategy = make_strategy(name, **self.options.get(name, {}))
            self._strategies[service] = strategy
        return strategy

    def endpoint(self, record: InstanceRecord) -> Endpoint:
        """The `Endpoint` of a registry record, cached per instance."""
        endpoint = self._endpoints.get(record.instance_id)
        if endpoint is None:
            endpoint = Endpoint(
                instance_id=record.instance_id,
                address=record.address or "",
                weight=record.weight,
                version=record.version,
                zone=record.zone,
            )
            self._endpoints[record.instance_id] = endpoint
        return endpoint

    def forget_endpoints(self, service: str | None = None) -> None:
        """Drop cached endpoints (a registry change may have changed weights or versions)."""
        self._endpoints.clear()

    async def watch(self) -> None:
        """Keep the per-service strategy names current from Redis."""
        while not cancelling():
            try:
                raw = await self.redis.hgetall(constants.BALANCING)
                pairs = {as_text(k): as_text(v) for k, v in raw.items()}
                names = {k: v for k, v in pairs.items() if v in STRATEGIES}
                for service in set(names) | set(self._names):
                    if names.get(service) != self._names.get(service):
                        self._strategies.pop(service, None)
                self._names = names
            except REDIS_DOWN_ERRORS:
                pass  # keep the last known policy
            await asyncio.sleep(self.interval)
