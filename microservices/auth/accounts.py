"""Accounts: the auth service's operations, over users, sessions, API keys and the keyring.

`Accounts` knows nothing of RPC, so it is tested against Redis directly; the
`service` module maps each public method onto an RPC method of the same name.
The gateway is trusted to pass the authenticated caller's user id and session
id, and to allow the admin operations to admins only.

Revocations last `JWT_TTL` + 60 s (`revoke_for`): by then every access token
issued before has expired by itself. Logins are throttled per username and
client address, with an account-wide backstop (`throttle.LoginThrottle`), before
any password is checked; a login with a device token a login gave (`devices`) is
counted per device instead of per address.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from argon2 import PasswordHasher

from common import apikeys, tokens
from common.errors import BadRequest, ConfigError, Conflict, Forbidden, Unauthorized
from common.log import get_logger
from common.revocation import REVOKED, revoke
from common.scopes import covers, parse
from common.tokens import Keyring
from microservices.auth.api_keys import ApiKeys
from microservices.auth.devices import DeviceTokens
from microservices.auth.passwords import Passwords
from microservices.auth.sessions import DEFAULT_MAX_SESSIONS, SESSION_ID, Sessions
from microservices.auth.throttle import LoginThrottle, ThrottleRules
from microservices.auth.users import User, Users, check_roles, check_user_scopes

__all__ = ["REVOCATION_MARGIN", "Accounts"]

log = get_logger(__name__)

# Revocations and retiring keys outlive the longest access token by this much.
REVOCATION_MARGIN = 60.0
REVOKE_KINDS = ("session", "token", "key", "user")


class Accounts:
    """Users, sessions, API keys and signing keys over one Redis connection pool."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        ttl: int = 900,
        refresh_ttl: int = 14 * 86400,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        default_scopes: str = "*",
        configured_secret: str | None = None,
        hasher: PasswordHasher | None = None,
        hash_concurrency: int | None = None,
        throttle: ThrottleRules | None = None,
        device_days: float = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.ttl = ttl
        self.clock = clock
        self.revoke_for = ttl + REVOCATION_MARGIN
        self.passwords = Passwords(hasher, concurrency=hash_concurrency)
        try:
            self.users = Users(redis, self.passwords, default_scopes=parse(default_scopes))
        except BadRequest as exc:
            raise ConfigError(f"AUTH_DEFAULT_SCOPES: {exc.message}") from None
        self.sessions = Sessions(
            redis,
            refresh_ttl=refresh_ttl,
            revoke_for=self.revoke_for,
            max_sessions=max_sessions,
            clock=clock,
        )
        self.api_keys = ApiKeys(redis, revoke_for=self.revoke_for, clock=clock)
        self.throttle = LoginThrottle(redis, throttle or ThrottleRules(), clock=clock)
        self.devices = DeviceTokens(redis, device_days, clock=clock)
        self.keyring = Keyring(redis, configured_secret=configured_secret, clock=clock)

    async def prepare(self) -> None:
        """Create the first signing key if there is none; drop retired ones; index the
        admins of a deployment from before their index (once)."""
        await self.keyring.ensure()
        await self.keyring.prune()
        await self.users.prepare()

    # -- accounts --------------------------------------------------------------------

    async def register(
        self, username: str, password: str, address: str | None = None
    ) -> dict[str, Any]:
        """A new user: {user_id, username, roles, created_at}. The client `address` is
        known as the user's from now on (`throttle`), as after a login from it."""
        user = await self.users.create(username, password)
        await self.throttle.remember(user.username, address)
        return _registered(user)

    async def bootstrap_admin(self, username: str, password: str) -> bool:
        """Create `username` as an admin unless that user exists; whether it was created."""
        if await self.users.find(username) is not None:
            return False
        try:
            await self.users.create(username, password, roles=("user", "admin"))
        except Conflict:  # another instance bootstrapped it first
            return False
        except BadRequest as exc:
            raise ConfigError(f"AUTH_ADMIN_USERNAME/AUTH_ADMIN_PASSWORD: {exc.message}") from None
        log.info("admin bootstrapped", extra={"fields": {"username": username}})
        return True

    async def create_admin(self, username: str, password: str) -> dict[str, Any]:
        """A new admin (the CLI's `create-admin`)."""
        return _registered(await self.users.create(username, password, roles=("user", "admin")))

    async def me(self, user_id: str) -> dict[str, Any]:
        return (await self.users.require(user_id)).describe()

    async def list_users(self) -> list[dict[str, Any]]:
        return [{**u.describe(), "created_at": u.created_at} for u in await self.users.all()]

    async def set_roles(self, user_id: str, roles: list[str]) -> dict[str, Any]:
        """Set a user's roles. Losing a role ends the user's sessions (tokens carry roles)."""
        before = await self.users.require(user_id)
        mark = _narrowing(before, replace(before, roles=check_roles(roles)))
        after = await self.users.set_roles(user_id, roles, narrowing=mark)
        await self._finish_narrowing(after)
        return after.describe()

    async def set_scopes(self, user_id: str, scopes: list[str]) -> dict[str, Any]:
        """Set a user's scopes. Losing any ends the user's sessions and deletes keys beyond them."""
        before = await self.users.require(user_id)
        mark = _narrowing(before, replace(before, scopes=check_user_scopes(scopes)))
        after = await self.users.set_scopes(user_id, scopes, narrowing=mark)
        await self._finish_narrowing(after)
        return after.describe()

    async def _finish_narrowing(self, user: User) -> None:
        """The clean-up after a narrowing, if `user` (as read after it) is marked with one.

        Tokens carry roles and scopes until they expire: after a narrowing the
        old ones must stop now (logging in again gives the new ones), and keys
        beyond the new scopes go. The mark is written with the new value and
        removed only after this, so a worker killed in between leaves it, and the
        redelivered call, the next set_roles / set_scopes or the user's next login
        finishes the job: the redelivered call alone could not tell, since the
        value it reads is already the narrowed one. (Reconciling on every call
        instead cannot tell which sessions hold older, wider tokens, so it would
        end them at a widening too.) Both steps are idempotent.
        """
        if user.narrowing is None:
            return
        await self.sessions.end_all(user.user_id)
        await self.api_keys.keep_within(user)
        await self.users.narrowing_done(user.user_id, user.narrowing)

    # -- sessions --------------------------------------------------------------------

    async def login(
        self,
        username: str,
        password: str,
        address: str | None = None,
        device_token: str | None = None,
    ) -> dict[str, Any]:
        """An access token, a refresh token and a new device token for valid credentials,
        else `Unauthorized`; `TooManyAttempts`, without checking the password, while the
        username is throttled for the client `address` (None: a caller that names none,
        throttled as before addresses were: `throttle`), or for the `device_token` of an
        earlier login of the user, which replaces the address's count (`devices`)."""
        device = await self.devices.check(username, device_token)
        attempt = await self.throttle.admit(username, address, device)
        try:
            user = await self.users.check_password(username, password)
        except Unauthorized:
            await self.throttle.failed(attempt)
            raise
        except BaseException:
            with contextlib.suppress(Exception):  # it stops counting after a while anyway
                await self.throttle.abandoned(attempt)
            raise
        await self.throttle.succeeded(attempt)
        if await self._user_revoked(user.user_id):
            raise Unauthorized("this user's credentials are revoked: try again later")
        if user.narrowing is not None:  # a narrowing cut short: its clean-up first
            await self._finish_narrowing(user)
        opened = await self.sessions.open(user.user_id)
        fields: dict[str, Any] = {"user_id": user.user_id, "session_id": opened.session_id}
        if opened.ended:  # the user was at AUTH_MAX_SESSIONS_PER_USER: the oldest ended
            fields["sessions_ended"] = opened.ended
        log.info("login", extra={"fields": fields})
        answer = await self._tokens(user, opened.session_id, opened.refresh_token)
        new_device = await self.devices.issue(user.username, replacing=device)
        if new_device is not None:
            answer["device_token"] = new_device
            answer["device_expires_in"] = round(self.devices.lifetime)
        return answer

    async def refresh(self, refresh_token: str, address: str | None = None) -> dict[str, Any]:
        """New tokens for a refresh token, which is used up; reuse revokes the session.
        The client `address` of a valid one is known as the user's again (`throttle`)."""
        sid, user_id, new_refresh = await self.sessions.rotate(refresh_token)
        user = await self.users.get(user_id)
        if user is None:
            raise Unauthorized("invalid refresh token")
        await self.throttle.remember(user.username, address)
        return await self._tokens(user, sid, new_refresh)

    async def logout(self, session_id: str) -> dict[str, Any]:
        """End a session: its refresh token and its access tokens stop working."""
        if not SESSION_ID.fullmatch(session_id):
            raise BadRequest("session_id must be 32 hexadecimal digits")
        await self.sessions.end(session_id)
        return {"revoked": True}

    async def clear_login_failures(self, username: str) -> dict[str, Any]:
        """Lift a username's login throttle (admin): {cleared: whether it had failures}."""
        return {"cleared": await self.throttle.clear(username)}

    async def revoke(self, kind: str, id: str) -> dict[str, Any]:
        """Revoke a session, one access token (its jti), an API key, or all of a user's."""
        if kind == "session":
            return await self.logout(id)
        if kind == "token":
            if not SESSION_ID.fullmatch(id):  # a jti has the same shape
                raise BadRequest("a token id (jti) is 32 hexadecimal digits")
            await revoke(self.redis, f"jti:{id}", self.clock() + self.revoke_for)
        elif kind == "key":
            await self.api_keys.revoke(id)
        elif kind == "user":
            user = await self.users.require(id)
            # The user: entry stops the access tokens; sessions and keys are gone for good.
            await revoke(self.redis, f"user:{user.user_id}", self.clock() + self.revoke_for)
            await self.sessions.end_all(user.user_id)
            await self.api_keys.delete_all(user.user_id)
            await self.devices.forget(user.username)
        else:
            raise BadRequest(f"kind must be one of {', '.join(REVOKE_KINDS)}")
        log.info("revoked", extra={"fields": {"kind": kind, "id": id}})
        return {"revoked": True}

    async def _tokens(self, user: User, sid: str, refresh_token: str) -> dict[str, Any]:
        key = await self.keyring.current()
        access = tokens.issue(
            key,
            subject=user.user_id,
            name=user.username,
            roles=user.roles,
            scopes=user.scopes_granted,
            session_id=sid,
            ttl=self.ttl,
            now=self.clock(),
        )
        return {
            "access_token": access,
            "token_type": "bearer",
            "expires_in": self.ttl,
            "refresh_token": refresh_token,
            "refresh_expires_in": self.sessions.refresh_ttl,
        }

    async def _user_revoked(self, user_id: str) -> bool:
        expires_at = await self.redis.zscore(REVOKED, f"user:{user_id}")
        return expires_at is not None and float(expires_at) > self.clock()

    # -- API keys --------------------------------------------------------------------

    async def create_api_key(
        self, user_id: str, name: str | None, scopes: list[str], expires_in: int | None
    ) -> dict[str, Any]:
        owner = await self.users.require(user_id)
        if await self._user_revoked(user_id):
            raise Forbidden("this user's credentials are revoked: try again later")
        return await self.api_keys.create(owner, name, scopes, expires_in)

    async def list_api_keys(self, user_id: str) -> list[dict[str, Any]]:
        return await self.api_keys.listing(user_id)

    async def delete_api_key(self, user_id: str, key_id: str) -> dict[str, Any]:
        await self.api_keys.delete(user_id, key_id)
        return {"revoked": True}

    # -- signing keys and introspection ------------------------------------------------

    async def rotate_signing_key(self) -> dict[str, Any]:
        """A new current signing key; the old one verifies until its tokens have expired."""
        key = await self.keyring.rotate(grace=self.revoke_for)
        log.info("signing key rotated", extra={"fields": {"kid": key.kid}})
        return {"kid": key.kid}

    async def introspect(self, token: str) -> dict[str, Any]:
        """`{"active": true, ...claims}` for a valid unrevoked credential, else `{"active": false}`.

        Accepts access tokens and API keys (claims `sub`, `name`, `scope`,
        `key_id`, `iat`, `exp` for a key).
        """
        try:
            if token.startswith(apikeys.PREFIX):
                claims, members = await self._key_claims(token)
            else:
                _, keys = await self.keyring.load()
                claims = tokens.verify(token, keys, now=self.clock())
                members = [f"sid:{claims['sid']}", f"jti:{claims['jti']}", f"user:{claims['sub']}"]
        except Unauthorized:
            return {"active": False}
        now = self.clock()
        scores = await self.redis.zmscore(REVOKED, members)
        if any(score is not None and score > now for score in scores):
            return {"active": False}
        return {"active": True, **claims}

    async def _key_claims(self, text: str) -> tuple[dict[str, Any], list[str]]:
        parsed = apikeys.parse_key(text)
        record = None if parsed is None else await apikeys.read(self.redis, parsed[0])
        if parsed is None or record is None or not record.matches(parsed[1]):
            raise Unauthorized("unknown API key")
        if record.expired(self.clock()):
            raise Unauthorized("API key expired")
        claims = {
            "kind": "api_key",
            "sub": record.user_id,
            "key_id": record.key_id,
            "name": record.name,
            "scope": " ".join(sorted(record.scopes)),
            "iat": int(record.created_at),
            "exp": None if record.expires_at is None else int(record.expires_at),
        }
        return claims, [f"key:{record.key_id}", f"user:{record.user_id}"]


def _narrowing(before: User, after: User) -> str | None:
    """A new narrowing mark if going from `before` to `after` loses a role or a scope."""
    granted = after.scopes_granted
    lost = not before.roles <= after.roles or not all(
        covers(granted, s) for s in before.scopes_granted
    )
    return uuid.uuid4().hex if lost else None


def _registered(user: User) -> dict[str, Any]:
    return {
        "user_id": user.user_id,
        "username": user.username,
        "roles": sorted(user.roles),
        "created_at": user.created_at,
    }
