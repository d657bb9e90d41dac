"""JWT access tokens and the keyring that signs them.

The one implementation, shared by `auth` (which issues tokens) and every
process that verifies them locally (gateway, websocket: through
`common.credentials.Authenticator`).

Tokens are HS256 JWTs with claims `sub`, `name`, `roles` (list), `scope`
(space-separated), `sid` (session id), `iat`, `exp`, `iss`, `aud`, `jti`, and a
`kid` header naming the signing key. The keys live in Redis, so every process
of a deployment agrees on them without sharing a file:

```
sb:{auth}:signing_keys   hash    kid -> JSON {"secret", "created_at", "retire_at" | null}
sb:{auth}:signing_kid    string  the kid new tokens are signed with
```

The first key is created once for all processes (SET NX semantics) from
`JWT_SECRET` when it is set, else generated. Rotation makes a new key current;
the old one keeps verifying until its `retire_at` (now + the longest token
lifetime + a margin), so nobody is logged out, and is removed after that.

Needs PyJWT, which is not a requirement of `common` itself: only the images of
the services that import this module install it.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import redis.asyncio as aioredis

from common.connection import as_text
from common.constants import data_key
from common.errors import ConfigError, Unauthorized

__all__ = [
    "ALGORITHM",
    "AUDIENCE",
    "CURRENT_KID",
    "ISSUER",
    "SIGNING_KEYS",
    "Keyring",
    "SigningKey",
    "check_secret",
    "header_kid",
    "issue",
    "key_id",
    "verify",
]

ISSUER = "switchboard"
AUDIENCE = "switchboard"
ALGORITHM = "HS256"
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32
REQUIRED_CLAIMS = ("sub", "name", "roles", "scope", "sid", "iat", "exp", "iss", "aud", "jti")
# How far ahead of our clock a token's `iat`/`nbf` may be, and how far behind its key's
# `created_at` its `iat` may be (the clocks of two hosts differ).
CLOCK_SKEW = 5.0

SIGNING_KEYS = data_key("auth", "signing_keys")
CURRENT_KID = data_key("auth", "signing_kid")


def key_id(secret: str) -> str:
    """A public, stable name for a signing key; it reveals nothing usable about the key."""
    return hashlib.sha256(b"switchboard-kid:" + secret.encode()).hexdigest()[:16]


def check_secret(secret: str) -> str:
    """`secret` if it is long enough to sign with, else `ConfigError`."""
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes long")
    return secret


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key of the keyring. `retire_at` is None while it may still become current."""

    kid: str
    secret: str
    created_at: float
    retire_at: float | None = None

    @classmethod
    def create(cls, secret: str | None = None, *, now: float | None = None) -> SigningKey:
        """A new key from `secret`, or from a freshly generated one."""
        secret = check_secret(secret) if secret else secrets.token_urlsafe(48)
        return cls(key_id(secret), secret, time.time() if now is None else now)

    def active(self, now: float) -> bool:
        """Whether tokens signed with this key are still accepted at `now`."""
        return self.retire_at is None or now < self.retire_at

    def to_json(self) -> str:
        return json.dumps(
            {"secret": self.secret, "created_at": self.created_at, "retire_at": self.retire_at}
        )

    @classmethod
    def from_json(cls, kid: str | bytes, raw: str | bytes) -> SigningKey:
        """The key stored under `kid`; `ValueError` if the stored JSON is malformed."""
        try:
            data = json.loads(raw)
            retire_at = data.get("retire_at")
            return cls(
                as_text(kid),
                str(data["secret"]),
                float(data["created_at"]),
                None if retire_at is None else float(retire_at),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed signing key {as_text(kid)!r}") from exc


def issue(
    key: SigningKey,
    *,
    subject: str,
    name: str,
    roles: Iterable[str],
    scopes: Iterable[str],
    session_id: str,
    ttl: int,
    now: float | None = None,
    token_id: str | None = None,
) -> str:
    """A signed access token (no credential check: the caller has done that)."""
    issued = int(time.time() if now is None else now)
    claims = {
        "sub": subject,
        "name": name,
        "roles": sorted(roles),
        "scope": " ".join(sorted(scopes)),
        "sid": session_id,
        "iat": issued,
        "exp": issued + ttl,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "jti": token_id or uuid.uuid4().hex,
    }
    return jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers={"kid": key.kid})


def header_kid(token: str) -> str | None:
    """The `kid` of a token's header (None if it names none); `Unauthorized` if unreadable.

    The first look at a token's text: a token is ASCII, and anything else (the
    surrogates a header's undecodable bytes arrive as, or a JSON `\\ud800`) is an
    invalid token here rather than an encoding error inside PyJWT.
    """
    if not token.isascii():
        raise Unauthorized("invalid token: not ASCII")
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid token: {exc}") from None
    return kid if isinstance(kid, str) else None


