"""Users: accounts with a password, roles and scopes.

```
sb:{auth}:usernames        hash  lower-cased username -> user id (claimed atomically with the user)
sb:{auth}:user:<user id>   hash  user_id, username, password_hash, created_at (ISO 8601),
                                 roles, scopes (both space-separated),
                                 narrowing (only while a narrowing's clean-up is not done)
sb:{auth}:admins           set   the ids of the users with the admin role
sb:{auth}:admins:indexed   string  present once `admins` was built from every user
```

Roles are `user` and `admin`. A user's stored scopes never include `admin`:
that scope comes with the admin role (`User.scopes_granted`).

There is always an admin once there was one: taking the admin role from the last
user who has it is refused (`Conflict`), since nobody could reach the admin API
afterwards. Registration is open, so that check must not grow with the number of
users: `admins` indexes the admins, written in the same script or MULTI as every
write of roles, and a demotion is one script that checks and writes at once
(other users' writes meanwhile, registrations included, do not disturb it). The
index says whom to look at, the records decide: another admin counts only if its
own `roles` still has the role, so a stale member cannot let the last admin go.

Upgrade (users from before the index): `prepare`, at the service's start-up,
builds the index unless the marker `admins:indexed` is there; a demotion that
finds no marker builds it first. The build gives each user one atomic script
(its record decides its membership): no WATCH, safe beside any writer or another
build; the marker is set once every user was visited. During a rolling deploy,
old instances change roles without the index: an admin they demote stays a
member (stale: ignored, and dropped by the next demotion), one they create or
promote is missing (an over-cautious refusal at worst; promoting it again indexes
it). Their own demotions read every record under WATCH, which sees the new
writes too, so a mixed rollout cannot end with no admin.

A change of roles or scopes that narrows them can be marked (`narrowing`: an id)
in the same write: the mark says the clean-up that must follow (`Accounts`) is
not done yet, so whoever reads the user next can finish it, and only
`narrowing_done` with the same id removes it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from common.connection import as_text
from common.constants import data_key
from common.errors import BadRequest, Conflict, NotFound, Unauthorized, quoted
from common.log import get_logger
from common.scopes import ADMIN, REGISTRY, parse, valid_scope
from microservices.auth.passwords import Passwords, password_fault, valid_password

log = get_logger(__name__)

USERNAME = re.compile(r"[A-Za-z0-9_.-]{3,64}")
USER_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ROLES = ("user", "admin")
INVALID_LOGIN = "invalid username or password"
LAST_ADMIN = "the last admin cannot lose the admin role: make another user an admin first"
# A demotion is retried when the admins changed between reading them and the check;
# past this many tries it is refused, to try again.
DEMOTE_TRIES = 10
# Users indexed per script when the admins index is built.
INDEX_BATCH = 1000
USERNAMES = data_key("auth", "usernames")
ADMINS = data_key("auth", "admins")
ADMINS_INDEXED = data_key("auth", "admins", "indexed")

# Whether a stored `roles` field (nil: a user from before roles, a `user`) has admin;
# put before the scripts that call it.
_HAS_ADMIN = """
local function has_admin(roles)
  if not roles then return false end
  for role in string.gmatch(roles, '%S+') do
    if role == 'admin' then return true end
  end
  return false
end
"""

# Claim the username and create the user in one step, so a crash can never leave
# a username pointing at no user, and two registrations cannot both win; an admin
# is indexed in the same step. KEYS: usernames, user, admins.
_CREATE_USER = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'user_id', ARGV[2], 'username', ARGV[3], 'password_hash', ARGV[4],
           'created_at', ARGV[5], 'roles', ARGV[6], 'scopes', ARGV[7])
if ARGV[8] == '1' then redis.call('SADD', KEYS[3], ARGV[2]) end
return 1
"""

