"""API keys: their text form, their hash, and their record in Redis.

A key reads `sbk_<key id>_<secret>`: the key id (12 hex digits) names the
record, the secret (32 random bytes, URL-safe base64) proves possession. Only
a SHA-256 of the secret is stored: the secret is high-entropy random, so a fast
hash is right here (passwords, which are not, use argon2).

```
sb:{auth}:apikey:<key id>       hash  key_id, user_id, name, scopes (space-separated),
                                      hash (sha256 hex of the secret), created_at,
                                      expires_at ("" = never; unix seconds)
sb:{auth}:user_keys:<user id>   set   the key ids of one user
```
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from common.connection import as_text
from common.constants import data_key
from common.scopes import parse

__all__ = [
    "PREFIX",
    "ApiKeyRecord",
    "delete",
    "format_key",
    "hash_secret",
    "new_key",
    "parse_key",
    "read",
    "record_key",
    "user_keys_key",
    "write",
]

PREFIX = "sbk_"
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")  # token_urlsafe(32)
_LENGTH = len(PREFIX) + 12 + 1 + 43


def record_key(key_id: str) -> str:
    """The record of one key."""
    return data_key("auth", "apikey", key_id)


def user_keys_key(user_id: str) -> str:
    """The set of a user's key ids."""
    return data_key("auth", "user_keys", user_id)


def format_key(key_id: str, secret: str) -> str:
    return f"{PREFIX}{key_id}_{secret}"


def parse_key(text: str) -> tuple[str, str] | None:
    """`(key id, secret)` of a well-formed key, else None."""
    if len(text) != _LENGTH or not text.startswith(PREFIX) or text[16] != "_":
        return None
    key_id, secret = text[4:16], text[17:]
    if not _KEY_ID.fullmatch(key_id) or not _SECRET.fullmatch(secret):
        return None
    return key_id, secret


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """What is stored about a key (never the secret itself)."""

    key_id: str
    user_id: str
    name: str
    scopes: frozenset[str]
    secret_hash: str
    created_at: float
    expires_at: float | None = None

    def matches(self, secret: str) -> bool:
        """Whether `secret` is this key's, compared in constant time."""
        return hmac.compare_digest(hash_secret(secret), self.secret_hash)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def to_fields(self) -> dict[str, str]:
        return {
            "key_id": self.key_id,
            "user_id": self.user_id,
            "name": self.name,
            "scopes": " ".join(sorted(self.scopes)),
            "hash": self.secret_hash,
            "created_at": repr(self.created_at),
            "expires_at": "" if self.expires_at is None else repr(self.expires_at),
        }

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> ApiKeyRecord:
        """A record from its Redis hash; `ValueError` if a field is missing or malformed."""
        fields = {as_text(k): as_text(v) for k, v in raw.items()}
        try:
            expires = fields.get("expires_at", "")
            return cls(
                key_id=fields["key_id"],
                user_id=fields["user_id"],
                name=fields["name"],
                scopes=parse(fields["scopes"]),
                secret_hash=fields["hash"],
                created_at=float(fields["created_at"]),
                expires_at=float(expires) if expires else None,
            )
        except KeyError as exc:
            raise ValueError(f"API key record lacks {exc}") from None


def new_key(
    user_id: str,
    name: str,
    scopes: Iterable[str],
    *,
    expires_at: float | None = None,
    now: float | None = None,
) -> tuple[str, ApiKeyRecord]:
    """A fresh key: its text (to show once) and the record to store."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    record = ApiKeyRecord(
        key_id=key_id,
        user_id=user_id,
        name=name,
        scopes=frozenset(scopes),
        secret_hash=hash_secret(secret),
        created_at=time.time() if now is None else now,
        expires_at=expires_at,
    )
    return format_key(key_id, secret), record


async def read(redis: aioredis.Redis, key_id: str) -> ApiKeyRecord | None:
    """The record of `key_id`, or None if there is none."""
    raw = await redis.hgetall(record_key(key_id))
    return ApiKeyRecord.from_fields(raw) if raw else None


async def write(redis: aioredis.Redis, record: ApiKeyRecord) -> None:
    """Store a record and index it under its user, in one transaction."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(record_key(record.key_id), mapping=record.to_fields())  # type: ignore[arg-type]
        pipe.sadd(user_keys_key(record.user_id), record.key_id)
        await pipe.execute()


async def delete(redis: aioredis.Redis, user_id: str, key_ids: Iterable[str]) -> None:
    """Remove keys of `user_id` (records and index entries), in one transaction."""
    ids = list(key_ids)
    if not ids:
        return
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(*(record_key(k) for k in ids))
        pipe.srem(user_keys_key(user_id), *ids)
        await pipe.execute()