def verify(
    token: str, keys: Mapping[str, SigningKey], *, now: float | None = None
) -> dict[str, Any]:
    """The claims of a valid access token signed by one of `keys`.

    `Unauthorized` for anything else: expired, bad signature, an algorithm
    other than HS256 (`none` included), an unknown or retired key, wrong
    audience or issuer, a required claim missing or of the wrong type, issued
    before its key was stored.
    Times are checked against `now` (default: the clock), not PyJWT's own.
    """
    now = time.time() if now is None else now
    kid = header_kid(token)
    if kid is None:
        raise Unauthorized("invalid token: no key id (kid) in the header")
    key = keys.get(kid)
    if key is None:
        raise Unauthorized("invalid token: unknown signing key")
    if not key.active(now):
        raise Unauthorized("invalid token: signing key retired")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.secret,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={
                "require": list(REQUIRED_CLAIMS),
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid token: {exc}") from None
    _check_claims(claims, now)
    if claims["iat"] < key.created_at - CLOCK_SKEW:
        # Signed by an earlier incarnation of the same secret (JWT_SECRET seeds the key
        # again after Redis lost the keyring), so checked against sessions and
        # revocations that are gone with it.
        raise Unauthorized("invalid token: issued before its signing key was stored")
    return claims


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_claims(claims: dict[str, Any], now: float) -> None:
    for name in ("exp", "iat"):
        if not _number(claims[name]):
            raise Unauthorized(f"invalid token: {name} must be a number")
    if claims["exp"] <= now:
        raise Unauthorized("token expired")
    nbf = claims.get("nbf")
    if nbf is not None and (not _number(nbf) or nbf > now + CLOCK_SKEW):
        raise Unauthorized("invalid token: not yet valid")
    if claims["iat"] > now + CLOCK_SKEW:
        raise Unauthorized("invalid token: issued in the future")
    for name in ("name", "scope", "sid"):
        if not isinstance(claims[name], str):
            raise Unauthorized(f"invalid token: {name} must be a string")
    roles = claims["roles"]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Unauthorized("invalid token: roles must be a list of strings")


# Install the first key unless a usable current key exists (SET NX, for a keyring).
_ENSURE = """
local current = redis.call('GET', KEYS[2])
if current and redis.call('HEXISTS', KEYS[1], current) == 1 then return current end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
return ARGV[1]
"""

# Make ARGV[1] current and give the previous current key its retire_at (ARGV[3]).
_ROTATE = """
local old = redis.call('GET', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
if old and old ~= ARGV[1] then
  local raw = redis.call('HGET', KEYS[1], old)
  if raw then
    local key = cjson.decode(raw)
    if type(key['retire_at']) ~= 'number' then
      key['retire_at'] = tonumber(ARGV[3])
      redis.call('HSET', KEYS[1], old, cjson.encode(key))
    end
  end
end
return old
"""


class Keyring:
    """The signing keys in Redis: the first key, loading, rotation, pruning.

    `configured_secret` (JWT_SECRET) only seeds the first key: once a keyring
    exists it wins, so that rotation keeps working whatever the environment says.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        configured_secret: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.configured_secret = check_secret(configured_secret) if configured_secret else None
        self.clock = clock
        self._ensure = redis.register_script(_ENSURE)
        self._rotate = redis.register_script(_ROTATE)

    async def ensure(self) -> str:
        """The current kid, creating the first key if there is none (once for all processes)."""
        first = SigningKey.create(self.configured_secret, now=self.clock())
        keys, args = [SIGNING_KEYS, CURRENT_KID], [first.kid, first.to_json()]
        kid = await self._ensure(keys=keys, args=args)
        return as_text(kid)

    async def load(self) -> tuple[str | None, dict[str, SigningKey]]:
        """The current kid and every stored key (retiring ones included), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(CURRENT_KID)
            pipe.hgetall(SIGNING_KEYS)
            current, raw = await pipe.execute()
        keys: dict[str, SigningKey] = {}
        for kid, data in raw.items():
            key = SigningKey.from_json(kid, data)
            keys[key.kid] = key
        return (as_text(current) if current is not None else None), keys

    async def current(self) -> SigningKey:
        """The key to sign new tokens with (creating the first one if needed)."""
        kid, keys = await self.load()
        if kid is None or kid not in keys:
            kid = await self.ensure()
            _, keys = await self.load()
        return keys[kid]

    async def rotate(self, *, grace: float) -> SigningKey:
        """Make a new generated key current; the previous one verifies for `grace` more seconds."""
        now = self.clock()
        new = SigningKey.create(now=now)
        await self._rotate(
            keys=[SIGNING_KEYS, CURRENT_KID],
            args=[new.kid, new.to_json(), f"{now + grace:.3f}"],
        )
        await self.prune()
        return new

    async def prune(self) -> list[str]:
        """Remove keys past their `retire_at` (never the current one); their kids."""
        current, keys = await self.load()
        now = self.clock()
        retired = [kid for kid, key in keys.items() if not key.active(now) and kid != current]
        if retired:
            await self.redis.hdel(SIGNING_KEYS, *retired)
        return retired