# Store roles without admin (KEYS[3], the user ARGV[1]) unless that takes the role
# from the last admin. KEYS: admins, admins:indexed, user, then the records of the
# admins read before (ARGV[4]...); ARGV: user id, roles, narrowing mark ('' none).
# 'retry': the admins changed since they were read.
_DEMOTE = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 'unindexed' end
if redis.call('EXISTS', KEYS[3]) == 0 then return 'missing' end
if has_admin(redis.call('HGET', KEYS[3], 'roles')) then
  local read = {}
  for i = 4, #ARGV do read[ARGV[i]] = true end
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    if id ~= ARGV[1] and not read[id] then return 'retry' end
  end
  local other = false
  for i = 4, #KEYS do
    if has_admin(redis.call('HGET', KEYS[i], 'roles')) then
      other = true
    else  -- stale: demoted by an instance from before the index
      redis.call('SREM', KEYS[1], ARGV[i])
    end
  end
  if not other then return 'last' end
end
redis.call('HSET', KEYS[3], 'roles', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], 'narrowing', ARGV[3]) end
redis.call('SREM', KEYS[1], ARGV[1])
return 'ok'
"""

# Make the membership of the admins index (KEYS[1]) of users (KEYS[2]..., ids ARGV[1]...)
# what their records say, atomically: whatever the order with a write of roles, the two
# agree. How many were added.
_INDEX = """
local added = 0
for i = 2, #KEYS do
  if has_admin(redis.call('HGET', KEYS[i], 'roles')) then
    added = added + redis.call('SADD', KEYS[1], ARGV[i - 1])
  else
    redis.call('SREM', KEYS[1], ARGV[i - 1])
  end
end
return added
"""

# Remove a narrowing mark unless a newer narrowing replaced it (whose clean-up is due).
_NARROWING_DONE = """
if redis.call('HGET', KEYS[1], 'narrowing') == ARGV[1] then
  return redis.call('HDEL', KEYS[1], 'narrowing')
end
return 0
"""


def user_key(user_id: str) -> str:
    """One user's record."""
    return data_key("auth", "user", user_id)


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    username: str
    roles: frozenset[str]
    scopes: frozenset[str]
    created_at: datetime
    password_hash: str = field(repr=False)
    # The id of a narrowing of roles or scopes whose clean-up may not be done.
    narrowing: str | None = None

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.roles

    @property
    def scopes_granted(self) -> frozenset[str]:
        """What this user's credentials may reach: the stored scopes, plus `admin` for admins."""
        return self.scopes | {ADMIN} if self.is_admin else self.scopes

    def describe(self) -> dict[str, Any]:
        """The public view: {user_id, username, roles, scopes} (never the hash)."""
        return {
            "user_id": self.user_id,
            "username": self.username,
            "roles": sorted(self.roles),
            "scopes": sorted(self.scopes_granted),
        }


def check_roles(roles: Iterable[str]) -> frozenset[str]:
    wanted = frozenset(roles)
    if not wanted or not wanted <= set(ROLES):
        raise BadRequest(f"roles must be a non-empty subset of {', '.join(ROLES)}")
    return wanted


def check_user_scopes(scopes: Iterable[str]) -> frozenset[str]:
    wanted = frozenset(scopes)
    bad = sorted(s for s in wanted if not valid_scope(s))
    if bad:
        raise BadRequest(f"invalid scopes: {', '.join(bad)}")
    if ADMIN in wanted:
        raise BadRequest("the admin scope comes with the admin role: use set_roles")
    return wanted


