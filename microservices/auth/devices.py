"""Device tokens (OWASP's "device cookies"): a login's own credential for the device
that logged in, so the throttle can tell its owner from strangers at the same address.

```
sb:{auth}:login_devices:<username>   zset  SHA-256 (hex) of a device token -> when it expires
```

A successful login gets a new device token (`sbd_` and 43 URL-safe characters, 256
random bits), returned once in the login's answer; only its SHA-256 is kept, in the
username's zset, for `AUTH_LOGIN_DEVICE_DAYS`. A login presenting a token it holds
(the name folded as the throttle folds it) is counted in the token's own tier of the
throttle instead of its address's: a stranger behind the same NAT as the owner,
without the token, locks the address, not the owner's device. The token presented
is replaced by the new one (one entry per device, and a token seen by a stranger
stops working at the owner's next login); the `DEVICES` most recent are kept.

Server-side, not signed: no new secret to configure or rotate, a token is bound to
its username by the key it is kept under, and an admin's revocation of the user
drops them all at once. A token that is malformed, unknown, expired or another
user's is no device: the login is counted by its address as without one.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from common.constants import data_key
from microservices.auth.throttle import fold_username

PREFIX = "sbd_"
# The device tokens of a user kept (the most recent): a household's browsers and phones.
DEVICES = 20
_TOKEN = re.compile(r"sbd_[A-Za-z0-9_-]{43}")
_DAY = 86400.0


def devices_key(username: str) -> str:
    """The device tokens of `username` (matched ignoring case, as logins are)."""
    return data_key("auth", "login_devices", fold_username(username))


def digest(token: str) -> str:
    """How a device token is kept and keyed: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


class DeviceTokens:
    """The device tokens of every user, in Redis, shared by every auth instance; none
    when `days` is 0."""

    def __init__(
        self, redis: aioredis.Redis, days: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = redis
        self.lifetime = days * _DAY
        self.clock = clock

    async def check(self, username: str, token: object) -> str | None:
        """The digest of `token` if it is a live device token of `username`, else None
        (whatever it is: the login then counts by its address)."""
        if self.lifetime <= 0 or not isinstance(token, str) or not _TOKEN.fullmatch(token):
            return None
        hashed = digest(token)
        expires_at = await self.redis.zscore(devices_key(username), hashed)
        return hashed if expires_at is not None and expires_at > self.clock() else None

    async def issue(self, username: str, replacing: str | None = None) -> str | None:
        """A new device token of `username`, in place of the one whose digest is
        `replacing` (None: a new device); None when device tokens are off."""
        if self.lifetime <= 0:
            return None
        token = PREFIX + secrets.token_urlsafe(32)
        key, now = devices_key(username), self.clock()
        async with self.redis.pipeline(transaction=True) as pipe:
            if replacing is not None:
                pipe.zrem(key, replacing)
            pipe.zadd(key, {digest(token): now + self.lifetime})
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zremrangebyrank(key, 0, -DEVICES - 1)  # keeps the most recent
            pipe.pexpire(key, math.ceil(self.lifetime * 1000))
            await pipe.execute()
        return token

    async def forget(self, username: str) -> None:
        """Drop every device token of `username` (its credentials were revoked)."""
        await self.redis.delete(devices_key(username))
