"""Sessions in `Accounts` (real Redis, DB 2, no RPC): refresh-token rotation and reuse,
logout, and revoking tokens, users and keys."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis

from common.credentials import Authenticator
from common.errors import BadRequest, NotFound, Unauthorized
from common.revocation import REVOKED
from microservices.auth.accounts import Accounts
from microservices.auth.sessions import Sessions, session_key, used_key, user_sessions_key
from tests.helpers import Clock, eventually_refused
from tests.microservices.auth_fixtures import (  # noqa: F401 (fixtures)
    PASSWORD,
    accounts_fixture,
    claims_of,
    gateway_fixture,
    make_accounts,
    redis_fixture,
    signed_up,
)

pytestmark = pytest.mark.timeout(60)


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _sid(answer: dict[str, Any]) -> str:
    """The session of a login's tokens, issued on a clock moved forward (`Clock`)."""
    sid: str = jwt.decode(answer["access_token"], options={"verify_signature": False})["sid"]
    return sid


# -- refresh, logout -------------------------------------------------------------------


async def test_refresh_rotates_the_refresh_token(
    accounts: Accounts, gateway: Authenticator
) -> None:
    user_id, first = await signed_up(accounts, "Lena")
    second = await accounts.refresh(first["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    old, new = claims_of(first["access_token"]), claims_of(second["access_token"])
    assert new["sid"] == old["sid"] and new["sub"] == user_id and new["jti"] != old["jti"]
    third = await accounts.refresh(second["refresh_token"])  # the new one works in turn
    assert claims_of(third["access_token"])["sid"] == old["sid"]
    for answer in (first, second, third):
        assert (await gateway.authenticate(answer["access_token"])).subject == user_id


async def test_a_reused_refresh_token_revokes_its_whole_family(
    accounts: Accounts, gateway: Authenticator
) -> None:
    _, first = await signed_up(accounts, "Mallory")
    _, elsewhere = await signed_up(accounts, "Mallory2")
    second = await accounts.refresh(first["refresh_token"])
    with pytest.raises(Unauthorized) as caught:
        await accounts.refresh(first["refresh_token"])  # replayed: stolen, or a leak
    assert caught.value.message == "refresh token reused: session revoked"
    with pytest.raises(Unauthorized, match="invalid refresh token"):
        await accounts.refresh(second["refresh_token"])  # the newer one dies with its family
    for answer in (first, second):  # and so do the session's access tokens
        await eventually_refused(gateway, answer["access_token"], "token revoked")
        assert (await accounts.introspect(answer["access_token"])) == {"active": False}
    assert (await gateway.authenticate(elsewhere["access_token"])).name == "Mallory2"
    assert (await accounts.refresh(elsewhere["refresh_token"]))["token_type"] == "bearer"


async def test_concurrent_uses_of_one_refresh_token_revoke_the_session(
    accounts: Accounts,
) -> None:
    _, first = await signed_up(accounts, "Nina")
    results = await asyncio.gather(
        *(accounts.refresh(first["refresh_token"]) for _ in range(2)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, dict)]
    losers = [r for r in results if isinstance(r, Unauthorized)]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0].message == "refresh token reused: session revoked"
    with pytest.raises(Unauthorized):
        await accounts.refresh(winners[0]["refresh_token"])


async def test_refreshing_keeps_a_sessions_state_the_same_size(
    accounts: Accounts, gateway: Authenticator, redis: aioredis.Redis
) -> None:
    _, first = await signed_up(accounts, "Nell")
    sid = claims_of(first["access_token"])["sid"]
    latest = await accounts.refresh(first["refresh_token"])
    size = await redis.memory_usage(session_key(sid))
    for _ in range(30):
        latest = await accounts.refresh(latest["refresh_token"])
    assert await redis.memory_usage(session_key(sid)) <= size + 8  # (a float's digits vary)
    assert await redis.keys(f"{session_key(sid)}*") == [session_key(sid).encode()]
    with pytest.raises(Unauthorized) as caught:  # a token 31 refreshes old is still known
        await accounts.refresh(first["refresh_token"])
    assert caught.value.message == "refresh token reused: session revoked"
    await eventually_refused(gateway, latest["access_token"], "token revoked")


async def test_a_session_from_before_seals_keeps_working(
    accounts: Accounts, redis: aioredis.Redis
) -> None:
    """A session stored as before: no seal, its used tokens in a set."""
    user_id, _ = await signed_up(accounts, "Oona")
    sid, old, current = uuid.uuid4().hex, "o" * 43, "c" * 43
    record = {"user_id": user_id, "refresh": _sha(current), "created_at": repr(time.time())}
    await redis.hset(session_key(sid), mapping={**record, "expires_at": repr(time.time() + 600)})
    await redis.sadd(used_key(sid), _sha(old))
    second = await accounts.refresh(f"sbr_{sid}_{current}")
    third = await accounts.refresh(second["refresh_token"])
    assert await redis.scard(used_key(sid)) == 2  # the last unsealed token joined; no more
    with pytest.raises(Unauthorized, match="reused"):
        await accounts.refresh(f"sbr_{sid}_{current}")
    with pytest.raises(Unauthorized, match="invalid refresh token"):
        await accounts.refresh(third["refresh_token"])  # the whole session went with it

    sid = uuid.uuid4().hex
    await redis.hset(session_key(sid), mapping={**record, "expires_at": repr(time.time() + 600)})
    await redis.sadd(used_key(sid), _sha(old))
    with pytest.raises(Unauthorized, match="reused"):  # a token used before the upgrade
        await accounts.refresh(f"sbr_{sid}_{old}")


@pytest.mark.parametrize(
    "token", ["", "garbage", "sbr_" + "0" * 32 + "_" + "A" * 43, "sbr_zz_" + "A" * 43]
)
async def test_bad_refresh_tokens_are_invalid(accounts: Accounts, token: str) -> None:
    with pytest.raises(Unauthorized, match="invalid refresh token"):
        await accounts.refresh(token)


async def test_a_forged_refresh_token_of_a_real_session_does_not_revoke_it(
    accounts: Accounts,
) -> None:
    _, first = await signed_up(accounts, "Olga")
    forged = first["refresh_token"][:37] + "A" * 43  # right session, made-up secret
    with pytest.raises(Unauthorized, match="invalid refresh token"):
        await accounts.refresh(forged)
    assert (await accounts.refresh(first["refresh_token"]))["token_type"] == "bearer"


async def test_refresh_tokens_expire(redis: aioredis.Redis) -> None:
    clock = Clock()
    accounts = make_accounts(redis, refresh_ttl=3600, clock=clock)
    _, first = await signed_up(accounts, "Pia")
    clock.offset = 3601
    with pytest.raises(Unauthorized, match="refresh token expired"):
        await accounts.refresh(first["refresh_token"])


async def test_logout_ends_the_session(
    accounts: Accounts, gateway: Authenticator, redis: aioredis.Redis
) -> None:
    _, mine = await signed_up(accounts, "Quinn")
    other = await accounts.login("Quinn", PASSWORD)  # another device
    sid = claims_of(mine["access_token"])["sid"]
    await gateway.authenticate(mine["access_token"])
    assert await accounts.logout(sid) == {"revoked": True}
    assert not await redis.exists(session_key(sid))
    await eventually_refused(gateway, mine["access_token"], "token revoked")
    with pytest.raises(Unauthorized, match="invalid refresh token"):
        await accounts.refresh(mine["refresh_token"])
    assert (await gateway.authenticate(other["access_token"])).name == "Quinn"
    assert await accounts.logout(sid) == {"revoked": True}  # idempotent
    with pytest.raises(BadRequest):
        await accounts.logout("not-a-session")


# -- a user's sessions ---------------------------------------------------------------


async def test_a_users_session_index_keeps_the_sessions_that_may_be_live(
    redis: aioredis.Redis,
) -> None:
    """A refresh TTL shorter than an access token's life: expired sessions stay indexed
    while their access tokens may live, so that ending them all revokes those."""
    clock = Clock()
    accounts = make_accounts(redis, refresh_ttl=60, clock=clock)
    user_id, first = await signed_up(accounts, "Uma")
    clock.offset = 100  # the first session has expired; its access token has not
    second = await accounts.login("Uma", PASSWORD)
    key = user_sessions_key(user_id)
    assert await redis.zcard(key) == 2
    clock.offset = 150
    await accounts.refresh(second["refresh_token"])  # the second one now expires at 210
    # Past the first one's tokens (issued at 0), not the second one's (at 150).
    clock.offset = 100 + accounts.revoke_for
    third = await accounts.login("Uma", PASSWORD)
    sids = [_sid(answer) for answer in (first, second, third)]
    assert sorted(await redis.zrange(key, 0, -1)) == sorted(s.encode() for s in sids[1:])
    assert 0 < await redis.ttl(key) <= clock.offset + 60 + accounts.sessions.linger + 1

    ended = await accounts.sessions.end_all(user_id)
    assert ended == sorted(sids[1:])
    scores = await redis.zmscore(REVOKED, [f"sid:{s}" for s in sids])
    assert scores[0] is None and None not in scores[1:]
    assert not await redis.exists(key)


async def test_a_login_beyond_the_cap_ends_the_least_recently_used_session(
    redis: aioredis.Redis, gateway: Authenticator, caplog: pytest.LogCaptureFixture
) -> None:
    """As a logout does: its refresh token is refused, its access tokens revoked. The
    login's own log line says how many sessions it ended."""
    caplog.set_level(logging.INFO, logger="microservices.auth")
    accounts = make_accounts(redis, max_sessions=3)
    user_id, first = await signed_up(accounts, "Wren")
    others = [await accounts.sessions.open(user_id) for _ in range(2)]
    key = user_sessions_key(user_id)
    assert await redis.zcard(key) == 3
    caplog.clear()
    latest = await accounts.login("Wren", PASSWORD)  # the fourth: the first one ends
    assert [(r.getMessage(), r.fields) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("login", {"user_id": user_id, "session_id": claims_of(latest["access_token"])["sid"],
                   "sessions_ended": 1})
    ]  # fmt: skip
    oldest = claims_of(first["access_token"])["sid"]
    assert not await redis.exists(session_key(oldest))
    with pytest.raises(Unauthorized, match="invalid refresh token"):
        await accounts.refresh(first["refresh_token"])
    await eventually_refused(gateway, first["access_token"], "token revoked")
    assert (await gateway.authenticate(latest["access_token"])).name == "Wren"
    assert (await accounts.refresh(latest["refresh_token"]))["token_type"] == "bearer"
    for opened in others:
        assert (await accounts.refresh(opened.refresh_token))["token_type"] == "bearer"

    for _ in range(20):  # a client logging in at every request
        await accounts.sessions.open(user_id)
    assert await redis.zcard(key) == 3
    assert len(await redis.keys(session_key("*"))) == 3


async def test_the_cap_ends_sessions_by_their_last_use(redis: aioredis.Redis) -> None:
    sessions = Sessions(redis, refresh_ttl=3600, revoke_for=960, max_sessions=2)
    (a, a_token, _), (b, b_token, _) = [await sessions.open("u1") for _ in range(2)]
    _, _, a_token = await sessions.rotate(a_token)  # used after b was opened
    c, c_token, ended = await sessions.open("u1")
    assert ended == 1
    other, other_token, ended = await sessions.open("u2")  # another user's count
    assert ended == 0
    with pytest.raises(Unauthorized, match="invalid refresh token"):
        await sessions.rotate(b_token)
    for sid, token in ((a, a_token), (c, c_token), (other, other_token)):
        assert (await sessions.rotate(token))[0] == sid
    revoked = await redis.zmscore(REVOKED, [f"sid:{s}" for s in (a, b, c, other)])
    assert [score is not None for score in revoked] == [False, True, False, False]


async def test_a_login_drops_the_expired_sessions_from_the_index(redis: aioredis.Redis) -> None:
    """Their access tokens died before them (JWT_REFRESH_TTL is the longer): nothing of
    them is left to revoke, and they count for nothing towards the cap."""
    clock = Clock()
    sessions = Sessions(redis, refresh_ttl=3600, revoke_for=960, max_sessions=2, clock=clock)
    for _ in range(2):
        await sessions.open("u1")
    clock.offset = 3601
    sid, _, ended = await sessions.open("u1")
    assert ended == 0  # expired, not ended
    assert await redis.zrange(user_sessions_key("u1"), 0, -1) == [sid.encode()]
    assert await redis.zcard(REVOKED) == 0  # expired, not ended
    assert await sessions.end_all("u1") == [sid]


@pytest.mark.parametrize("operation", ["login", "logout", "revoke user"])
async def test_a_session_index_of_the_old_type_is_upgraded(
    accounts: Accounts, gateway: Authenticator, redis: aioredis.Redis, operation: str
) -> None:
    """`user_sessions` was a set of ids once: a refresh works on it and the first login,
    logout or revocation turns it into the zset, dropping the ids of sessions long gone."""
    user_id, first = await signed_up(accounts, "Vera")
    sid = claims_of(first["access_token"])["sid"]
    key, stale = user_sessions_key(user_id), [f"{i:032x}" for i in range(200)]
    await redis.delete(key)
    await redis.sadd(key, sid, *stale)
    second = await accounts.refresh(first["refresh_token"])
    assert await redis.type(key) == b"set"

    if operation == "login":
        third = await accounts.login("Vera", PASSWORD)
        live = {sid, claims_of(third["access_token"])["sid"]}
    elif operation == "logout":
        await accounts.logout(sid)
        live = set()
        await eventually_refused(gateway, second["access_token"], "token revoked")
    else:
        await accounts.revoke("user", user_id)
        live = set()
        await eventually_refused(gateway, second["access_token"], "token revoked")
        scores = await redis.zmscore(REVOKED, [f"sid:{s}" for s in stale])
        assert scores == [None] * len(stale)  # one revocation per live session only
    assert await redis.type(key) == (b"zset" if live else b"none")
    assert {s.decode() for s in await redis.zrange(key, 0, -1)} == live


# -- revoke --------------------------------------------------------------------------


async def test_revoke_one_token(accounts: Accounts, gateway: Authenticator) -> None:
    _, first = await signed_up(accounts, "Rita")
    second = await accounts.refresh(first["refresh_token"])  # same session
    jti = claims_of(first["access_token"])["jti"]
    assert await accounts.revoke("token", jti) == {"revoked": True}
    await eventually_refused(gateway, first["access_token"], "token revoked")
    assert (await gateway.authenticate(second["access_token"])).name == "Rita"


async def test_revoke_a_user(
    accounts: Accounts, gateway: Authenticator, redis: aioredis.Redis
) -> None:
    user_id, first = await signed_up(accounts, "Sam")
    key = await accounts.create_api_key(user_id, "ci", ["iptv"], None)
    await gateway.authenticate(key["api_key"])
    assert await accounts.revoke("user", user_id) == {"revoked": True}
    await eventually_refused(gateway, first["access_token"], "token revoked")
    await eventually_refused(gateway, key["api_key"], "API key revoked")
    assert await accounts.list_api_keys(user_id) == []
    with pytest.raises(Unauthorized):
        await accounts.refresh(first["refresh_token"])
    with pytest.raises(Unauthorized, match="revoked"):
        await accounts.login("Sam", PASSWORD)  # until every older token has expired
    await redis.zrem(REVOKED, f"user:{user_id}")  # as when the entry lapses
    assert (await accounts.login("Sam", PASSWORD))["token_type"] == "bearer"


async def test_revoke_a_key_and_bad_requests(accounts: Accounts, gateway: Authenticator) -> None:
    user_id, _ = await signed_up(accounts, "Tara")
    key = await accounts.create_api_key(user_id, "ci", ["iptv"], None)
    await gateway.authenticate(key["api_key"])
    assert await accounts.revoke("key", key["key_id"]) == {"revoked": True}
    await eventually_refused(gateway, key["api_key"], "API key revoked")
    with pytest.raises(NotFound):
        await accounts.revoke("key", key["key_id"])
    with pytest.raises(NotFound):
        await accounts.revoke("user", str(uuid.uuid4()))
    with pytest.raises(BadRequest):
        await accounts.revoke("everything", user_id)
    with pytest.raises(BadRequest):
        await accounts.revoke("token", "not a jti")
