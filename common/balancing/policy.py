"""Each service's balancing as the live policy says, and endpoints from records.

Shared by everything that routes to registered instances (the gateway's proxy,
the websocket relay). The per-service settings come from a `PolicyWatcher`'s
document (`services.<name>`): a changed strategy name re-creates that
service's strategy (a fresh one starts with no load or latency history);
unchanged services keep theirs. The service's retry budget (`retry_budget`,
else the default given) is one `RetryBudget` per service, re-limited in place
when the policy changes. Registry records become `Endpoint`s once per
instance of a service, not once per request: an endpoint stays the same object while
its record is unchanged (a resync changes nothing), and is made anew when it changes.

What is kept per instance or service follows the registry (`follow`): at each change
of a service's instances, its strategy and the health book forget the instances that
left, and a service the registry no longer has loses its strategy and retry budget.
So memory is bounded by what is registered, however many instances came and went.

Version weights (`version_weights`, tag -> weight) split the requests that
name no version: a version is drawn by weight among the weighted versions that
have a candidate left, then the strategy picks among that version's endpoints.
A version with weight 0, or not listed, gets no traffic while any weighted
version has a candidate; when none has, every candidate is used as if there
were no weights, so a rollout never turns into an outage. A request that names
a version gets that version, whatever the weights.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from typing import Any

from common.balancing import (
    Endpoint,
    HealthBook,
    RetryBudget,
    Strategy,
    make_strategy,
    select_version,
)
from common.instance_record import InstanceRecord
from common.policy import PolicyDocument, PolicyWatcher, RetryBudgetPolicy, ServicePolicy
from common.registry_view import RegistryView

DEFAULT_STRATEGY = "round_robin"


class BalancingPolicy:
    """The strategy and version split of each service, following the live policy."""

    def __init__(
        self,
        watcher: PolicyWatcher,
        *,
        options: dict[str, dict[str, Any]] | None = None,
        retry_budget: RetryBudgetPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.watcher = watcher
        self.options = options or {}  # per strategy name, e.g. {"least_time": {"decay": 2}}
        # For services whose policy sets no `retry_budget`.
        self.default_retry_budget = retry_budget or RetryBudgetPolicy()
        self._rng = rng or random.Random()
        self._services: dict[str, ServicePolicy] = {}
        self._strategies: dict[str, Strategy] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._endpoints: dict[str, dict[str, Endpoint]] = {}  # service -> instance id ->
        self._live: dict[str, frozenset[str]] = {}  # service -> its instance ids, as `follow` saw
        self._apply(watcher.current)
        watcher.on_change(self._apply)

    def service_policy(self, service: str) -> ServicePolicy | None:
        """The service's entry in the current policy, None if it has none (hot path)."""
        return self._services.get(service)

    def hash_on(self, service: str) -> str | None:
        """Where the service's sticky key comes from (`common.balancing.sticky`), None
        for the default `X-Balance-Key` header (hot path: a dict lookup)."""
        settings = self._services.get(service)
        return settings.hash_on if settings else None

    def strategy(self, service: str) -> Strategy:
        """The service's strategy object (hot path: a dict lookup)."""
        strategy = self._strategies.get(service)
        if strategy is None:
            settings = self._services.get(service)
            name = settings.strategy if settings else DEFAULT_STRATEGY
            strategy = make_strategy(name, **self.options.get(name, {}))
            self._strategies[service] = strategy
        return strategy

    def retry_budget(self, service: str) -> RetryBudget:
        """The service's retry budget, with the limits the live policy sets (hot path:
        a dict lookup). Ask only for a service that has instances: one budget each."""
        budget = self._budgets.get(service)
        if budget is None:
            limits = self._budget_limits(self._services.get(service))
            budget = self._budgets[service] = RetryBudget(limits.ratio, limits.min_per_second)
        return budget

    def retry_budgets(self) -> dict[str, RetryBudget]:
        """The retry budget of each service this process has forwarded to (and that is
        still registered, when `follow`ing a registry view)."""
        return dict(self._budgets)

    def _budget_limits(self, settings: ServicePolicy | None) -> RetryBudgetPolicy:
        limits = settings.retry_budget if settings else None
        return limits or self.default_retry_budget

    def for_request(
        self,
        service: str,
        endpoints: Sequence[Endpoint],
        version: str | None,
        key: str | None = None,
    ) -> Sequence[Endpoint]:
        """The endpoints the strategy may pick from for one request (hot path).

        `version` named: only its endpoints. Otherwise the service's version
        weights draw one version (see the module docstring). With a `key`
        (sticky requests) the draw is a hash of the key, not a random number,
        so a client stays on one version as long as the weights stay.
        """
        if version is not None:
            return select_version(endpoints, version)
        settings = self._services.get(service)
        weights = settings.version_weights if settings else None
        if not weights:
            return endpoints
        present = sorted({ep.version for ep in endpoints if weights.get(ep.version, 0) > 0})
        if not present:
            return endpoints
        chosen = present[0]
        if len(present) > 1:
            total = sum(weights[v] for v in present)
            point = (self._rng.random() if key is None else _fraction(key)) * total
            for candidate in present:
                point -= weights[candidate]
                if point < 0:
                    chosen = candidate
                    break
            else:
                chosen = present[-1]  # rounding at the very top of the range
        return [ep for ep in endpoints if ep.version == chosen]

    def endpoints(self, service: str, records: Iterable[InstanceRecord]) -> list[Endpoint]:
        """The `Endpoint`s of `service`'s registry records, cached per instance of the
        service (hot path: a dict lookup for the service, then one per record). Per
        service, since an instance id names an instance within its service only."""
        cache = self._endpoints.get(service)
        if cache is None:
            cache = self._endpoints[service] = {}
        out = []
        for record in records:
            endpoint = cache.get(record.instance_id)
            if endpoint is None:
                endpoint = cache[record.instance_id] = _endpoint(record)
            out.append(endpoint)
        return out

    def _keep_unchanged_endpoints(self, service: str, records: Iterable[InstanceRecord]) -> None:
        """Drop the cached endpoints of `service` whose record changed (an address,
        weight, version or zone) or left. The others stay the same objects: the
        strategies then find an unchanged candidate set by identity, not field by field
        (`common.balancing.Pools`), after each resync as before it."""
        cache = self._endpoints.get(service)
        if not cache:
            return
        current = {record.instance_id: record for record in records}
        for instance_id, endpoint in list(cache.items()):
            record = current.get(instance_id)
            if record is None or _endpoint(record) != endpoint:
                del cache[instance_id]
        if not cache:
            del self._endpoints[service]

    def follow(self, view: RegistryView, book: HealthBook | None = None) -> None:
        """Keep up with `view`: at each change of a service's instances, drop the cached
        endpoints whose record changed, and what its strategy and `book` keep of
        instances that are no longer live; a service `view` no longer has also loses its
        strategy and retry budget (see the module docstring)."""

        def changed(service: str) -> None:
            records = view.instances(service)
            self._keep_unchanged_endpoints(service, records)
            live = frozenset(r.instance_id for r in records)
            if book is not None:  # (each time: a failure may be reported after its leaving)
                book.forget_departed(service, live)
            if not live and not view.registered(service):  # gone: nothing to balance
                self._live.pop(service, None)
                self._strategies.pop(service, None)
                self._budgets.pop(service, None)
            elif self._live.get(service) != live:  # (each resync notices every service)
                self._live[service] = live
                strategy = self._strategies.get(service)
                if strategy is not None:
                    strategy.forget_departed(live)

        view.on_change(changed)

    def _apply(self, document: PolicyDocument) -> None:
        for service in set(document.services) | set(self._services):
            old, new = self._services.get(service), document.services.get(service)
            old_name = old.strategy if old else DEFAULT_STRATEGY
            new_name = new.strategy if new else DEFAULT_STRATEGY
            if old_name != new_name:
                self._strategies.pop(service, None)
            budget = self._budgets.get(service)
            if budget is not None:  # (its balance is kept)
                limits = self._budget_limits(new)
                budget.configure(limits.ratio, limits.min_per_second)
        self._services = dict(document.services)


def _endpoint(record: InstanceRecord) -> Endpoint:
    return Endpoint(
        instance_id=record.instance_id,
        address=record.address or "",
        weight=record.weight,
        version=record.version,
        zone=record.zone,
    )


def _fraction(key: str) -> float:
    """A stable number in [0, 1) for `key`, the same in every process.

    Not crc32: the hash strategy places keys in its slots by crc32, and the keys
    of one version would then crowd a part of that version's slots.
    """
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
