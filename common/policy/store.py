"""Reading and writing the live policy in Redis: versioned, audited, announced.

A write (`put` a whole document, or `patch` the stored one with a JSON merge
patch) is validated first, then applied by one Lua script that checks the version
it was built on (compare-and-set), so two admins editing at once never overwrite
each other silently: the second gets `Conflict`, or, without an expected version,
has its patch applied again to the new version. A `put` that leaves out a section
the stored policy has entries in is refused (`common.policy.sections`). The same
script keeps the last `HISTORY_KEEP` versions, appends to the audit stream
(trimmed to about `AUDIT_MAXLEN` entries) with the actor, Redis's time and the
changed paths, and publishes the new version on `POLICY_CHANNEL`, all
atomically. Keys are hash-tagged `{policy}`: one Cluster slot.

The first write into an empty store also draws the store's epoch, a random id.
Versions count up from 1 again after Redis loses its data, so a reader that
must tell "the version I hold" from "a new document that got the same number"
compares the epoch too (`stamp`, `load`).

Data set by hand (or corrupted) in Redis is an error, never a crash: a stored
document that is not JSON, or not a valid policy, is `PolicyInvalid` on reading
and patching (a `put` over it repairs it); a version that is not an integer is
`PolicyUnreadable`, for reads and writes alike, until it is repaired in Redis, and
so is one of the store's keys holding another Redis type (a `put` checks all five
before it writes anything: a Lua script's writes are not rolled back when a later
command of it fails). An audit entry whose fields do not read shows them as None
in `history`.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import constants
from common.connection import REDIS_DOWN_ERRORS, as_text
from common.errors import Conflict, RedisUnavailable, quoted
from common.policy.diff import changed_paths
from common.policy.merge import merge_patch
from common.policy.model import (
    DEFAULT_POLICY,
    ROOT,
    PolicyDocument,
    PolicyInvalid,
    PolicyUnreadable,
    validate_document,
    validate_json,
)
from common.policy.sections import missing_sections, removal_refusals

HISTORY_KEEP = 50
AUDIT_MAXLEN = 1000
# Attempts of a put without `expected_version` when other writers keep winning the race.
_CAS_TRIES = 20
# A version as the script writes it. (int() also reads " 7", "1_0" and other scripts'
# digits, which the script's tonumber() does not.)
_VERSION = re.compile(rb"[0-9]{1,18}")

# KEYS: doc, version, history, audit, epoch.
# ARGV: version the document was built on, document JSON, versions to keep,
#       actor, changes JSON, audit length, channel, an epoch for an empty store,
#       then the Redis type each key must have (or not exist).
# Returns {1, new version}, {0, current version} when the version moved, or
# {2, key} when a key holds another type: then nothing is written.
_PUT = """
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  if kind ~= 'none' and kind ~= ARGV[8 + i] then
    return {2, key}
  end
end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current}
end
if redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('SET', KEYS[5], ARGV[8])
end
local version = current + 1
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], version)
redis.call('HSET', KEYS[3], version, ARGV[2])
local floor = version - tonumber(ARGV[3])
for _, field in ipairs(redis.call('HKEYS', KEYS[3])) do
  local n = tonumber(field)
  if n == nil or n <= floor then
    redis.call('HDEL', KEYS[3], field)
  end
end
local now = redis.call('TIME')
local at = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*',
  'version', version, 'actor', ARGV[4], 'at', at, 'changes', ARGV[5])
