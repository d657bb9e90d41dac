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

Tokens are HS256 JWTs with `sub`, `name`, `iat`, `exp`, `iss`, `aud` and `jti`
claims and a `kid` header naming the signing key, so key rotation can add keys
without changing the token format.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import jwt
import redis.asyncio as aioredis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from common.constants import data_key
from common.errors import BadRequest, ConfigError, Conflict, Unauthorized
from common.log import get_logger

log = get_logger(__name__)

SERVICE = "auth"
ISSUER = "switchboard"
AUDIENCE = "switchboard"
ALGORITHM = "HS256"
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32
USERNAME = re.compile(r"[A-Za-z0-9_.-]{3,64}")
MIN_PASSWORD, MAX_PASSWORD = 8, 256
INVALID_LOGIN = "invalid username or password"
REQUIRED_CLAIMS = ("sub", "name", "iat", "exp", "iss", "aud", "jti")

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
    jwt_secret = data_key(SERVICE, "jwt_secret")

    @staticmethod
    def user(user_id: str) -> str:
        """One user's record."""
        return data_key(SERVICE, "user", user_id)


async def shared_secret(redis: aioredis.Redis, configured: str | None) -> str:
    """The JWT signing secret: `configured` if given, else one generated on the
    first start of any auth instance and shared by all of them through Redis."""
    if configured:
        if len(configured.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes long")
        return configured
    await redis.set(Keys.jwt_secret, secrets.token_urlsafe(48), nx=True)
    stored = await redis.get(Keys.jwt_secret)
    if stored is None:  # deleted between SET NX and GET: a broken deployment
        raise ConfigError(f"{Keys.jwt_secret} vanished right after it was set")
    return stored.decode() if isinstance(stored, bytes) else str(stored)


def key_id(secret: str) -> str:
    """A public, stable name for a signing key; it reveals nothing usable about the key."""
    return hashlib.sha256(b"switchboard-kid:" + secret.encode()).hexdigest()[:16]


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
        self.kid = key_id(secret)
        self.clock = clock
        self._secret = secret
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
        now = int(self.clock())
        claims = {
            "sub": user_id,
            "name": username,
            "iat": now,
            "exp": now + self.ttl,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, self._secret, algorithm=ALGORITHM, headers={"kid": self.kid})
        return {"access_token": token, "token_type": "bearer", "expires_in": self.ttl}

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid access token; `Unauthorized` for anything else
        (expired, bad signature, other algorithm, unknown key, wrong audience or issuer)."""
        try:
            if jwt.get_unverified_header(token).get("kid") != self.kid:
                raise Unauthorized("invalid token: unknown signing key")
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        return claims

    async def _find(self, username: str) -> dict[str, str] | None:
        if not USERNAME.fullmatch(username):
            return None
        user_id = await self.redis.hget(Keys.usernames, username.lower())
        if user_id is None:
            return None
        raw = await self.redis.hgetall(Keys.user(_text(user_id)))
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}

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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