class Users:
    """User records over one Redis connection pool."""

    def __init__(
        self, redis: aioredis.Redis, passwords: Passwords, *, default_scopes: frozenset[str]
    ) -> None:
        self.redis = redis
        self.passwords = passwords
        self.default_scopes = check_user_scopes(default_scopes)
        if REGISTRY in self.default_scopes:
            # Anyone may sign up: `registry` decides where other users' requests (and
            # their bearer tokens) go, so only an admin gives it, to a named user or key.
            raise BadRequest("registry is given by an admin, never to every new user")
        self._create = redis.register_script(_CREATE_USER)
        self._demote = redis.register_script(_HAS_ADMIN + _DEMOTE)
        self._index = redis.register_script(_HAS_ADMIN + _INDEX)
        self._narrowing_done = redis.register_script(_NARROWING_DONE)

    async def prepare(self) -> None:
        """Build the admins index unless it was built (see the upgrade, above)."""
        if not await self.redis.exists(ADMINS_INDEXED):
            await self.index_admins()

    async def index_admins(self) -> None:
        """Index every user's admin role, then mark the index built.

        `INDEX_BATCH` users per script (a millisecond or two of Redis each): no
        WATCH, and safe beside registrations, role changes and another build.
        """
        cursor, users, added = 0, 0, 0
        while True:
            cursor, page = await self.redis.hscan(USERNAMES, cursor, count=INDEX_BATCH)
            ids = [as_text(v) for v in page.values()]  # type: ignore[union-attr]
            if ids:
                keys = [ADMINS, *map(user_key, ids)]
                added += int(await self._index(keys=keys, args=ids))
            users += len(ids)
            if cursor == 0:
                break
        await self.redis.set(ADMINS_INDEXED, "1")
        log.info("admins index built", extra={"fields": {"users": users, "added": added}})

    async def create(
        self, username: str, password: str, *, roles: Iterable[str] = ("user",)
    ) -> User:
        """A new user; `BadRequest` for a malformed name or password, `Conflict` if taken."""
        if not USERNAME.fullmatch(username):
            raise BadRequest("username must be 3 to 64 characters of A-Z, a-z, 0-9, _ . -")
        if (fault := password_fault(password)) is not None:
            raise BadRequest(fault)
        roles = check_roles(roles)
        folded = username.lower()
        # Cheap early answer; the script below is what guarantees uniqueness.
        if await self.redis.hexists(USERNAMES, folded):
            raise Conflict(f"username {username!r} is taken")
        user = User(
            user_id=str(uuid.uuid4()),
            username=username,
            roles=roles,
            scopes=self.default_scopes,
            created_at=datetime.now(UTC),
            password_hash=await self.passwords.hash(password),
        )
        args = [folded, user.user_id, username, user.password_hash, user.created_at.isoformat()]
        args += [" ".join(sorted(roles)), " ".join(sorted(user.scopes))]
        args += ["1" if user.is_admin else "0"]
        keys = [USERNAMES, user_key(user.user_id), ADMINS]
        created = await self._create(keys=keys, args=args)
        if not created:
            raise Conflict(f"username {username!r} is taken")
        fields = {"user_id": user.user_id, "username": username, "roles": sorted(roles)}
        log.info("user registered", extra={"fields": fields})
        return user

    async def get(self, user_id: str) -> User | None:
        if not USER_ID.fullmatch(user_id):
            return None
        raw = await self.redis.hgetall(user_key(user_id))
        return self._from_fields(raw) if raw else None

    async def require(self, user_id: str) -> User:
        """The user, or `NotFound`."""
        user = await self.get(user_id)
        if user is None:
            raise NotFound(f"no user {quoted(user_id)}")
        return user

    async def find(self, username: str) -> User | None:
        """The user of `username`, matched ignoring case."""
        if not USERNAME.fullmatch(username):
            return None
        user_id = await self.redis.hget(USERNAMES, username.lower())
        return None if user_id is None else await self.get(as_text(user_id))

    async def check_password(self, username: str, password: str) -> User:
        """The user if the password is right, else `Unauthorized`.

        Every failure gives the same message after one argon2 verification, so
        neither the answer nor its timing tells whether the username exists.
        """
        user = await self.find(username)
        if user is None or not valid_password(password):
            await self.passwords.verify_dummy(password)
            raise Unauthorized(INVALID_LOGIN)
        if not await self.passwords.verify(user.password_hash, password):
            raise Unauthorized(INVALID_LOGIN)
        if self.passwords.needs_rehash(user.password_hash):
            # The hasher's parameters changed since this hash was made: upgrade
            # it now, while we know the password.
            new_hash = await self.passwords.hash(password)
            await self.redis.hset(user_key(user.user_id), "password_hash", new_hash)
            log.info("password rehashed", extra={"fields": {"user_id": user.user_id}})
        return user

    async def set_roles(
        self, user_id: str, roles: Iterable[str], *, narrowing: str | None = None
    ) -> User:
        """Set a user's roles, marked `narrowing` if given; `Conflict` if that would leave
        no admin."""
        wanted = check_roles(roles)
        value = " ".join(sorted(wanted))
        if ADMIN in wanted:
            await self._update(user_id, "roles", value, narrowing, admin=True)
        else:
            await self._set_roles_without_admin(user_id, value, narrowing)
        return await self.require(user_id)

    async def _set_roles_without_admin(
        self, user_id: str, value: str, narrowing: str | None
    ) -> None:
        """Store roles without `admin`, unless the user is the last admin.

        The admins are read from the index, then one script checks that another
        of them (by its own record) is still an admin and writes the roles, so of
        two demotions racing for the last two admins only one passes. It starts
        again only if the admins changed in between, never for other users' writes.
        """
        if not USER_ID.fullmatch(user_id):
            raise NotFound(f"no user {quoted(user_id)}")
        for _ in range(DEMOTE_TRIES):
            members = await self.redis.smembers(ADMINS)
            others = sorted(o for o in map(as_text, members) if o != user_id)
            keys = [ADMINS, ADMINS_INDEXED, user_key(user_id), *map(user_key, others)]
            args = [user_id, value, narrowing or "", *others]
            status = as_text(await self._demote(keys=keys, args=args))
            if status == "ok":
                log.info("user roles set", extra={"fields": {"user_id": user_id, "roles": value}})
                return
            if status == "missing":
                raise NotFound(f"no user {quoted(user_id)}")
            if status == "last":
                raise Conflict(LAST_ADMIN)
            if status == "unindexed":  # no instance has built the index yet
                await self.index_admins()
            # 'retry': the admins changed since they were read: read them again
        raise Conflict("the admins changed during the role change: try again")

    async def set_scopes(
        self, user_id: str, scopes: Iterable[str], *, narrowing: str | None = None
    ) -> User:
        """Set a user's scopes, marked `narrowing` if given."""
        wanted = check_user_scopes(scopes)
        await self._update(user_id, "scopes", " ".join(sorted(wanted)), narrowing)
        return await self.require(user_id)

    async def narrowing_done(self, user_id: str, narrowing: str) -> None:
        """Remove the mark `narrowing` (its clean-up is done), unless a newer one replaced it."""
        await self._narrowing_done(keys=[user_key(user_id)], args=[narrowing])

    async def all(self) -> list[User]:
        """Every user, by username."""
        ids = [as_text(v) for v in (await self.redis.hgetall(USERNAMES)).values()]
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id in ids:
                pipe.hgetall(user_key(user_id))
            rows = await pipe.execute()
        users = [self._from_fields(raw) for raw in rows if raw]
        return sorted(users, key=lambda u: u.username.lower())

    async def _update(
        self, user_id: str, field_name: str, value: str, narrowing: str | None, *,
        admin: bool = False,
    ) -> None:  # fmt: skip
        """Write one field (and its mark); `admin`: roles with admin, indexed in the same MULTI."""
        await self.require(user_id)
        # One HSET: the value and its mark land together or not at all.
        async with self.redis.pipeline(transaction=admin) as pipe:
            pipe.hset(user_key(user_id), mapping=_fields(field_name, value, narrowing))
            if admin:
                pipe.sadd(ADMINS, user_id)
            await pipe.execute()
        fields = {"user_id": user_id, field_name: value}
        log.info(f"user {field_name} set", extra={"fields": fields})

    def _from_fields(self, raw: Mapping[Any, Any]) -> User:
        fields = {as_text(k): as_text(v) for k, v in raw.items()}
        # Users created before roles and scopes existed get the defaults.
        scopes = fields.get("scopes")
        return User(
            user_id=fields["user_id"],
            username=fields["username"],
            roles=parse(fields.get("roles") or "user"),
            scopes=self.default_scopes if scopes is None else parse(scopes) - {ADMIN},
            created_at=datetime.fromisoformat(fields["created_at"]),
            password_hash=fields["password_hash"],
            narrowing=fields.get("narrowing"),
        )


def _fields(name: str, value: str, narrowing: str | None) -> dict[FieldT, EncodableT]:
    return {name: value} if narrowing is None else {name: value, "narrowing": narrowing}
