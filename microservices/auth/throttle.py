"""Login throttling per username and client address, or per device: growing locks
after failed logins, never a lockout, and no way for a stranger to lock an owner
out at an address the owner registered, logged in or refreshed a session from
within the known period (at a new address the account-wide backstop may hold the
owner too), nor on a device the owner logged in with (its device token: a
stranger behind the owner's NAT, at the same address, locks the address only).

```
sb:{auth}:login_failures:<username>@<address>  hash  failures, locked_until (epoch seconds)
sb:{auth}:login_pending:<username>@<address>   zset  attempts under way (id -> start)
sb:{auth}:login_failures:<username>@device:<d> hash  the same, per device token (SHA-256 <d>)
sb:{auth}:login_pending:<username>@device:<d>  zset
sb:{auth}:login_failures:<username>@*          hash  the same, for the account (every address)
sb:{auth}:login_pending:<username>@*           zset
sb:{auth}:login_addresses:<username>           zset  addresses, device:<d>, with failures -> expiry
sb:{auth}:login_known:<username>               zset  addresses the user came from -> when (last)
sb:{auth}:login_failures:<username>            hash  logins that name no address (as before)
sb:{auth}:login_pending:<username>             zset
```

`<username>` is the name lower-cased, as `Users.find` matches it; a name that no
user can have (not 3-64 characters of `A-Z a-z 0-9 _ . -`) is keyed by its
SHA-256 instead, so a key stays short whatever is sent. `<address>` is the
client's address as the gateway reads it (`Gatekeeper.client_ip`: the same as
its rate limits, `X-Forwarded-For` believed from trusted proxies only), an IPv6
one by its /64 (one host or household: privacy addresses change within it); text
that is no address is keyed by its SHA-256. Every key has the `{auth}` tag: one
Cluster slot, so a script may touch all of a user's keys.

Why two tiers (OWASP's authentication cheat sheet: a lock keyed by the username
alone is a denial of service): anyone who knows a name could keep its owner out,
one failure per lock. So a login is counted in two tiers:

- **per username and address** (`max_failures`, `AUTH_LOGIN_MAX_FAILURES`): the
  rules below. Only attempts from that address count, so strangers elsewhere
  cannot lock the owner's address.
- **per username, every address** (`max_account_failures`,
  `AUTH_LOGIN_MAX_FAILURES_ACCOUNT`): the same rules and locks with a larger
  count, a backstop against guessing from many addresses, which no address's
  count sees. Its lock does not apply at a known address: one the user
  registered, logged in or refreshed a session from (each shows the owner there)
  within `known_for` (`AUTH_LOGIN_KNOWN_ADDRESS_DAYS`; the `KNOWN_ADDRESSES`
  most recent are kept). So the owner at such an address gets in whatever
  strangers do; strangers, and the owner at a new address, wait while strangers
  keep the backstop locked (one failure per lock, from a few addresses). Failures
  from a known address count here too (they are guesses all the same), and a
  success does not reset this count: it shows the owner is there, not that
  strangers stopped.

A per-address count cannot tell the owner from a stranger at the same address (a
NAT, a shared office): the stranger's failures lock the address for both. So a
login presenting a live device token of the user (OWASP's "device cookies";
`devices`: one is given at each successful login, bound to the username, kept
server-side for `AUTH_LOGIN_DEVICE_DAYS`) is counted **per device** instead of
per address, with the same rules and `max_failures`: the address's lock does not
apply to it, nor does its failure or success touch the address's count, and the
account tier's lock spares it as it spares a known address (counting it all the
same). A device's own failures lock the device wherever it is used, so a stolen
token buys no more guesses than an address; any other token (unknown, expired,
another user's) is no device, and the login is counted by its address. The caller
checks the token (`DeviceTokens.check`) and passes its digest to `admit`: a token
replaced or expired between the two is counted as a device once more, harmless.

An attempt is refused while a tier that applies to it is locked. It is admitted
by the script that checks the locks, and held as under way in both its tiers until
its password is checked: at most as many attempts are under way at once as there
are failures left before a tier's lock (at least one), so concurrent attempts
(through any number of gateways and auth instances, from any number of addresses)
cannot slip in more guesses than the rules allow. An attempt from a known address
or with a device skips the account tier's check, as it skips its lock (its own
address's or device's bounds it); it is held as under way there all the same. One over that waits
(`BUSY_WAIT`) for those under way to end, then is admitted or refused: so
concurrent logins of the right password all get in, without counting as
failures. The failure that brings a tier's count to its maximum locks it for
`lock_base` seconds; once a lock has passed, each failure locks it again for
twice as long as the last lock (at most `lock_max`): a guesser gets one try per
lock, and the owner, once the lock passes, gets in with the right password.
Attempts refused during a lock are not counted and cost no password check. A
successful login deletes its device's count, or else its address's; a count expires `window` seconds
after the last failure's lock ends, forgetting it. An attempt whose worker died
before it ended stops counting as under way after `STALE_SECONDS`.

A login that names no address (an older gateway during a rolling deploy, an
internal caller) is counted as before this split: in one tier per username, the
keys without `@`, which older auth instances share.

Every name is counted, registered or not, so the answers (and their timing) are
the same for both and tell nothing about which names exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from common.clientip import address_block
from common.connection import as_text
from common.constants import data_key
from common.errors import TooManyAttempts
from common.log import get_logger
from common.redis_failures import REDIS_DOWN_OR_REFUSING, redis_failure_message
from common.settings import Settings
from microservices.auth.users import USERNAME

log = get_logger(__name__)

# An attempt under way longer than this (its worker died) no longer holds its place.
STALE_SECONDS = 30.0
# How long an attempt over the number allowed under way waits for a place, polling.
BUSY_WAIT = 2.0
_BUSY_POLL = 0.05
# The addresses a user came from that are remembered (the most recent): enough
# for home, work, a phone's networks; few enough to keep the key small.
KNOWN_ADDRESSES = 10
# The account tier's address in key names (no address is keyed so).
ACCOUNT = "*"
# A device token's tier is keyed as the address `device:<its SHA-256>` (no address is).
DEVICE = "device:"
_DAY = 86400.0

# Admit one attempt (ARGV[3], its id) unless a tier that applies to it is locked or
# has as many attempts under way as it may; hold it as under way in every tier.
# KEYS: the known addresses zset, then per tier its failures hash and pending zset.
# ARGV: now, stale seconds, attempt id, the address ('' none), known since (epoch
# seconds), then per tier its max failures and whom its lock spares (`Spared`).
# Returns nil when admitted, else {"locked", seconds left} or {"busy", "0"}.
_ADMIT = """
local now, stale = tonumber(ARGV[1]), tonumber(ARGV[2])
local seen = ARGV[4] ~= '' and redis.call('ZSCORE', KEYS[1], ARGV[4])
local known = seen and tonumber(seen) >= tonumber(ARGV[5])
local tiers, applying = (#KEYS - 1) / 2, {}
for tier = 1, tiers do
  local spared = ARGV[5 + 2 * tier]
  if not (spared == '2' or (known and spared == '1')) then applying[#applying + 1] = tier end
end
local left = 0
for _, tier in ipairs(applying) do
  local locked_until = tonumber(redis.call('HGET', KEYS[2 * tier], 'locked_until') or '0')
  left = math.max(left, locked_until - now)
end
if left > 0 then return {'locked', tostring(left)} end
for _, tier in ipairs(applying) do
  local pending = KEYS[2 * tier + 1]
  redis.call('ZREMRANGEBYSCORE', pending, '-inf', now - stale)
  local failures = tonumber(redis.call('HGET', KEYS[2 * tier], 'failures') or '0')
  if redis.call('ZCARD', pending) >= math.max(1, tonumber(ARGV[4 + 2 * tier]) - failures) then
    return {'busy', '0'}
  end
end
for tier = 1, tiers do
  redis.call('ZADD', KEYS[2 * tier + 1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[2 * tier + 1], math.ceil(stale * 1000))
end
return false
"""

# Count a failed attempt (ARGV[5]) in every tier, locking a tier when its count says
# so; index the first tier's failures under the address or device it counts
# (ARGV[6], '' none) until they expire. KEYS: the addresses zset, then per tier its
# failures hash and pending zset. ARGV: now, lock base, lock max, window, attempt
# id, address or device, then per tier its max failures.
_FAILED = """
local now = tonumber(ARGV[1])
for tier = 1, (#KEYS - 1) / 2 do
  local failures = KEYS[2 * tier]
  redis.call('ZREM', KEYS[2 * tier + 1], ARGV[5])
  local over = redis.call('HINCRBY', failures, 'failures', 1) - tonumber(ARGV[6 + tier])
  local keep = tonumber(ARGV[4])
  if over >= 0 then
    local lock = math.min(tonumber(ARGV[2]) * 2 ^ math.min(over, 64), tonumber(ARGV[3]))
    redis.call('HSET', failures, 'locked_until', string.format('%.6f', now + lock))
    keep = keep + lock
  end
  redis.call('PEXPIRE', failures, math.ceil(keep * 1000))
  if tier == 1 and ARGV[6] ~= '' then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
    redis.call('ZADD', KEYS[1], now + keep, ARGV[6])
    local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(last[2]) - now) * 1000))
  end
end
return false
"""


def login_address(address: str | None) -> str | None:
    """How a client address is keyed: by its block (`common.clientip.address_block`:
    IPv4 as is, IPv6 by its /64), other text by its SHA-256; None for none (an empty
    one included)."""
    if not address:
        return None
    block = address_block(address)
    if block is None:
        return "#" + hashlib.sha256(address.encode(errors="replace")).hexdigest()
    return block


def fold_username(username: str) -> str:
    """How `username` is keyed: lower-cased, as `Users.find` matches it; by its SHA-256
    if no user can have it."""
    folded = username.lower()
    if not USERNAME.fullmatch(username):
        folded = "#" + hashlib.sha256(folded.encode(errors="replace")).hexdigest()
    return folded


def failures_key(username: str, address: str | None = None) -> str:
    """The failure count of `username` (matched ignoring case, as logins are) from
    `address` (as `login_address` keys it; `ACCOUNT`: every address; None: logins
    naming no address)."""
    suffix = "" if address is None else f"@{address}"
    return data_key("auth", "login_failures", fold_username(username) + suffix)


def pending_key(username: str, address: str | None = None) -> str:
    """The attempts of `username` under way (named as `failures_key`)."""
    return failures_key(username, address).replace(":login_failures:", ":login_pending:", 1)


def addresses_key(username: str) -> str:
    """The addresses with a failure count of `username` (for the admin's clear)."""
    return data_key("auth", "login_addresses", fold_username(username))


def known_key(username: str) -> str:
    """The addresses `username` registered, logged in or refreshed a session from lately."""
    return data_key("auth", "login_known", fold_username(username))


_DEFAULTS = Settings()


@dataclass(frozen=True, slots=True)
class ThrottleRules:
    """When logins are refused: the `AUTH_LOGIN_*` settings (seconds); by default, their
    defaults."""

    max_failures: int = _DEFAULTS.auth_login_max_failures
    lock_base: float = _DEFAULTS.auth_login_lock_base
    lock_max: float = _DEFAULTS.auth_login_lock_max
    window: float = _DEFAULTS.auth_login_failure_window
    max_account_failures: int = _DEFAULTS.auth_login_max_failures_account
    known_for: float = _DEFAULTS.auth_login_known_address_days * _DAY

    @classmethod
    def of(cls, settings: Settings) -> ThrottleRules:
        """The rules `settings` set."""
        return cls(
            max_failures=settings.auth_login_max_failures,
            lock_base=settings.auth_login_lock_base,
            lock_max=settings.auth_login_lock_max,
            window=settings.auth_login_failure_window,
            max_account_failures=settings.auth_login_max_failures_account,
            known_for=settings.auth_login_known_address_days * _DAY,
        )


class Spared(IntEnum):
    """Which attempts a tier's lock does not apply to (it counts them all the same)."""

    NONE = 0
    KNOWN = 1  # those from an address known as the user's
    ALL = 2  # every one (the account tier of an attempt with a device token)


class Tier(NamedTuple):
    """One count a login attempt is throttled by."""

    failures: str  # its failures hash's key
    pending: str  # its attempts under way (zset) key
    max_failures: int
    spared: Spared  # which attempts its lock spares


@dataclass(frozen=True, slots=True)
class Attempt:
    """An admitted login attempt: its id, the name, the address as keyed (None: the
    login named none), the digest of its live device token (None: none), and the
    tiers it counts in, first its device's or address's (their keys built once, by
    `admit`, for the call that ends it)."""

    id: str
    username: str
    address: str | None
    device: str | None
    tiers: tuple[Tier, ...]

    @property
    def counted_as(self) -> str | None:
        """What its first tier counts, as `failures_key` names it: the device or the
        address."""
        return self.address if self.device is None else DEVICE + self.device


class LoginThrottle:
    """Failed logins counted per username and address in Redis, shared by every auth
    instance.

    A login calls `admit`, then exactly one of `failed` (wrong password),
    `succeeded` (right password) or `abandoned` (neither was found out).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        rules: ThrottleRules,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.rules = rules
        self.clock = clock
        self._admit = redis.register_script(_ADMIT)
        self._failed = redis.register_script(_FAILED)

    async def admit(
        self, username: str, address: str | None = None, device: str | None = None
    ) -> Attempt:
        """Admit a login attempt of `username` from the client `address` (None: one
        that names none) with the device token whose digest is `device` (checked live
        by the caller, `devices.DeviceTokens.check`; None: none), for the call that
        ends it.

        `TooManyAttempts` while a tier that applies is locked, or when the attempts
        it may have under way still are after `BUSY_WAIT`.
        """
        keyed = login_address(address)
        tiers = self._tiers(username, keyed, device)
        attempt = Attempt(uuid.uuid4().hex, username, keyed, device, tiers)
        keys = _keys(known_key(username), attempt.tiers)
        # The address to look up among the known ones (none while none is kept).
        lookup = attempt.address if self.rules.known_for > 0 else None
        per_tier = [v for t in attempt.tiers for v in (t.max_failures, int(t.spared))]
        waited_until = time.monotonic() + BUSY_WAIT
        while True:
            now = self.clock()
            args: list[str | float] = [now, STALE_SECONDS, attempt.id, lookup or ""]
            args += [now - self.rules.known_for, *per_tier]
            refused = await self._admit(keys=keys, args=args)
            if refused is None:
                return attempt
            kind, left = (as_text(part) for part in refused)
            if kind == "locked":
                seconds = float(left)
                raise TooManyAttempts(
                    f"too many failed logins: try again in {max(1, math.ceil(seconds))} s",
                    retry_after=round(seconds, 3),
                )
            if time.monotonic() >= waited_until:
                raise TooManyAttempts(
                    "too many logins of this username under way: try again in 1 s",
                    retry_after=1.0,
                )
            await asyncio.sleep(_BUSY_POLL)

    async def failed(self, attempt: Attempt) -> None:
        """The password was wrong: count a failure in every tier (which may lock it)."""
        rules = self.rules
        keys = _keys(addresses_key(attempt.username), attempt.tiers)
        args: list[str | float] = [self.clock(), rules.lock_base, rules.lock_max, rules.window]
        args += [attempt.id, attempt.counted_as or "", *(t.max_failures for t in attempt.tiers)]
        await self._failed(keys=keys, args=args)

    async def succeeded(self, attempt: Attempt) -> None:
        """The password was right: forget the failures of its device, or else of its
        address (not the account's: nor the address's when it came with a device, whose
        owner may share it with strangers), and remember the address as the user's."""
        username, address, tiers = attempt.username, attempt.address, attempt.tiers
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(tiers[0].failures)
            for tier in tiers:
                pipe.zrem(tier.pending, attempt.id)
            if attempt.counted_as is not None:
                pipe.zrem(addresses_key(username), attempt.counted_as)
            if address is not None and self.rules.known_for > 0:
                self._remember(pipe, known_key(username), address)
            await pipe.execute()

    async def remember(self, username: str, address: str | None) -> None:
        """Know the client `address` (as the gateway read it; None: none) as the user's
        from now on, as a login from it would: for a registration or a valid refresh,
        which show the owner there too. Without them an account never logged in, or
        kept signed in by refreshes for `known_for`, has no known address, and
        strangers could hold the account's lock against its owner everywhere.

        Best effort: it runs after the registration or the refresh took effect (the
        user made, the refresh token used up), so a Redis failure here is logged, not
        raised: the client must get the tokens, not a 503 whose retry finds its user
        taken or its refresh token reused (which ends the session)."""
        keyed = login_address(address)
        if keyed is None or self.rules.known_for <= 0:
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                self._remember(pipe, known_key(username), keyed)
                await pipe.execute()
        except REDIS_DOWN_OR_REFUSING as exc:
            log.warning("known address not recorded", extra={"fields": {
                "error": redis_failure_message(exc)}})  # fmt: skip

    def _remember(self, pipe: Pipeline, known: str, address: str) -> None:
        now = self.clock()
        pipe.zadd(known, {address: now})
        pipe.zremrangebyscore(known, "-inf", now - self.rules.known_for)
        pipe.zremrangebyrank(known, 0, -KNOWN_ADDRESSES - 1)  # keeps the most recent
        pipe.pexpire(known, math.ceil(self.rules.known_for * 1000))

    async def abandoned(self, attempt: Attempt) -> None:
        """The attempt ended before its password was found right or wrong: it counts
        for nothing (if this cannot be said, it stops counting after `STALE_SECONDS`)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for tier in attempt.tiers:
                pipe.zrem(tier.pending, attempt.id)
            await pipe.execute()

    async def clear(self, username: str) -> bool:
        """Lift every lock of the name, from every address and the account's, and
        forget its failures (admin); whether there were any. The addresses it knows
        are kept: they are no failures."""
        index = addresses_key(username)
        addresses = [as_text(a) for a in cast("list[bytes]", await self.redis.zrange(index, 0, -1))]
        # Only the addresses read are unindexed: a failure from another one meanwhile
        # stays indexed, for the next clear. (The failure script and this transaction
        # are atomic, so an address read is either cleared or counted again, indexed.)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(failures_key(username), failures_key(username, ACCOUNT),
                        *(failures_key(username, a) for a in addresses))  # fmt: skip
            if addresses:
                pipe.zrem(index, *addresses)
            deleted = (await pipe.execute())[0]
        return bool(deleted)

    def _tiers(self, username: str, address: str | None, device: str | None) -> tuple[Tier, ...]:
        """The tiers an attempt of `username` from `address` (as keyed) with the device
        token `device` (its digest) counts in, first its device's or else its address's."""
        rules = self.rules
        if device is not None:  # counted per device, not per address; the account spares it
            first, spared = DEVICE + device, Spared.ALL
        elif address is not None:
            first, spared = address, Spared.KNOWN
        else:
            return (Tier(failures_key(username), pending_key(username), rules.max_failures,
                         Spared.NONE),)  # fmt: skip
        return (
            Tier(failures_key(username, first), pending_key(username, first),
                 rules.max_failures, Spared.NONE),
            Tier(failures_key(username, ACCOUNT), pending_key(username, ACCOUNT),
                 rules.max_account_failures, spared),
        )  # fmt: skip


def _keys(first: str, tiers: tuple[Tier, ...]) -> list[str]:
    """A script's KEYS: `first`, then each tier's failures and pending keys."""
    return [first] + [key for tier in tiers for key in (tier.failures, tier.pending)]
