"""Accounts: registration, password login and JWT access tokens.

`Accounts` knows nothing of RPC, so it is tested against Redis directly.
Passwords are hashed with argon2id; hashing runs in threads (it is CPU- and
memory-heavy by design) behind a semaphore, so logins neither block the event
loop nor run more hashes at once than there are CPUs. Redis layout (all keys
share the `{auth}` hash tag, so one Cluster slot):

```
sb:{auth}:usernames        hash    lower-cased username -> user id (uniqueness)
sb:{auth}:user:<user id>   hash    user_id, username, password_hash, created_at
sb:{auth}:jwt_secret       string  the generated signing secret when JWT_SECRET is unset
```

Tokens are made and verified by `common.tokens` (HS256 JWTs with a `kid`
header), the one implementation the services that verify locally share.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis.asyncio as aioredis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from common.connection import as_text
from common.constants import data_key
from common.errors import BadRequest, Conflict, Unauthorized
from common.log import get_logger
from common.tokens import SECRET_KEY, Tokens, key_id, shared_secret

__all__ = ["Accounts", "Keys", "key_id", "shared_secret"]

log = get_logger(__name__)

SERVICE = "auth"
USERNAME = re.compile(r"[A-Za-z0-9_.-]{3,64}")
MIN_PASSWORD, MAX_PASSWORD = 8, 256
INVALID_LOGIN = "invalid username or password"

T = TypeVar("T")

# Claim the username and create the user in one step, so a crash can never leave
# a username pointing at no user, and two registrations cannot both win.
_CREATE_USER = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'user_id', ARGV[2], 'username', ARGV[3],
           'password_hash', ARGV[4], 'created_at', ARGV[5])
return 1
"""


class Keys:
    """Names of the auth keys, in one place (see the module docstring)."""

    usernames = data_key(SERVICE, "usernames")
    jwt_secret = SECRET_KEY

    @staticmethod
    def user(user_id: str) -> str:
        """One user's record."""
        return data_key(SERVICE, "user", user_id)


def _valid_password(password: str) -> bool:
    return MIN_PASSWORD <= len(password) <= MAX_PASSWORD


class Accounts:
    """Users, password login and token verification over one Redis connection pool."""

    def __init__(
        self,
        redis: aioredis.Redis,
        secret: str,
        ttl: int = 900,
        *,
        hasher: PasswordHasher | None = None,
        hash_concurrency: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.ttl = ttl
        self.hasher = hasher or PasswordHasher()
        self.tokens = Tokens(secret, clock=clock)
        self.kid = self.tokens.kid
        self.clock = clock
        self._slots = asyncio.Semaphore(hash_concurrency or os.cpu_count() or 2)
        self._dummy_hash: str | None = None
        self._create_user = redis.register_script(_CREATE_USER)

    async def register(self, username: str, password: str) -> dict[str, Any]:
        """Create a user; `BadRequest` for a malformed name or password, `Conflict` if taken."""
        if not USERNAME.fullmatch(username):
            raise BadRequest("username must be 3 to 64 characters of A-Z, a-z, 0-9, _ . -")
        if not _valid_password(password):
            raise BadRequest(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
        folded = username.lower()
        # Cheap early answer; the script below is what guarantees uniqueness.
        if await self.redis.hexists(Keys.usernames, folded):
            raise Conflict(f"username {username!r} is taken")
        password_hash = await self._in_thread(self.hasher.hash, password)
        user_id = str(uuid.uuid4())
        created_at = datetime.now(UTC)
        created = await self._create_user(
            keys=[Keys.usernames, Keys.user(user_id)],
            args=[folded, user_id, username, password_hash, created_at.isoformat()],
        )
        if not created:
            raise Conflict(f"username {username!r} is taken")
        log.info("user registered", extra={"fields": {"user_id": user_id, "username": username}})
        return {"user_id": user_id, "username": username, "created_at": created_at}

    async def login(self, username: str, password: str) -> dict[str, Any]:
        """A bearer access token for valid credentials, else `Unauthorized`.

        Every failure gives the same message after one argon2 verification, so
        neither the answer nor its timing tells whether the username exists.
        """
        user = await self._find(username)
        if user is None or not _valid_password(password):
            await self._verify(await self._dummy(), password[:MAX_PASSWORD])
            raise Unauthorized(INVALID_LOGIN)
        stored_hash = user["password_hash"]
        if not await self._verify(stored_hash, password):
            raise Unauthorized(INVALID_LOGIN)
        if self.hasher.check_needs_rehash(stored_hash):
            # The hasher's parameters changed since this hash was made: upgrade
            # it now, while we know the password.
            new_hash = await self._in_thread(self.hasher.hash, password)
            await self.redis.hset(Keys.user(user["user_id"]), "password_hash", new_hash)
            log.info("password rehashed", extra={"fields": {"user_id": user["user_id"]}})
        return self.issue(user["user_id"], user["username"])

    def issue(self, user_id: str, username: str) -> dict[str, Any]:
        """A signed access token for a user (no credential check: callers do that)."""
        token = self.tokens.issue(user_id, username, self.ttl)
        return {"access_token": token, "token_type": "bearer", "expires_in": self.ttl}

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid access token; `Unauthorized` for anything else."""
        return self.tokens.verify(token)

    async def _find(self, username: str) -> dict[str, str] | None:
        if not USERNAME.fullmatch(username):
            return None
        user_id = await self.redis.hget(Keys.usernames, username.lower())
        if user_id is None:
            return None
        raw = await self.redis.hgetall(Keys.user(as_text(user_id)))
        if not raw:
            return None
        return {as_text(k): as_text(v) for k, v in raw.items()}

    async def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return await self._in_thread(self.hasher.verify, password_hash, password)
        except VerificationError:
            return False
        except InvalidHashError:
            log.error("stored password hash is unreadable")
            return False

    async def _dummy(self) -> str:
        """A hash of a random password, made with the current parameters, for
        unknown users to be verified against."""
        if self._dummy_hash is None:
            self._dummy_hash = await self._in_thread(self.hasher.hash, secrets.token_urlsafe(16))
        return self._dummy_hash

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._slots:
            return await asyncio.to_thread(fn, *args)
