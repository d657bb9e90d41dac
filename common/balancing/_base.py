"""The endpoint, the strategy interface and the per-candidate-set cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar


@dataclass(slots=True, frozen=True)
class Endpoint:
    """One upstream instance as the balancer sees it.

    `weight` is relative capacity for every strategy; below 1 it is raised to 1.
    """

    instance_id: str
    address: str  # "host:port"
    weight: int = 1
    version: str = "0"  # the version/tag: "v2" in the original dispatcher's "nlp_v2"
    zone: str | None = None

    def __post_init__(self) -> None:
        if self.weight < 1:
            object.__setattr__(self, "weight", 1)  # frozen: the documented way round


def select_version(endpoints: Iterable[Endpoint], version: str | None) -> list[Endpoint]:
    """The endpoints of one version/tag; all of them when `version` is None."""
    if version is None:
        return list(endpoints)
    return [ep for ep in endpoints if ep.version == version]


class Strategy(ABC):
    """Picks the instance for each request; told when requests start and end."""

    name: ClassVar[str]
    # The keyword options `__init__` takes (`make_strategy` checks them against this:
    # compiled by mypyc, a class has no signature `inspect` could read).
    options: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def pick(self, candidates: Sequence[Endpoint], key: str | None = None) -> Endpoint:
        """One of `candidates`, or an equal endpoint (hot path). Only "hash" uses `key`.

        Raises ValueError when `candidates` is empty.
        """

    def started(self, ep: Endpoint) -> None:  # noqa: B027 (a no-op unless load matters)
        """A request to `ep` began; call `finished` exactly once for it."""

    def finished(self, ep: Endpoint, seconds: float, ok: bool) -> None:  # noqa: B027
        """The request to `ep` ended after `seconds`; `ok` is False for a failure."""

    def connected(self, ep: Endpoint, seconds: float) -> None:  # noqa: B027
        """The request to `ep` got its answer after `seconds` and is held as a connection
        (a relay, a tunnel): it still counts as load; end it with `closed`, not `finished`."""

    def closed(self, ep: Endpoint, seconds: float, ok: bool) -> None:
        """A connection `connected` reported has ended; `seconds` and `ok` as for `finished`."""
        self.finished(ep, seconds, ok)

    def forget_departed(self, live: Collection[str]) -> None:  # noqa: B027 (no state: no-op)
        """Drop what this strategy keeps about instances not in `live` (the instance ids
        its service has now). Not on the request path: once per change of the service's
        instances (`BalancingPolicy.follow`)."""

    def tracked(self) -> int:
        """How many instances or candidate sets this strategy keeps state for."""
        return 0


def no_candidates() -> ValueError:
    return ValueError("no candidates to pick from")


def _by_id(ep: Endpoint) -> tuple[str, str]:
    return ep.instance_id, ep.address


P = TypeVar("P")


class Pools(Generic[P]):
    """State derived from a candidate set, found again in O(1) for an unchanged set.

    The candidates usually equal the previous call's (a fresh list of the same
    objects: `BalancingPolicy` keeps an instance's endpoint while its record is
    unchanged): comparing tuples is then an identity check per element, in C. Equal
    endpoints that are new objects (instances that left and came back with the same
    records, say after a Redis outage) compare field by field, in Python (45 µs for
    200): so the set is kept as the latest call's tuple, and only the first call after
    such a change pays that. A different set is looked up by its members, order ignored,
    among the `size` sets used last, so pools that alternate (two versions) each keep
    their state and memory stays bounded. `build` receives the members sorted by
    instance id. `forget_departed` drops the sets that hold an instance gone from the
    registry: they never come back, and would otherwise stay until pushed out.
    """

    __slots__ = ("_build", "_by_set", "_last", "_size")

    def __init__(self, build: Callable[[tuple[Endpoint, ...]], P], size: int = 16) -> None:
        self._build = build
        self._size = size
        self._last: tuple[tuple[Endpoint, ...], P] | None = None
        self._by_set: dict[frozenset[Endpoint], P] = {}

    def get(self, candidates: Sequence[Endpoint]) -> P:
        snap = tuple(candidates)  # the same object when already a tuple
        last = self._last
        if last is not None and (snap is last[0] or snap == last[0]):
            if snap is not last[0]:
                self._last = (snap, last[1])  # (the class docstring: equal, new objects)
            return last[1]
        if not snap:
            raise no_candidates()
        members = frozenset(snap)
        pool = self._by_set.pop(members, None)
        if pool is None:
            if len(self._by_set) >= self._size:
                del self._by_set[next(iter(self._by_set))]  # the least recently used
            pool = self._build(tuple(sorted(members, key=_by_id)))
        self._by_set[members] = pool
        self._last = (snap, pool)
        return pool

    def forget_departed(self, live: Collection[str]) -> None:
        """Drop the state of every set with a member not in `live` (instance ids), but
        the one used last: the next set is usually it less the instance that left, and
        may be derived from it (the hash strategy's slot table)."""
        gone = [m for m in self._by_set if any(ep.instance_id not in live for ep in m)]
        for members in gone:
            del self._by_set[members]

    @property
    def latest(self) -> P | None:
        """The state `get` returned last, None before the first call."""
        return self._last[1] if self._last is not None else None

    def __len__(self) -> int:
        return len(self._by_set)
