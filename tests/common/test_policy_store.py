"""The policy store against a real Redis: put/get, versions, conflicts, history, audit."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import redis.asyncio as aioredis

from common import constants
from common.errors import Conflict
from common.policy import (
    DEFAULT_POLICY,
    PolicyDocument,
    PolicyInvalid,
    PolicyStore,
    PolicyUnreadable,
)
from common.policy.store import AUDIT_MAXLEN, HISTORY_KEEP
from tests.common.policy_fixtures import KEYS, nlp, store_fixture  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)


# -- the store --------------------------------------------------------------------------


async def test_get_is_the_default_until_something_is_stored(store: PolicyStore) -> None:
    assert await store.get() == DEFAULT_POLICY
    assert (await store.stamp())[0] == 0
    assert await store.history() == []
    assert await store.get_version(0) == DEFAULT_POLICY
    assert await store.get_version(1) is None


async def test_put_and_get_increment_the_version(store: PolicyStore) -> None:
    first = await store.put({**nlp(strategy="hash"), "version": 77}, actor="alice")
    assert first.version == 1  # the document's own version is ignored
    assert (await store.get()) == first
    second = await store.put(nlp(strategy="random"), actor="bob", expected_version=1)
    assert second.version == 2
    assert (await store.get()).services["nlp"].strategy == "random"
    assert (await store.stamp())[0] == 2
    assert (await store.get_version(1)) == first
    assert (await store.get_version(2)) == second


async def test_the_first_write_into_an_empty_store_draws_its_epoch(
    store: PolicyStore, redis_client: aioredis.Redis
) -> None:
    assert await store.stamp() == (0, None)
    await store.put(nlp(strategy="hash"), actor="alice")
    version, epoch = await store.stamp()
    assert version == 1 and epoch
    await store.put(nlp(strategy="random"), actor="bob")
    assert await store.stamp() == (2, epoch)
    assert (await store.load())[1] == epoch
    await redis_client.delete(*KEYS)  # Redis lost its data: versions start again at 1
    await store.put(nlp(strategy="random"), actor="bob")
    again, other = await store.stamp()
    assert again == 1 and other and other != epoch


async def test_expected_version_conflict_changes_nothing(store: PolicyStore) -> None:
    await store.put(nlp(strategy="hash"), actor="alice", expected_version=0)
    with pytest.raises(Conflict) as info:
        await store.put(nlp(strategy="random"), actor="bob", expected_version=0)
    assert "version 1" in info.value.message
    assert (await store.get()).services["nlp"].strategy == "hash"
    assert (await store.stamp())[0] == 1
    assert len(await store.history()) == 1


async def test_concurrent_puts_each_get_their_own_version(store: PolicyStore) -> None:
    docs = await asyncio.gather(*(store.put(nlp(retries=i % 6), actor=f"w{i}") for i in range(10)))
    assert sorted(d.version for d in docs) == list(range(1, 11))
    assert (await store.stamp())[0] == 10
    assert [e["version"] for e in await store.history(20)] == list(range(10, 0, -1))


async def test_history_and_audit_entries(store: PolicyStore) -> None:
    await store.put(nlp(strategy="hash"), actor="alice")
    await store.put(nlp(strategy="hash", version_weights={"v1": 1}), actor="bob")
    entries = await store.history(10)
    assert [(e["version"], e["actor"]) for e in entries] == [(2, "bob"), (1, "alice")]
    assert entries[0]["changes"] == ["services.nlp.version_weights"]
    assert entries[1]["changes"] == ["limits.login", "limits.register", "services.nlp"]
    assert entries[0]["at"] >= entries[1]["at"] > 1_600_000_000  # Redis's clock, in seconds
    assert [e["version"] for e in await store.history(1)] == [2]


async def test_history_keeps_the_last_versions_and_the_audit_is_trimmed(
    store: PolicyStore, redis_client: aioredis.Redis
) -> None:
    total = AUDIT_MAXLEN + 150
    for i in range(total):
        await store.put(nlp(retries=i % 6), actor="loop")
    assert await redis_client.hlen(constants.POLICY_HISTORY) == HISTORY_KEEP  # type: ignore[misc]
    assert await store.get_version(total - HISTORY_KEEP) is None
    assert (await store.get_version(total - HISTORY_KEEP + 1)) is not None
    assert AUDIT_MAXLEN <= await redis_client.xlen(constants.POLICY_AUDIT) < total


async def test_put_accepts_a_document_object(store: PolicyStore) -> None:
    doc = PolicyDocument.model_validate(nlp(strategy="least_time"))
    assert (await store.put(doc, actor="a")).services["nlp"].strategy == "least_time"


# -- leaving a section out, and merge patches --------------------------------------------


async def test_a_put_leaving_out_a_section_with_entries_is_refused_naming_them(
    store: PolicyStore,
) -> None:
    """A PUT replaces the whole document: leaving out `limits` (the default's login and
    register limits), `routes` or `services` while the store has some is refused with one
    reason per section, and writes nothing; saying it (`"limits": []`) is accepted."""
    with pytest.raises(PolicyInvalid) as info:
        await store.put({"services": {"nlp": {"strategy": "hash"}}}, actor="alice")
    assert [e["loc"] for e in info.value.errors] == ["limits"]
    assert "remove the 2 limits stored ('login', 'register')" in info.value.errors[0]["msg"]
    assert await store.stamp() == (0, None)  # nothing written
    routes = [{"prefix": f"/r{i}/", "service": "web"} for i in range(7)]
    full = await store.put({"services": {"nlp": {}}, "routes": routes, "limits": []}, actor="a")
    with pytest.raises(PolicyInvalid) as info:
        await store.put({"limits": []}, actor="alice", expected_version=full.version)
    assert [e["loc"] for e in info.value.errors] == ["services", "routes"]
    assert "the 1 service entries stored ('nlp')" in info.value.errors[0]["msg"]
    assert "('/r0/', '/r1/', '/r2/', '/r3/', '/r4/' and 2 more)" in info.value.errors[1]["msg"]
    assert await store.get() == full
    emptied = await store.put({"services": {}, "routes": [], "limits": []}, actor="a")
    assert await store.put({}, actor="a") == emptied.model_copy(update={"version": 3})


async def test_a_patch_merges_into_the_stored_document(store: PolicyStore) -> None:
    first = await store.patch({"services": {"nlp": {"strategy": "hash", "retries": 2}},
                               "version": 99}, actor="alice")  # fmt: skip
    assert first.version == 1 and first.limits == DEFAULT_POLICY.limits  # kept
    change = {"services": {"nlp": {"retries": None, "timeout": 3.0}, "iptv": {}}}
    second = await store.patch(change, actor="bob", expected_version=1)
    assert second.services["nlp"].model_dump(exclude_none=True) == {
        "strategy": "hash", "version_weights": {}, "timeout": 3.0}  # fmt: skip
    assert set(second.services) == {"nlp", "iptv"} and second.limits == DEFAULT_POLICY.limits
    assert (await store.history(1))[0]["changes"] == [
        "services.iptv", "services.nlp.retries", "services.nlp.timeout"]  # fmt: skip
    with pytest.raises(Conflict):
        await store.patch({"limits": []}, actor="carol", expected_version=1)
    with pytest.raises(PolicyInvalid) as info:
        await store.patch({"services": {"nlp": {"strategy": "fastest"}}}, actor="carol")
    assert [e["loc"] for e in info.value.errors] == ["services.nlp.strategy"]
    with pytest.raises(PolicyInvalid, match="a merge patch must be a JSON object"):
        await store.patch([{"op": "remove", "path": "/limits"}], actor="carol")
    assert await store.get() == second  # none of the three wrote anything


async def test_concurrent_patches_are_each_applied_to_the_version_they_write_over(
    store: PolicyStore,
) -> None:
    """Ten patches at once, each setting one service: the compare-and-set applies a
    patch that lost a race again to the new version, so none is lost."""
    docs = await asyncio.gather(*(store.patch({"services": {f"s{i}": {"retries": i % 6}}},
                                              actor=f"w{i}") for i in range(10)))  # fmt: skip
    assert sorted(d.version for d in docs) == list(range(1, 11))
    assert set((await store.get()).services) == {f"s{i}" for i in range(10)}


async def test_a_patch_over_an_invalid_stored_document_is_refused(
    store: PolicyStore, redis_client: aioredis.Redis
) -> None:
    first = await store.put(nlp(strategy="hash"), actor="alice")
    await redis_client.set(constants.POLICY_DOC, '{"services": {"nlp": {"strategy": "x"}}}')
    with pytest.raises(PolicyInvalid) as info:
        await store.patch({"limits": []}, actor="bob")
    assert [e["loc"] for e in info.value.errors] == ["(document)"]
    assert "the stored policy is not valid (services.nlp.strategy:" in info.value.errors[0]["msg"]
    assert "PUT a whole document" in info.value.errors[0]["msg"]
    assert (await store.stamp())[0] == first.version  # nothing written
    repaired = await store.put(nlp(strategy="random"), actor="bob")  # a put replaces it
    assert repaired.version == first.version + 1


# -- data set by hand in Redis ----------------------------------------------------------


async def test_a_stored_document_that_is_not_json_is_policy_invalid(
    store: PolicyStore, redis_client: aioredis.Redis
) -> None:
    first = await store.put(nlp(strategy="hash"), actor="alice")
    await redis_client.set(constants.POLICY_DOC, "garbage{")
    await redis_client.hset(constants.POLICY_HISTORY, "1", b"\xff not JSON")  # type: ignore[misc]
    for read in (store.get, lambda: store.get_version(1)):
        with pytest.raises(PolicyInvalid) as info:
            await read()
        assert [e["loc"] for e in info.value.errors] == ["(document)"]
        assert "not valid JSON" in info.value.message
    repaired = await store.put(nlp(strategy="random"), actor="bob", expected_version=first.version)
    assert await store.get() == repaired


@pytest.mark.parametrize("raw", ["abc", "1_0", " 1", "1.5", "-1", "\u0661", "9" * 40])
async def test_a_stored_version_that_is_no_integer_is_policy_unreadable(
    store: PolicyStore, redis_client: aioredis.Redis, raw: str
) -> None:
    first = await store.put(nlp(strategy="hash"), actor="alice")
    await redis_client.set(constants.POLICY_VERSION, raw)
    with pytest.raises(PolicyUnreadable, match="policy version is not an integer"):
        await store.stamp()
    for expected in (None, 1):
        with pytest.raises(PolicyUnreadable, match=r"repair sb:\{policy\}:version"):
            await store.put(nlp(strategy="random"), actor="bob", expected_version=expected)
    assert await store.get() == first  # nothing written, nothing audited
    assert len(await store.history()) == 1


@pytest.mark.parametrize("key", KEYS)
async def test_a_key_of_another_redis_type_refuses_a_put_before_any_write(
    store: PolicyStore, redis_client: aioredis.Redis, key: str
) -> None:
    """A Lua script's writes are not rolled back when a later command fails: a put over
    a store with one key of the wrong type must refuse before writing anything."""
    first = await store.put(nlp(strategy="hash"), actor="alice")
    before = {k: await redis_client.dump(k) for k in KEYS}
    await redis_client.delete(key)
    await redis_client.rpush(key, "set by hand")
    before[key] = await redis_client.dump(key)
    for expected in (None, first.version):
        with pytest.raises(PolicyUnreadable, match=rf"{re.escape(key)} holds another Redis type"):
            await store.put(nlp(strategy="random"), actor="bob", expected_version=expected)
    assert {k: await redis_client.dump(k) for k in KEYS} == before  # nothing written


async def test_reads_of_a_history_or_audit_of_another_type_are_policy_unreadable(
    store: PolicyStore, redis_client: aioredis.Redis
) -> None:
    await store.put(nlp(strategy="hash"), actor="alice")
    for key in (constants.POLICY_HISTORY, constants.POLICY_AUDIT):
        await redis_client.delete(key)
        await redis_client.set(key, "set by hand")
    with pytest.raises(PolicyUnreadable, match=r"sb:\{policy\}:audit holds another Redis type"):
        await store.history()
    with pytest.raises(PolicyUnreadable, match=r"sb:\{policy\}:history holds another Redis"):
        await store.get_version(1)


async def test_history_shows_unreadable_audit_fields_as_none(
    store: PolicyStore, redis_client: aioredis.Redis
) -> None:
    await store.put(nlp(strategy="hash"), actor="alice")
    bad = [
        {"version": "x", "at": "y"},
        {"version": "1_0", "actor": b"\xffbob", "at": "inf", "changes": "{not JSON"},
        {"version": "7", "at": "nan", "changes": '{"a": 1}'},
        {"at": "-5", "changes": "[1, 2]"},
    ]
    for fields in bad:
        await redis_client.xadd(constants.POLICY_AUDIT, fields)  # type: ignore[arg-type]
    entries = await store.history(10)
    assert [(e["version"], e["at"], e["changes"]) for e in entries[:4]] == [
        (0, None, None),
        (7, None, None),
        (None, None, None),
        (None, None, []),
    ]
    assert entries[2]["actor"] == "\ufffdbob"
    assert (entries[4]["version"], entries[4]["actor"]) == (1, "alice")


async def test_a_route_to_a_reserved_name_stored_before_the_rule_is_read_but_not_written(
    store: PolicyStore, redis_client: aioredis.Redis
) -> None:
    # Routes to `auth`, `admin` or `registry` are refused since a later release; a
    # document stored before is still read (a gateway started after the upgrade must not
    # run without the whole policy), and a write must drop the route.
    route = {"prefix": "/login/", "service": "auth"}
    stored = {"services": {"nlp": {"strategy": "hash"}}, "routes": [route]}
    await redis_client.set(constants.POLICY_DOC, json.dumps(stored))
    document = await store.get()
    assert document.services["nlp"].strategy == "hash"
    assert document.routes[0].service == "auth"
    with pytest.raises(PolicyInvalid, match="reserved"):
        await store.put(stored, actor="t")
