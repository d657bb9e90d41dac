"""The auth RPC methods: thin wrappers over `Accounts`.

The method names and parameters are a contract with the gateway, which
authenticates the caller and passes its user id / session id, and allows the
admin methods (`revoke`, `set_roles`, `set_scopes`, `list_users`,
`rotate_signing_key`, `clear_login_failures`) to admins only. Password hashing
runs in `Accounts`' own bounded threads, so these handlers are async.
"""

from __future__ import annotations

from typing import Any

from common import Service
from microservices.auth.accounts import Accounts
from microservices.auth.throttle import ThrottleRules

svc = Service("auth")


class _Context:
    """What the startup hook builds for the handlers (set before any call is taken)."""

    accounts: Accounts


ctx = _Context()


@svc.on_startup
async def prepare(service: Service) -> None:
    """Create (once for all instances) the first signing key and the admins index;
    bootstrap the first admin."""
    settings = service.settings
    ctx.accounts = Accounts(
        service.redis,
        ttl=settings.jwt_ttl,
        refresh_ttl=settings.jwt_refresh_ttl,
        max_sessions=settings.auth_max_sessions_per_user,
        default_scopes=settings.auth_default_scopes,
        configured_secret=settings.jwt_secret,
        throttle=ThrottleRules.of(settings),
        device_days=settings.auth_login_device_days,
    )
    await ctx.accounts.prepare()
    username, password = settings.auth_admin_username, settings.auth_admin_password
    if username and password:  # the settings refuse one without the other
        await ctx.accounts.bootstrap_admin(username, password)


@svc.method
async def register(username: str, password: str, address: str | None = None) -> dict[str, Any]:
    """Create a user: {user_id, username, roles, created_at} (bad_request, conflict).
    `address`, the client's as for `login`, is known as the user's (`throttle`)."""
    return await ctx.accounts.register(username, password, address)


@svc.method
async def login(
    username: str, password: str, address: str | None = None, device_token: str | None = None
) -> dict[str, Any]:
    """{access_token, token_type, expires_in, refresh_token, refresh_expires_in,
    device_token, device_expires_in} (unauthorized; too_many_attempts with retry_after
    while the username is throttled).

    `address` is the client's, as the gateway read it: failures are counted per
    username and address (`throttle`). Clients cannot call this service, so they
    cannot name another address; a caller that names none is throttled per username.
    `device_token`, the one an earlier login of the user gave the client, counts them
    per device instead (`devices`); any other is ignored."""
    return await ctx.accounts.login(username, password, address, device_token)


@svc.method
async def refresh(refresh_token: str, address: str | None = None) -> dict[str, Any]:
    """New tokens for a refresh token (used up); a reused one revokes its session.
    `address`, the client's as for `login`, is known as the user's again (`throttle`)."""
    return await ctx.accounts.refresh(refresh_token, address)


@svc.method
async def logout(session_id: str) -> dict[str, Any]:
    """End a session: {revoked: true}."""
    return await ctx.accounts.logout(session_id)


@svc.method
async def revoke(kind: str, id: str) -> dict[str, Any]:
    """Revoke a "session", "token" (jti), "key" or "user" (admin): {revoked: true}."""
    return await ctx.accounts.revoke(kind, id)


@svc.method
async def create_api_key(
    user_id: str, name: str | None = None, scopes: list[str] | None = None,
    expires_in: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A new key {key_id, api_key (shown once), name, scopes, created_at, expires_at}."""
    return await ctx.accounts.create_api_key(user_id, name, scopes or [], expires_in)


@svc.method
async def list_api_keys(user_id: str) -> list[dict[str, Any]]:
    """The user's keys: [{key_id, name, scopes, created_at, expires_at}]."""
    return await ctx.accounts.list_api_keys(user_id)


@svc.method
async def delete_api_key(user_id: str, key_id: str) -> dict[str, Any]:
    """Delete one of the user's keys: {revoked: true} (not_found)."""
    return await ctx.accounts.delete_api_key(user_id, key_id)


@svc.method
async def me(user_id: str) -> dict[str, Any]:
    """{user_id, username, roles, scopes} (not_found)."""
    return await ctx.accounts.me(user_id)


@svc.method
async def set_roles(user_id: str, roles: list[str]) -> dict[str, Any]:
    """Set a user's roles (admin); losing one ends the user's sessions."""
    return await ctx.accounts.set_roles(user_id, roles)


@svc.method
async def set_scopes(user_id: str, scopes: list[str]) -> dict[str, Any]:
    """Set a user's scopes (admin); losing one ends the user's sessions."""
    return await ctx.accounts.set_scopes(user_id, scopes)


@svc.method
async def list_users() -> list[dict[str, Any]]:
    """Every user (admin): [{user_id, username, roles, scopes, created_at}]."""
    return await ctx.accounts.list_users()


@svc.method
async def clear_login_failures(username: str) -> dict[str, Any]:
    """Lift a username's login throttle (admin): {cleared: whether it had failures}."""
    return await ctx.accounts.clear_login_failures(username)


@svc.method
async def rotate_signing_key() -> dict[str, Any]:
    """A new signing key (admin): {kid}; tokens signed before stay valid until they expire."""
    return await ctx.accounts.rotate_signing_key()


@svc.method
async def introspect(token: str) -> dict[str, Any]:
    """{active: true, ...claims} for a valid access token or API key, else {active: false}."""
    return await ctx.accounts.introspect(token)
