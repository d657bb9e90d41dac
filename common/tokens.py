"""JWT access tokens: the one implementation, shared by `auth` (issues) and the
services that verify locally (websocket, and the gateway when it checks tokens).

Tokens are HS256 JWTs with `sub`, `name`, `iat`, `exp`, `iss`, `aud` and `jti`
claims and a `kid` header naming the signing key, so key rotation can add keys
without changing the token format. The secret is `JWT_SECRET` when set, else
one generated on the first start of any process that needs it and shared by all
of them through Redis (`sb:{auth}:jwt_secret`, never in the repo).

Needs PyJWT, which is not a requirement of `common` itself: only the images of
the services that import this module install it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import redis.asyncio as aioredis

from common.connection import as_text
from common.constants import data_key
from common.errors import ConfigError, Unauthorized

ISSUER = "switchboard"
AUDIENCE = "switchboard"
ALGORITHM = "HS256"
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32
REQUIRED_CLAIMS = ("sub", "name", "iat", "exp", "iss", "aud", "jti")
# Where the generated secret lives (owned by the auth service's data).
SECRET_KEY = data_key("auth", "jwt_secret")


async def shared_secret(redis: aioredis.Redis, configured: str | None) -> str:
    """The JWT signing secret: `configured` if given, else one generated on the
    first start of any process and shared by all of them through Redis."""
    if configured:
        if len(configured.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes long")
        return configured
    await redis.set(SECRET_KEY, secrets.token_urlsafe(48), nx=True)
    stored = await redis.get(SECRET_KEY)
    if stored is None:  # deleted between SET NX and GET: a broken deployment
        raise ConfigError(f"{SECRET_KEY} vanished right after it was set")
    return as_text(stored)


def key_id(secret: str) -> str:
    """A public, stable name for a signing key; it reveals nothing usable about the key."""
    return hashlib.sha256(b"switchboard-kid:" + secret.encode()).hexdigest()[:16]


class Tokens:
    """Signs and verifies access tokens with one secret."""

    def __init__(self, secret: str, *, clock: Callable[[], float] = time.time) -> None:
        self.kid = key_id(secret)
        self.clock = clock
        self._secret = secret

    def issue(self, user_id: str, username: str, ttl: int) -> str:
        """A signed access token for a user, valid for `ttl` seconds (no credential check)."""
        now = int(self.clock())
        claims = {
            "sub": user_id,
            "name": username,
            "iat": now,
            "exp": now + ttl,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM, headers={"kid": self.kid})

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
