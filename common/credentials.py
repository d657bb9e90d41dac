"""Who is calling: `Authenticator` turns a bearer token or an API key into a `Principal`.

Used by every process that admits requests (gateway, websocket). The hot path
is local: a verified JWT is cached until it expires, API key records for
`api_key_cache_ttl` seconds, and revocations are checked against a set kept in
memory by `common.revocation.RevocationView`. So a request costs no RPC call
and, once its credential is cached, no Redis round trip either. Redis is only
asked when a key id is new, when an API key is not cached, and by the
background resyncs.

An unknown `kid` (a rotation elsewhere, or a made-up one) waits for the next
reload of the keyring and is refused at once if that reload does not know it
either (401), or could not read Redis (503: whether the token is good cannot be
told, and a 401 would have a client drop a token signed with a key just rotated
in). Reloads start at most once per `KEY_RELOAD_INTERVAL`, and every request
waiting meanwhile shares the one that is due: a burst of made-up kids costs one
Redis read a second, not one each, and delays nobody by more than about an
interval (a lock with a pause per kid once made the N-th forged token, and a
genuine one behind them, wait N seconds).

API keys are `common.apikey_cache.ApiKeyCache`'s: records cached for
`api_key_cache_ttl` seconds, read again ahead of their expiry, and answering stale
for `api_key_stale_if_error` more while Redis cannot be read.

Needs PyJWT (through `common.tokens`), like every module that verifies tokens.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from common import apikeys, tokens
from common.aio import background, cancel_and_wait, cancelling
from common.apikey_cache import ApiKeyCache
from common.compiled import caused
from common.errors import Unauthorized
from common.log import get_logger
from common.outage import Outage
from common.principal import Principal
from common.redis_failures import REDIS_DOWN_OR_REFUSING, redis_failure, store_unavailable
from common.revocation import UNLOADED_RETRY, RevocationView
from common.scopes import parse
from common.tokens import Keyring, SigningKey

__all__ = ["Authenticator", "Principal"]

log = get_logger(__name__)

# Unknown `kid`s reload the keyring at most this often, one reload shared by all
# (garbage tokens must not turn into a Redis round trip each).
KEY_RELOAD_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class _VerifiedToken:
    principal: Principal
    token_id: str
    kid: str
    exp: float
    # When the key it was verified with was stored: a key stored again under the same
    # kid (JWT_SECRET seeds it after Redis lost the keyring) is not the same key.
    key_created_at: float
    revoked_by: tuple[str, ...]  # the principal's, computed once: checked on every request


class Authenticator:
    """Verifies credentials locally; `start()` before use, `close()` after."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        configured_secret: str | None,
        api_key_cache_ttl: float = 5.0,
        api_key_stale_if_error: float = 300.0,
        resync_interval: float = 5.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.resync_interval = resync_interval
        self.cache_size = cache_size
        self.clock = clock
        self.keyring = Keyring(redis, configured_secret=configured_secret, clock=clock)
        self.revocations = RevocationView(redis, resync_interval=resync_interval, clock=clock)
        self.api_keys = ApiKeyCache(redis, self.revocations, ttl=api_key_cache_ttl,
                                    stale_if_error=api_key_stale_if_error, size=cache_size,
                                    clock=clock)  # fmt: skip
        self._keys: dict[str, SigningKey] = {}
        # The reload for unknown kids that is due and not reading yet: every request with
        # an unknown kid awaits it (module docstring).
        self._kid_reload: asyncio.Task[BaseException | None] | None = None
        # Due or reading: closed on close().
        self._kid_reloads: set[asyncio.Task[BaseException | None]] = set()
        self._kid_reloaded = -math.inf  # monotonic time the last one started reading
        self.kid_reloads = 0  # how many reloads unknown kids have caused (tests, metrics)
        self._tokens: dict[str, _VerifiedToken] = {}
        self._resync: asyncio.Task[None] | None = None
        self._outage = Outage(log, "signing keys resync failed", "signing keys resynced")

    async def start(self) -> None:
        """Load the signing keys (creating the first one if none exists) and the revocations.

        Redis down, or up and refusing (out of memory, a read-only replica after a
        failover, a failed save, a long script, the credentials: `common.redis_failures`),
        is not fatal: the service starts, the failure is logged once (the resync's
        `Outage`, with its kind; `/health` names it too) and the background resync keeps
        trying. Until the keys are loaded a token is refused (an unknown kid reloads them
        first). Any other error (an error reply of no known kind, unreadable keys) is.
        """
        try:
            await self.keyring.ensure()
            await self._load_keys()
        except REDIS_DOWN_OR_REFUSING as exc:
            if redis_failure(exc) is None:
                raise
            self._outage.failed(exc, at="start")
        await self.revocations.start()
        self._resync = background(self._resync_forever(), name="signing-keys-resync")

    async def close(self) -> None:
        await cancel_and_wait(self._resync)
        self._resync = None
        for reload in list(self._kid_reloads):
            await cancel_and_wait(reload)
        await self.api_keys.close()
        await self.revocations.close()

    async def refresh(self) -> None:
        """Reload the signing keys and the revocations now (the resync does it periodically)."""
        await self._load_keys()
        await self.revocations.refresh()

    async def authenticate(self, credential: str) -> Principal:
        """The caller behind `credential` (a JWT, or an API key: `sbk_...`), else `Unauthorized`.

        On the request path: normally answered from memory.
        """
        if not isinstance(credential, str) or not credential:
            raise Unauthorized("invalid token: empty credential")
        if credential.startswith(apikeys.PREFIX):
            return await self.api_keys.authenticate(credential)
        return await self._token(credential)

    def authenticate_sync_cached(self, credential: str) -> Principal | None:
        """The caller if `credential` is cached and still good, else None (then `authenticate`)."""
        if credential.startswith(apikeys.PREFIX):
            return self.api_keys.cached(credential)
        now = self.clock()
        verified = self._tokens.get(credential)
        if verified is None or not self._still_valid(verified, now):
            return None
        return None if self._token_revoked(verified) else verified.principal

    # -- JWT ---------------------------------------------------------------------------

    async def _token(self, token: str) -> Principal:
        now = self.clock()
        verified = self._tokens.get(token)
        if verified is not None and self._still_valid(verified, now):
            if self._token_revoked(verified):
                raise Unauthorized("token revoked")
            return verified.principal
        self._tokens.pop(token, None)  # expired, or its key retired: verify for the reason
        kid = tokens.header_kid(token)
        if kid is not None and kid not in self._keys:
            failure = await self._reload_keys_for()
            if failure is not None and kid not in self._keys:
                raise caused(store_unavailable(failure), failure)
        claims = tokens.verify(token, self._keys, now=now)
        verified = _verified(claims, self._keys[str(kid)])
        if self._token_revoked(verified):
            raise Unauthorized("token revoked")
        # Bounded, the oldest out first: only tokens whose signature verified get in, so
        # made-up ones cannot crowd out real ones (as made-up API key ids could), tokens
        # all live JWT_TTL so the oldest expires first, and one pushed out costs its next
        # request a signature check, not a Redis read.
        if len(self._tokens) >= self.cache_size:
            del self._tokens[next(iter(self._tokens))]
        self._tokens[token] = verified
        return verified.principal

    def _still_valid(self, verified: _VerifiedToken, now: float) -> bool:
        key = self._keys.get(verified.kid)
        return (
            verified.exp > now
            and key is not None
            and key.active(now)
            and key.created_at == verified.key_created_at
        )

    def _token_revoked(self, verified: _VerifiedToken) -> bool:
        return any(map(self.revocations.is_revoked, verified.revoked_by))

    async def _reload_keys_for(self) -> BaseException | None:
        """Wait for the next reload of the keys, for a kid not seen yet (module docstring);
        what kept Redis from answering it, if anything did.

        A reload already reading may have read before the caller's key was stored,
        so the caller waits for the one due after it (at most `KEY_RELOAD_INTERVAL`
        after it started); every caller meanwhile waits for that same one.
        """
        reload = self._kid_reload
        if reload is None:
            delay = max(self._kid_reloaded + KEY_RELOAD_INTERVAL - time.monotonic(), 0.0)
            reload = asyncio.get_running_loop().create_task(
                self._reload_keys(delay), name="signing-keys-reload"
            )
            self._kid_reload = reload
            self._kid_reloads.add(reload)
            reload.add_done_callback(self._reload_done)
        # Shielded: a caller that goes away must not cancel the others' reload.
        return await asyncio.shield(reload)

    def _reload_done(self, reload: asyncio.Task[BaseException | None]) -> None:
        self._kid_reloads.discard(reload)
        if self._kid_reload is reload:  # cancelled before it read (close)
            self._kid_reload = None

    async def _reload_keys(self, delay: float) -> BaseException | None:
        """Reload the keys after `delay`; the Redis failure that kept it from it, if any
        (logged once per outage, with the resync's)."""
        await asyncio.sleep(delay)
        self._kid_reload = None  # from now on an unknown kid waits for the next one
        self._kid_reloaded = time.monotonic()
        self.kid_reloads += 1
        try:
            await self._load_keys()
            self._outage.recovered()
        except REDIS_DOWN_OR_REFUSING as exc:
            if redis_failure(exc) is None:  # an error reply of no known kind: bad data
                log.exception("signing keys reload failed")
                return None
            self._outage.failed(exc, at="unknown kid")
            return exc
        except ValueError:
            log.exception("signing keys unreadable")
        return None

    async def _load_keys(self) -> None:
        _, keys = await self.keyring.load()
        self._keys = keys

    async def _resync_forever(self) -> None:
        while not cancelling():
            # No keys yet (Redis down or refusing at start): no token verifies, so try
            # again as often as the other loops do in an outage.
            await asyncio.sleep(self.resync_interval if self._keys else UNLOADED_RETRY)
            try:
                if not self._keys:
                    await self.keyring.ensure()
                await self._load_keys()
                self._outage.recovered()
            except ValueError:
                log.exception("signing keys unreadable")
            except Exception as exc:  # any (Redis refusing `ensure`'s write, say): again later
                self._outage.failed(exc)


def _verified(claims: dict[str, Any], key: SigningKey) -> _VerifiedToken:
    exp = float(claims["exp"])
    principal = Principal(
        kind="user",
        subject=str(claims["sub"]),
        name=claims["name"],
        roles=frozenset(claims["roles"]),
        scopes=parse(claims["scope"]),
        session_id=claims["sid"],
        expires_at=exp,
        token_id=str(claims["jti"]),
    )
    return _VerifiedToken(
        principal, str(claims["jti"]), key.kid, exp, key.created_at, principal.revoked_by()
    )