redis.call('PUBLISH', ARGV[7], version)
return {1, version}
"""
_KEYS = (constants.POLICY_DOC, constants.POLICY_VERSION, constants.POLICY_HISTORY,
         constants.POLICY_AUDIT, constants.POLICY_EPOCH)  # fmt: skip
_KEY_TYPES = ("string", "string", "hash", "stream", "string")


class PolicyStore:
    """The policy document in Redis. Redis unreachable raises `RedisUnavailable`."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._put = redis.register_script(_PUT)

    async def get(self) -> PolicyDocument:
        """The current document; `DEFAULT_POLICY` when none was ever stored.

        Raises `PolicyInvalid` if the stored document was corrupted by hand.
        """
        return (await self.load())[0]

    async def load(self) -> tuple[PolicyDocument, str | None]:
        """The current document (as `get`) and the store's epoch (None before any write)."""
        try:
            raw, epoch = await self.redis.mget(constants.POLICY_DOC, constants.POLICY_EPOCH)
        except REDIS_DOWN_ERRORS as exc:
            raise RedisUnavailable("cannot read the policy: redis unreachable") from exc
        document = DEFAULT_POLICY if raw is None else validate_json(raw)
        return document, _text(epoch)

    async def stamp(self) -> tuple[int, str | None]:
        """The current version (0: none stored) and the store's epoch, in one round trip."""
        try:
            raw, epoch = await self.redis.mget(constants.POLICY_VERSION, constants.POLICY_EPOCH)
        except REDIS_DOWN_ERRORS as exc:
            raise RedisUnavailable("cannot read the policy version: redis unreachable") from exc
        return _stored_version(raw), _text(epoch)

    async def get_version(self, version: int) -> PolicyDocument | None:
        """The document as it was at `version` (one of the last `HISTORY_KEEP`), or None."""
        if version == 0:
            return DEFAULT_POLICY
        try:
            raw = await self.redis.hget(constants.POLICY_HISTORY, str(version))
        except REDIS_DOWN_ERRORS as exc:
            raise RedisUnavailable("cannot read the policy history: redis unreachable") from exc
        except ResponseError as exc:
            raise _wrong_type(constants.POLICY_HISTORY, exc) from None
        return None if raw is None else validate_json(raw)

    async def put(
        self, data: object, *, actor: str, expected_version: int | None = None
    ) -> PolicyDocument:
        """Validate `data` and store it as the next version; the stored document is returned.

        `data`'s own "version" is ignored. With `expected_version`, the write
        happens only if the current version is that one, else `Conflict`.
        Raises `PolicyInvalid` (nothing stored) for a bad document, or one that leaves
        out a section the stored policy has entries in (`common.policy.sections`), and
        `PolicyUnreadable` for a stored version that is not an integer.
        """
        candidate = validate_document(data)
        missing = missing_sections(data)

        def build(stored: dict[str, Any]) -> PolicyDocument:
            refusals = removal_refusals(missing, stored)
            if refusals:
                raise PolicyInvalid(refusals)
            return candidate

        return await self._write(build, actor, expected_version)

    async def patch(
        self, patch: object, *, actor: str, expected_version: int | None = None
    ) -> PolicyDocument:
        """Apply JSON merge patch `patch` (RFC 7396, `common.policy.merge`) to the stored
        document and store the result as the next version; the stored document is returned.

        The patch is applied to the version it is written over (compare-and-set, as
        `put`): a concurrent write makes it `Conflict` with `expected_version`, else it is
        applied again to the new version. A "version" in the patch is ignored. Raises
        `PolicyInvalid` (nothing stored) when the result is not a valid policy, or when the
        stored document is not one (a `put` replaces it), and `PolicyUnreadable` as `put`.
        """
        if not isinstance(patch, dict):
            raise PolicyInvalid([{"loc": ROOT, "msg": "a merge patch must be a JSON object"}])
        changes = {k: v for k, v in patch.items() if k != "version"}

        def build(stored: dict[str, Any]) -> PolicyDocument:
            return validate_document(merge_patch(stored, changes))

        return await self._write(build, actor, expected_version, strict_base=True)

    async def _write(
        self,
        build: Callable[[dict[str, Any]], PolicyDocument],
        actor: str,
        expected_version: int | None,
        *,
        strict_base: bool = False,
    ) -> PolicyDocument:
        """Store `build(stored document as JSON)` as the next version, compare-and-set on
        the version read (retried when another writer wins, unless `expected_version`).
        `strict_base`: the stored document must be a valid policy, else `PolicyInvalid`."""
        try:
            for _ in range(_CAS_TRIES):
                raw_doc, raw_version = await self._read_for_put()
                current = _stored_version(raw_version)
                if expected_version is not None and current != expected_version:
                    raise _conflict(current, expected_version)
                loose = _loose(raw_doc)
                new = build(_strict(raw_doc) if strict_base else loose)
                new = new.model_copy(update={"version": current + 1})
                changes = changed_paths(loose, new.model_dump(mode="json"))
                args = (current, new.to_json(), HISTORY_KEEP, actor, json.dumps(changes),
                        AUDIT_MAXLEN, constants.POLICY_CHANNEL, secrets.token_hex(8),
                        *_KEY_TYPES)  # fmt: skip
                written, version = await self._put(keys=_KEYS, args=args)
                if written == 2:
                    raise _another_type(as_text(version))
                if written:
                    return new
                if expected_version is not None:
                    raise _conflict(int(version), expected_version)
        except REDIS_DOWN_ERRORS as exc:
            raise RedisUnavailable("cannot write the policy: redis unreachable") from exc
        raise Conflict("the policy kept changing while it was written; try again")

    async def _read_for_put(self) -> tuple[Any, Any]:
        """The stored document and version, in one round trip. Unlike MGET (which reads a
        key of another type as missing), a key of another type is `PolicyUnreadable`:
        a version read as 0 would answer a put's `expected_version` with a false 409."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(constants.POLICY_DOC)
        pipe.get(constants.POLICY_VERSION)
        replies = await pipe.execute(raise_on_error=False)
        keys = (constants.POLICY_DOC, constants.POLICY_VERSION)
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, ResponseError):
                raise _wrong_type(key, reply)
        return replies[0], replies[1]

    async def history(self, limit: int = 20) -> list[dict[str, Any]]:
        """The last `limit` audit entries, newest first: version, actor, at, changes.

        A field of an entry that does not read (set by hand) is None: the other
        entries, and that entry's other fields, are still shown.
        """
        try:
            entries = await self.redis.xrevrange(constants.POLICY_AUDIT, count=limit)
        except REDIS_DOWN_ERRORS as exc:
            raise RedisUnavailable("cannot read the policy audit log: redis unreachable") from exc
        except ResponseError as exc:
            raise _wrong_type(constants.POLICY_AUDIT, exc) from None
        out = []
        for entry_id, fields in entries or []:
            # Not as_text: a field set by hand need not be UTF-8.
            f = {_lenient(k): _lenient(v) for k, v in (fields or {}).items()}
            out.append({
                "id": as_text(entry_id or ""),
                "version": _audit_version(f.get("version", "0")),
                "actor": f.get("actor", ""),
                "at": _audit_time(f.get("at", "0")),
                "changes": _audit_changes(f.get("changes", "[]")),
            })  # fmt: skip
        return out


def _text(raw: bytes | str | None) -> str | None:
    return None if raw is None else as_text(raw)


def _stored_version(raw: bytes | str | None) -> int:
    """The stored version (0: none), or `PolicyUnreadable`."""
    if raw is None:
        return 0
    data = raw.encode() if isinstance(raw, str) else raw
    if not _VERSION.fullmatch(data):
        shown = quoted(data.decode(errors="replace"))
        raise PolicyUnreadable(
            f"the stored policy version is not an integer ({shown}): "
            f"repair {constants.POLICY_VERSION} in Redis"
        )
    return int(data)


def _wrong_type(key: str, exc: ResponseError) -> Exception:
    """`PolicyUnreadable` for a WRONGTYPE reply on `key`; any other error reply as it is."""
    return _another_type(key) if str(exc).startswith("WRONGTYPE") else exc


def _another_type(key: str) -> PolicyUnreadable:
    return PolicyUnreadable(
        f"{key} holds another Redis type than the policy store writes: repair or delete it in Redis"
    )


def _lenient(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


def _audit_version(text: str) -> int | None:
    return int(text) if _VERSION.fullmatch(text.encode()) else None


def _audit_time(text: str) -> float | None:
    try:
        at = float(text)
    except ValueError:
        return None
    return at if math.isfinite(at) and at >= 0 else None


def _audit_changes(text: str) -> list[str] | None:
    try:
        changes = json.loads(text)
    except ValueError:
        return None
    if isinstance(changes, list) and all(isinstance(c, str) for c in changes):
        return changes
    return None


def _conflict(current: int, expected: int) -> Conflict:
    return Conflict(f"the policy is at version {current}, not {expected}: reload and retry")


def _strict(raw: bytes | str | None) -> dict[str, Any]:
    """The stored document as JSON, valid (without its version), or `PolicyInvalid`."""
    try:
        document = DEFAULT_POLICY if raw is None else validate_json(raw)
    except PolicyInvalid as exc:
        reasons = "; ".join(f"{e['loc']}: {e['msg']}" for e in exc.errors[:3])
        raise PolicyInvalid([{
            "loc": ROOT,
            "msg": f"the stored policy is not valid ({reasons}): a patch cannot apply to it; "
                   "PUT a whole document to replace it",
        }]) from None  # fmt: skip
    data = document.model_dump(mode="json")
    del data["version"]
    return data


def _loose(raw: bytes | str | None) -> dict[str, Any]:
    """The stored document as plain JSON for the diff (whatever state it is in)."""
    if raw is None:
        return DEFAULT_POLICY.model_dump(mode="json")
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
