"""`Authenticator` with JWTs, signing keys and revocation against a real Redis (DB 8).

Tokens are made with the same function the auth service uses (`common.tokens.issue`),
or forged by hand. API keys: `test_credentials_api_keys.py`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis

from common import revocation, tokens
from common.credentials import Authenticator, Principal
from common.errors import ConfigError
from common.revocation import RevocationView
from common.tokens import Keyring, SigningKey
from tests.common.credentials_fixtures import (  # noqa: F401 (the *_fixture ones)
    KEY,
    OWNER,
    SECRET,
    auth_fixture,
    clock_fixture,
    redis_fixture,
    rejected,
)
from tests.helpers import Clock, eventually_refused, wait_for_async

pytestmark = pytest.mark.timeout(30)


def mint(key: SigningKey = KEY, *, ttl: int = 600, now: float | None = None, **claims: Any) -> str:
    fields: dict[str, Any] = {
        "subject": OWNER, "name": "alice", "roles": ["user"], "scopes": ["iptv", "nlp.run"],
        "session_id": uuid.uuid4().hex,
    }  # fmt: skip
    fields.update(claims)
    return tokens.issue(key, ttl=ttl, now=now, **fields)


# -- JWT -------------------------------------------------------------------------------


async def test_a_valid_token_gives_its_principal(auth: Authenticator) -> None:
    sid = uuid.uuid4().hex
    token = mint(session_id=sid, roles=["user", "admin"], scopes=["*", "admin"])
    assert auth.authenticate_sync_cached(token) is None  # not verified yet
    principal = await auth.authenticate(token)
    assert principal == Principal(
        kind="user",
        subject=OWNER,
        name="alice",
        roles=frozenset({"user", "admin"}),
        scopes=frozenset({"*", "admin"}),
        key_id=None,
        session_id=sid,
        expires_at=principal.expires_at,
        token_id=jwt.decode(token, options={"verify_signature": False})["jti"],
    )
    assert principal.expires_at is not None and principal.expires_at > time.time() + 500
    assert principal.revoked_by() == (f"sid:{sid}", f"jti:{principal.token_id}", f"user:{OWNER}")
    assert principal.allows("iptv", "search") and principal.allows("admin", "policy")
    assert auth.authenticate_sync_cached(token) == principal
    assert await auth.authenticate(token) == principal


async def test_scopes_come_from_the_scope_claim(auth: Authenticator) -> None:
    principal = await auth.authenticate(mint(scopes=["iptv", "nlp.run"]))
    assert principal.scopes == {"iptv", "nlp.run"}
    assert principal.allows("iptv", None) and principal.allows("nlp", "run")
    assert not principal.allows("nlp", "train") and not principal.allows("admin", None)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def good_claims(**override: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "sub": OWNER, "name": "mallory", "roles": ["user"], "scope": "iptv",
        "sid": uuid.uuid4().hex, "iat": now, "exp": now + 600,
        "iss": "switchboard", "aud": "switchboard", "jti": uuid.uuid4().hex,
    }  # fmt: skip
    claims.update(override)
    return {k: v for k, v in claims.items() if v is not None}


def signed(key: str = SECRET, alg: str = "HS256", kid: str | None = KEY.kid, **claims: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(good_claims(**claims), key, algorithm=alg, headers=headers)


def forged_tokens() -> dict[str, str]:
    kid = {"kid": KEY.kid}
    head, payload, signature = signed().split(".")
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    return {
        "garbage": "not a token",
        "two segments": f"{head}.{payload}",
        "malformed base64": f"{head}.{payload}!!.{signature}",
        "malformed header base64": f"@@{head}.{payload}.{signature}",
        "header not JSON": f"{base64.urlsafe_b64encode(b'nope').decode()}.{payload}.{signature}",
        "tampered payload": f"{head}.{b64(good_claims(scope='* admin'))}.{signature}",
        "tampered signature": f"{head}.{payload}.{flipped}",
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT', **kid})}.{payload}.",
        "alg none via pyjwt": jwt.encode(good_claims(), None, algorithm="none", headers=kid),
        "HS512": signed(alg="HS512"),
        "wrong key": signed(key="k" * 48),
        "wrong audience": signed(aud="other"),
        "wrong issuer": signed(iss="other"),
        "no jti": signed(jti=None),
        "no exp": signed(exp=None),
        "no sid": signed(sid=None),
        "no scope": signed(scope=None),
        "roles not a list": signed(roles="admin"),
        "exp not a number": signed(exp="tomorrow"),
        "no kid": signed(kid=None),
        "unknown kid": signed(kid="0123456789abcdef"),
        "not yet valid": signed(nbf=int(time.time()) + 600),
        "issued in the future": signed(iat=int(time.time()) + 600),
        # A header's bytes that are not UTF-8 arrive as surrogates; JSON can carry one too.
        "undecodable bytes": "\udcff\udcfe.abc.def",
        "lone surrogate": "\ud800",
    }


async def test_the_forgery_baseline_is_valid(auth: Authenticator) -> None:
    # The same recipe with nothing forged passes, so each rejection below is
    # caused by its one defect.
    assert (await auth.authenticate(signed())).subject == OWNER


@pytest.mark.parametrize("case", list(forged_tokens()))
async def test_forged_tokens_are_rejected(auth: Authenticator, case: str) -> None:
    message = await rejected(auth, forged_tokens()[case])
    assert message.startswith("invalid token"), message


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("alg none", "invalid token: The specified alg value is not allowed"),
        ("wrong key", "invalid token: Signature verification failed"),
        ("wrong audience", "invalid token: Audience doesn't match"),
        ("wrong issuer", "invalid token: Invalid issuer"),
        ("unknown kid", "invalid token: unknown signing key"),
        ("undecodable bytes", "invalid token: not ASCII"),
    ],
)
async def test_rejections_say_why(auth: Authenticator, case: str, expected: str) -> None:
    assert await rejected(auth, forged_tokens()[case]) == expected


async def test_an_expired_token_is_rejected(auth: Authenticator, clock: Clock) -> None:
    assert await rejected(auth, mint(ttl=60, now=time.time() - 3600)) == "token expired"
    token = mint(ttl=60)
    await auth.authenticate(token)  # cached now
    clock.offset = 61
    assert auth.authenticate_sync_cached(token) is None
    assert await rejected(auth, token) == "token expired"


async def test_an_empty_credential_is_rejected(auth: Authenticator) -> None:
    assert (await rejected(auth, "")).startswith("invalid token")


# -- signing keys ----------------------------------------------------------------------


async def test_the_first_key_comes_from_the_configured_secret(
    auth: Authenticator, redis: aioredis.Redis
) -> None:
    assert await redis.get(tokens.CURRENT_KID) == KEY.kid.encode()
    current = await Keyring(redis).current()
    assert current.secret == SECRET and current.retire_at is None


async def test_without_a_secret_one_key_is_generated_for_everyone(redis: aioredis.Redis) -> None:
    many = [Authenticator(redis, configured_secret=None) for _ in range(4)]
    await asyncio.gather(*(a.start() for a in many))
    try:
        kid, keys = await Keyring(redis).load()
        assert kid is not None and list(keys) == [kid] and len(keys[kid].secret) >= 64
        token = mint(keys[kid])
        for authenticator in many:
            assert (await authenticator.authenticate(token)).subject == OWNER
    finally:
        for authenticator in many:
            await authenticator.close()


async def test_a_short_configured_secret_is_refused(redis: aioredis.Redis) -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Authenticator(redis, configured_secret="too-short")


async def test_an_unknown_kid_reloads_the_keyring(
    auth: Authenticator, redis: aioredis.Redis
) -> None:
    old_token = mint()
    await auth.authenticate(old_token)
    new_key = await Keyring(redis).rotate(grace=960)  # by another process: nobody told `auth`
    new_token = mint(new_key)

    async def accepted() -> bool:  # reloads happen at most once a second
        return (await auth.authenticate(new_token)).subject == OWNER

    await wait_for_async(accepted, timeout=10)
    assert (await auth.authenticate(old_token)).subject == OWNER  # nobody is logged out


async def test_made_up_kids_share_one_reload_and_a_new_key_still_passes(
    auth: Authenticator, redis: aioredis.Redis
) -> None:
    # Forged tokens naming a kid each used to queue on a lock, a reload and a
    # pause each: the N-th was answered after N seconds, a genuine new kid after them.
    unknown = "invalid token: unknown signing key"

    async def burst() -> tuple[Principal, list[str]]:
        forged = [asyncio.create_task(rejected(auth, signed(kid=uuid.uuid4().hex[:16])))
                  for _ in range(40)]  # fmt: skip
        gone = asyncio.create_task(auth.authenticate(signed(kid=uuid.uuid4().hex[:16])))
        await asyncio.sleep(0)  # it waits for the reload now; its caller goes away
        gone.cancel()
        new_key = await Keyring(redis).rotate(grace=960)  # by another process, meanwhile
        genuine = await auth.authenticate(mint(new_key))
        return genuine, await asyncio.gather(*forged)

    genuine, refusals = await asyncio.wait_for(burst(), timeout=15)
    assert genuine.subject == OWNER and refusals == [unknown] * 40
    # One reload for the burst, maybe one more if it read before the rotation.
    assert 1 <= auth.kid_reloads <= 2
    reloads = auth.kid_reloads
    assert await rejected(auth, signed(kid=uuid.uuid4().hex[:16])) == unknown  # one more
    assert auth.kid_reloads == reloads + 1


async def test_an_old_key_verifies_until_it_retires(
    auth: Authenticator, redis: aioredis.Redis, clock: Clock
) -> None:
    cached = mint(ttl=3600)
    await auth.authenticate(cached)
    keyring = Keyring(redis, clock=clock)
    new_key = await keyring.rotate(grace=60)
    await auth.refresh()
    assert new_key.kid != KEY.kid
    assert (await auth.authenticate(cached)).subject == OWNER
    assert (await auth.authenticate(mint(ttl=3600, now=clock()))).subject == OWNER
    clock.offset = 61  # past retire_at
    assert auth.authenticate_sync_cached(cached) is None
    assert await rejected(auth, cached) == "invalid token: signing key retired"
    assert await rejected(auth, mint(now=clock())) == "invalid token: signing key retired"
    assert (await auth.authenticate(mint(new_key, now=clock()))).subject == OWNER
    assert await keyring.prune() == [KEY.kid]
    await auth.refresh()
    assert await rejected(auth, cached) == "invalid token: unknown signing key"


async def test_a_token_from_before_redis_lost_the_keyring_is_refused(
    auth: Authenticator, redis: aioredis.Redis, clock: Clock
) -> None:
    # JWT_SECRET seeds the same key again after the loss, but the sessions and the
    # revocations the token was checked against are gone with the keyring.
    sid = uuid.uuid4().hex
    before = mint(session_id=sid, ttl=3600)
    await auth.authenticate(before)
    await revocation.revoke(redis, f"sid:{sid}", time.time() + 3600)
    await eventually_refused(auth, before, "token revoked")
    await redis.flushdb()
    clock.offset = 60
    await auth.keyring.ensure()  # as the resync does when it finds no key
    await auth.refresh()
    assert auth.revocations.is_revoked(f"sid:{sid}") is False
    assert await rejected(auth, before) == "invalid token: issued before its signing key was stored"
    assert (await auth.authenticate(mint(now=clock()))).subject == OWNER


# -- revocation ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sid", "jti", "user"])
async def test_revoked_tokens_are_rejected_at_once(
    auth: Authenticator, redis: aioredis.Redis, kind: str
) -> None:
    sid, jti = uuid.uuid4().hex, uuid.uuid4().hex
    token = mint(session_id=sid, token_id=jti)
    other = mint()  # another session of the same user
    await auth.authenticate(token)
    await auth.authenticate(other)
    ident = {"sid": sid, "jti": jti, "user": OWNER}[kind]
    await revocation.revoke(redis, f"{kind}:{ident}", time.time() + 600)
    await eventually_refused(auth, token, "token revoked")
    assert auth.authenticate_sync_cached(token) is None
    if kind == "user":
        assert await rejected(auth, other) == "token revoked"
    else:
        assert (await auth.authenticate(other)).subject == OWNER


async def test_a_missed_revocation_is_found_by_the_resync(redis: aioredis.Redis) -> None:
    authenticator = Authenticator(redis, configured_secret=SECRET, resync_interval=0.2)
    await authenticator.start()
    try:
        sid = uuid.uuid4().hex
        token = mint(session_id=sid)
        await authenticator.authenticate(token)
        # Written without the message, as if it had been lost.
        await redis.zadd(revocation.REVOKED, {f"sid:{sid}": time.time() + 600})
        await eventually_refused(authenticator, token, "token revoked")
    finally:
        await authenticator.close()


async def test_a_published_revocation_counts_before_its_expiry_is_read(
    redis: aioredis.Redis,
) -> None:
    """The message is acted on before the lookup of its expiry answers: the call that
    revoked a credential may be answered, and its client's next request read, first."""
    view = RevocationView(redis)
    await redis.zadd(revocation.REVOKED, {"key:k1": time.time() + 60})
    applying = asyncio.create_task(view._apply("key:k1"))  # what the subscription calls
    await asyncio.sleep(0)  # the handler runs up to its lookup in Redis
    assert not applying.done() and view.is_revoked("key:k1")
    await applying
    assert view.is_revoked("key:k1")
    # A message for a member this database has not revoked (channels span databases).
    await view._apply("key:elsewhere")
    assert not view.is_revoked("key:elsewhere") and len(view) == 1


async def test_revocations_expire(redis: aioredis.Redis, clock: Clock) -> None:
    view = RevocationView(redis, clock=clock)
    await view.start()
    try:
        await revocation.revoke(redis, "jti:gone", time.time() - 1)  # already over
        await revocation.revoke(redis, "jti:live", time.time() + 60)
        await wait_for_async(lambda: _true(view.is_revoked("jti:live")), timeout=10)
        assert not view.is_revoked("jti:gone") and not view.is_revoked("jti:other")
        assert await redis.zscore(revocation.REVOKED, "jti:gone") is None  # pruned in Redis
        clock.offset = 61
        assert not view.is_revoked("jti:live")
        await view.refresh()
        assert len(view) == 0
    finally:
        await view.close()


async def _true(value: bool) -> bool:
    return value
