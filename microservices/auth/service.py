"""The auth RPC methods: thin wrappers over `Accounts`.

The method names and parameters are a contract with the gateway. Password
hashing runs in `Accounts`' own bounded threads, so these handlers are async.
"""

from __future__ import annotations

from typing import Any

from common import Service
from microservices.auth.accounts import Accounts, shared_secret

svc = Service("auth")


class _Context:
    """What the startup hook builds for the handlers (set before any call is taken)."""

    accounts: Accounts


ctx = _Context()


@svc.on_startup
async def prepare(service: Service) -> None:
    """Load (or create, once for all instances) the signing secret."""
    secret = await shared_secret(service.redis, service.settings.jwt_secret)
    ctx.accounts = Accounts(service.redis, secret, service.settings.jwt_ttl)


@svc.method
async def register(username: str, password: str) -> dict[str, Any]:
    """Create a user: {"user_id", "username", "created_at"} (bad_request, conflict)."""
    return await ctx.accounts.register(username, password)


@svc.method
async def login(username: str, password: str) -> dict[str, Any]:
    """Exchange credentials for {"access_token", "token_type", "expires_in"} (unauthorized)."""
    return await ctx.accounts.login(username, password)


@svc.method
async def verify(token: str) -> dict[str, Any]:
    """The claims of a valid access token (unauthorized otherwise)."""
    return ctx.accounts.verify(token)
