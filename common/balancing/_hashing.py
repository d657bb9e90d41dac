"""Sticky balancing: weighted rendezvous hashing of the request's key.

A key falls in one of `slots` slots (its crc32, modulo); a slot belongs to the
candidate with the highest rendezvous score for it (highest random weight hashing,
weighted as `-w / ln u`, `u` a hash of the instance's id and the slot). As on a
ketama ring, removing an instance moves only its own keys and adding one takes
keys only for itself, the same in every gateway replica, and shares follow
weights (to a slot's width). Unlike a ring, nothing is built when the candidates
change: a slot's owner is elected on the first key that falls in it, from n
scores, or from 2 when the set used before differs by one instance; then it is
found in O(1). (The ring it replaces, 160 points per unit of weight, took seconds
of the event loop to build for 100 instances of weight 64, and 100 MB per cached
candidate set.)

Spread: with equal weights an instance owns about `slots / n` slots, binomially, so
shares spread by sqrt((n - 1) / slots) (std dev over the mean), whatever the keys:
measured at 8192 slots, 2.6 % at 10 instances, 7.1 % at 50, 16.4 % at 200 (the
busiest instance then owns 1.51x the mean, the least busy 0.63x). Doing better costs
more, measured 2026-11-22 (CPython 3.11; per request, a warm table):

* more slots: the same 0.3-0.9 µs a pick once a slot has its owner, but memory and
  first elections grow with them. 65536 slots spread 1.2 % / 2.3 % / 5.7 % at
  10 / 50 / 200, for 512 KB per cached candidate set (8192: 64 KB; up to 16 sets, each
  with its base's list) and 8x the elections: electing every slot from scratch at 200
  instances is 5.1 s of CPU spread over the first keys of each slot (0.7 s at 8192),
  0.08 s when derived from the set before (0.014 s);
* rendezvous on the key itself over the candidates: no slot spread left (only the
  keys' own), nothing cached, but O(n) a request: 3.8 / 17 / 68 µs at 10 / 50 / 200
  instances against 0.3 / 0.4 / 0.9 µs, and the gateway's whole request is ~100 µs;
* a Maglev table (65537 entries): even shares, but 43 ms of the event loop to build
  at each change of the candidates (in Python, at 10 to 200 instances), weights only
  by extra turns, and a change moves some keys of instances that stayed.

None is better on both counts, so 8192 slots stay. The `slots` option
(`make_strategy("hash", slots=...)`; the gateway passes none) trades memory and first
elections for spread.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Collection, Sequence
from math import log

from common.balancing._base import Endpoint, Pools, Strategy
from common.balancing._rotation import RoundRobin

SLOTS = 8192  # shares spread about sqrt(n / SLOTS): 7% at 50 instances (a ring's), 16% at 200

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: spreads slot numbers over 64 bits


def instance_seed(instance_id: str) -> int:
    """The 64 bits an instance's scores derive from: its id alone, so they are the
    same whatever the other candidates are, and in every process."""
    digest = hashlib.blake2b(instance_id.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


Member = tuple[int, float, Endpoint]  # seed, 1 / weight, the endpoint


class SlotTable:
    """The owner of each slot for one candidate set, elected on first use.

    Given the table of a set used before (`base`), a slot that set's owner still
    has is decided between that owner and the instances added since: the winner
    over the whole set is the same (each score depends on its instance alone), for
    2 scores instead of n after one instance came or went.
    """

    __slots__ = ("_added", "_base", "_kept", "members", "owners")

    def __init__(
        self, members: tuple[Endpoint, ...], slots: int, base: SlotTable | None = None
    ) -> None:
        self.members: list[Member] = [
            (instance_seed(ep.instance_id), 1.0 / ep.weight, ep) for ep in members
        ]
        self.owners: list[Endpoint | None] = [None] * slots
        self._base: list[Endpoint | None] | None = None
        self._kept: dict[Endpoint, Member] = {}
        self._added: list[Member] = []
        if base is not None and len(base.owners) == slots:
            before = {member[2] for member in base.members}
            self._kept = {m[2]: m for m in self.members if m[2] in before}
            self._added = [m for m in self.members if m[2] not in before]
            # Only the base's list, not the base: no chain of tables is kept alive.
            self._base = base.owners if self._kept else None

    def owner(self, key: str) -> Endpoint:
        """The owner of the key's slot. The key is hashed with crc32, as nginx's
        `hash ... consistent` does: 8 times faster than blake2b and as even for ids,
        UUIDs and IPs. Hot path: O(1) once the slot has an owner."""
        owners = self.owners
        slot = zlib.crc32(key.encode("utf-8", "surrogatepass")) % len(owners)
        ep = owners[slot]
        if ep is None:
            ep = owners[slot] = self._elect(slot)
        return ep

    def _elect(self, slot: int) -> Endpoint:
        if self._base is not None:
            prior = self._kept.get(self._base[slot])  # type: ignore[arg-type]
            if prior is not None:
                return _highest(slot, sorted([prior, *self._added], key=_by_id))
        return _highest(slot, self.members)

    def __len__(self) -> int:
        return len(self.owners)


def _by_id(member: Member) -> tuple[str, str]:
    return member[2].instance_id, member[2].address  # the order `Pools` gives members


def _highest(slot: int, members: list[Member]) -> Endpoint:
    """The member with the highest `ln(u) / weight` for the slot (`-w / ln u`
    ordered the same way); of equal scores, the first (members come sorted by id)."""
    spread = (slot * _GOLDEN) & _MASK
    best, top = members[0][2], -float("inf")
    for seed, inverse_weight, ep in members:
        h = seed ^ spread  # then splitmix64's finalizer: every bit depends on both
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        score = log(((h >> 11) + 0.5) * 2.0**-53) * inverse_weight  # u in (0, 1)
        if score > top:
            best, top = ep, score
    return best


class ConsistentHash(Strategy):
    """Weighted rendezvous hashing over `slots` slots: O(1) a pick once the key's
    slot has an owner, at most O(n) the first time (see the module docstring).

    The same key goes to the same instance while that instance is a candidate, in
    every gateway replica (crc32 and blake2b, not Python's per-process `hash`);
    removing an instance moves only its own keys. Without a key: round-robin.
    """

    name = "hash"
    options = ("slots",)

    def __init__(self, *, slots: int = SLOTS) -> None:
        if not isinstance(slots, int) or not 1 <= slots <= 1 << 20:
            raise ValueError("slots must be an int from 1 to 1048576")
        self._slots = slots
        self._tables: Pools[SlotTable] = Pools(self._table)
        self._no_key = RoundRobin()

    def pick(self, candidates: Sequence[Endpoint], key: str | None = None) -> Endpoint:
        if key is None:
            return self._no_key.pick(candidates)
        return self._tables.get(candidates).owner(key)

    def _table(self, members: tuple[Endpoint, ...]) -> SlotTable:
        # The set used last is usually the new one with one instance more or less.
        return SlotTable(members, self._slots, self._tables.latest)

    def forget_departed(self, live: Collection[str]) -> None:
        self._tables.forget_departed(live)
        self._no_key.forget_departed(live)

    def tracked(self) -> int:
        return len(self._tables) + self._no_key.tracked()
