"""Managing API keys: create (shown once), list, delete, and the scope rules.

The text form, hash and Redis records are `common.apikeys` (shared with the
verifiers). A key's scopes must be valid and within what its owner may reach
(`common.scopes.covers`): `admin` only for admins, `registry` only for admins and
users given it (`*` includes neither). Deleting a key publishes a
`key:` revocation, so every verifier drops its cached record at once.

A user holds at most `MAX_KEYS_PER_USER` keys. The count is checked by the
script that writes the key (`_CREATE`), so creations racing each other (many
workers, many requests) cannot pass the check together: the ones past the cap
get `Conflict` and store nothing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from common import apikeys
from common.apikeys import ApiKeyRecord
from common.connection import as_text
from common.errors import BadRequest, Conflict, Forbidden, NotFound, quoted
from common.log import get_logger
from common.revocation import revoke
from common.scopes import covers, valid_scope
from microservices.auth.users import User

log = get_logger(__name__)

MAX_KEYS_PER_USER = 100
MAX_EXPIRES_IN = 10 * 366 * 86400
KEY_ID = re.compile(r"[0-9a-f]{12}")
# Printable, no control characters (names end up in logs and dashboards).
NAME = re.compile(r"[^\x00-\x1f\x7f]{1,64}")

# KEYS: the key's record, the user's set of key ids. ARGV: the cap, the key id, then
# the record's fields as name, value pairs. 1 if written, 0 (nothing written) at the cap.
_CREATE = """
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""


def _when(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def describe(record: ApiKeyRecord) -> dict[str, Any]:
    """The public view of a key (never its hash)."""
    return {
        "key_id": record.key_id,
        "name": record.name,
        "scopes": sorted(record.scopes),
        "created_at": _when(record.created_at),
        "expires_at": _when(record.expires_at),
    }


def check_key_scopes(owner: User, scopes: Iterable[str]) -> frozenset[str]:
    """The scopes a new key of `owner` may have: `BadRequest` if malformed, `Forbidden` if wider."""
    wanted = frozenset(scopes)
    if not wanted:
        raise BadRequest("an API key needs at least one scope")
    bad = sorted(s for s in wanted if not valid_scope(s))
    if bad:
        raise BadRequest(f"invalid scopes: {', '.join(bad)}")
    granted = owner.scopes_granted
    beyond = sorted(s for s in wanted if not covers(granted, s))
    if beyond:
        raise Forbidden(f"scopes beyond the owner's: {', '.join(beyond)}")
    return wanted


class ApiKeys:
    """API keys of users; `revoke_for` is how long a deletion's revocation entry lasts."""

    def __init__(
        self, redis: aioredis.Redis, *, revoke_for: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = redis
        self.revoke_for = revoke_for
        self.clock = clock
        self._create = redis.register_script(_CREATE)

    async def create(
        self, owner: User, name: str | None, scopes: Iterable[str], expires_in: int | None
    ) -> dict[str, Any]:
        """A new key: `{key_id, api_key, name, scopes, expires_at}`; the key text is in no log."""
        wanted = check_key_scopes(owner, scopes)
        if name is not None and not NAME.fullmatch(name):
            raise BadRequest("name must be 1 to 64 printable characters")
        if expires_in is not None and not 0 < expires_in <= MAX_EXPIRES_IN:
            raise BadRequest(f"expires_in must be between 1 and {MAX_EXPIRES_IN} seconds")
        now = self.clock()
        expires_at = None if expires_in is None else now + expires_in
        text, record = apikeys.new_key(owner.user_id, name or "", wanted, expires_at=expires_at,
                                       now=now)  # fmt: skip
        if not name:
            record = replace(record, name=f"key-{record.key_id}")
        pairs = [item for pair in record.to_fields().items() for item in pair]
        keys = [apikeys.record_key(record.key_id), apikeys.user_keys_key(owner.user_id)]
        if not await self._create(keys=keys, args=[MAX_KEYS_PER_USER, record.key_id, *pairs]):
            raise Conflict(f"a user may hold at most {MAX_KEYS_PER_USER} API keys")
        fields = {"user_id": owner.user_id, "key_id": record.key_id, "scopes": sorted(wanted)}
        log.info("api key created", extra={"fields": fields})
        return {**describe(record), "api_key": text}

    async def listing(self, user_id: str) -> list[dict[str, Any]]:
        """The user's keys, oldest first."""
        return [describe(r) for r in await self.records(user_id)]

    async def records(self, user_id: str) -> list[ApiKeyRecord]:
        ids = sorted(as_text(k) for k in await self.redis.smembers(apikeys.user_keys_key(user_id)))
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(apikeys.record_key(key_id))
            rows = await pipe.execute()
        records = [ApiKeyRecord.from_fields(raw) for raw in rows if raw]
        return sorted(records, key=lambda r: r.created_at)

    async def delete(self, user_id: str, key_id: str) -> None:
        """Delete one of the user's keys; `NotFound` if it is not theirs (or does not exist)."""
        record = await self._record(key_id)
        if record is None or record.user_id != user_id:
            raise NotFound(f"no API key {quoted(key_id)} for this user")
        await self._delete(user_id, [record.key_id])

    async def revoke(self, key_id: str) -> None:
        """Delete a key whoever owns it (admin); `NotFound` if there is none."""
        record = await self._record(key_id)
        if record is None:
            raise NotFound(f"no API key {quoted(key_id)}")
        await self._delete(record.user_id, [record.key_id])

    async def delete_all(self, user_id: str) -> list[str]:
        """Delete every key of a user; their ids."""
        ids = [r.key_id for r in await self.records(user_id)]
        await self._delete(user_id, ids)
        return ids

    async def keep_within(self, owner: User) -> list[str]:
        """Delete the owner's keys whose scopes the owner no longer holds; their ids."""
        granted = owner.scopes_granted
        beyond = [r.key_id for r in await self.records(owner.user_id)
                  if not all(covers(granted, s) for s in r.scopes)]  # fmt: skip
        await self._delete(owner.user_id, beyond)
        return beyond

    async def _record(self, key_id: str) -> ApiKeyRecord | None:
        if not KEY_ID.fullmatch(key_id):
            return None
        return await apikeys.read(self.redis, key_id)

    async def _delete(self, user_id: str, key_ids: list[str]) -> None:
        if not key_ids:
            return
        await apikeys.delete(self.redis, user_id, key_ids)
        until = self.clock() + self.revoke_for
        for key_id in key_ids:
            await revoke(self.redis, f"key:{key_id}", until)
        log.info("api keys deleted", extra={"fields": {"user_id": user_id, "key_ids": key_ids}})
