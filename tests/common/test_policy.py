"""The policy document: validation, defaults, public names and `changed_paths`."""

from __future__ import annotations

import json
import re
from typing import Any, get_args

import pytest
import redis.asyncio as aioredis

from common.balancing import STRATEGIES
from common.errors import BadRequest
from common.gcra import Limit
from common.http_errors import status_for
from common.policy import (
    DEFAULT_POLICY,
    PolicyInvalid,
    PolicyStore,
    StrategyName,
    changed_paths,
    validate_document,
    validate_json,
)
from common.policy.merge import merge_patch
from common.policy.sections import omission_warnings
from tests.common.policy_fixtures import KEYS, nlp, store_fixture  # noqa: F401 (a fixture)
from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(60)


# -- validation -------------------------------------------------------------------------


def routes(*prefixes: str) -> dict[str, Any]:
    return {"routes": [{"prefix": p, "service": "a"} for p in prefixes]}


def limit(**fields: Any) -> dict[str, Any]:
    return {"limits": [{"id": "a", "rate": 1, "period": 1, **fields}]}


WEIGHTS = "services.nlp.version_weights"
BAD_DOCUMENTS: list[tuple[str, object, str]] = [
    ("list", [1, 2], "(document)"),
    ("string", "services", "(document)"),
    ("null", None, "(document)"),
    ("number", 5, "(document)"),
    ("unknown top-level field", {"servics": {}}, "servics"),
    ("unknown service field", nlp(strategyy="hash"), "services.nlp.strategyy"),
    ("bad strategy", nlp(strategy="fastest"), "services.nlp.strategy"),
    ("timeout as text", nlp(timeout="3"), "services.nlp.timeout"),
    ("timeout zero", nlp(timeout=0), "services.nlp.timeout"),
    ("timeout too long", nlp(timeout=3601), "services.nlp.timeout"),
    ("connect timeout too long", nlp(connect_timeout=61), "services.nlp.connect_timeout"),
    ("retries as float", nlp(retries=1.5), "services.nlp.retries"),
    ("retries as bool", nlp(retries=True), "services.nlp.retries"),
    ("too many retries", nlp(retries=6), "services.nlp.retries"),
    ("budget ratio over 1", nlp(retry_budget={"ratio": 1.5}), "services.nlp.retry_budget.ratio"),
    (
        "negative budget minimum",
        nlp(retry_budget={"min_per_second": -1}),
        "services.nlp.retry_budget.min_per_second",
    ),
    (
        "unknown budget field",
        nlp(retry_budget={"percent": 20}),
        "services.nlp.retry_budget.percent",
    ),
    ("body limit zero", nlp(max_body=0), "services.nlp.max_body"),
    ("total timeout zero", nlp(total_timeout=0), "services.nlp.total_timeout"),
    ("total timeout over a day", nlp(total_timeout=86401), "services.nlp.total_timeout"),
    ("hash on an unknown source", nlp(hash_on="query:user"), "services.nlp.hash_on"),
    ("hash on a bad header name", nlp(hash_on="header:X User"), "services.nlp.hash_on"),
    ("body limit over 1 TiB", nlp(max_body=2**40 + 1), "services.nlp.max_body"),
    ("negative weight", nlp(version_weights={"v1": -1, "v2": 5}), f"{WEIGHTS}.v1"),
    ("all-zero weights", nlp(version_weights={"v1": 0, "v2": 0}), WEIGHTS),
    ("weight as text", nlp(version_weights={"v1": "5"}), f"{WEIGHTS}.v1"),
    ("bad version tag", nlp(version_weights={"v 1": 5}), f"{WEIGHTS}.v 1"),
    ("bad service name", {"services": {"Bad Name": {}}}, "services.Bad Name"),
    ("routes not a list", {"routes": {"prefix": "/x/"}}, "routes"),
    ("reserved prefix /api/", routes("/api/x/"), "routes[0].prefix"),
    ("reserved prefix /health", routes("/health/"), "routes[0].prefix"),
    ("prefix covering reserved", routes("/"), "routes[0].prefix"),
    ("prefix without slash", routes("/x"), "routes[0].prefix"),
    ("prefix with ..", routes("/a/../b/"), "routes[0].prefix"),
    ("prefix with a query", routes("/a?b/"), "routes[0].prefix"),
    ("route without service", {"routes": [{"prefix": "/x/"}]}, "routes[0].service"),
    ("duplicate prefix", routes("/x/", "/y/", "/x/"), "routes[2].prefix"),
    ("duplicate limit id", {"limits": limit()["limits"] * 2}, "limits[1].id"),
    ("limit rate zero", limit(rate=0), "limits[0].rate"),
    ("limit bad key", limit(key="host"), "limits[0].key"),
    ("limit burst zero", limit(burst=0), "limits[0].burst"),
    ("limit period too long", limit(period=86401), "limits[0].period"),
    ("limit window too long", limit(period=86400, burst=1_000_000), "limits[0]"),
    ("limit bad service", limit(service="**"), "limits[0].service"),
    ("limit unknown field", limit(x=1), "limits[0].x"),
    ("version as text", {"version": "3"}, "version"),
]


@pytest.mark.parametrize(("doc", "loc"), [(d, loc) for _, d, loc in BAD_DOCUMENTS],
                         ids=[name for name, _, _ in BAD_DOCUMENTS])  # fmt: skip
async def test_bad_documents_are_rejected_with_reasons_and_nothing_stored(
    store: PolicyStore, redis_client: aioredis.Redis, doc: object, loc: str
) -> None:
    with pytest.raises(PolicyInvalid) as info:
        validate_document(doc)
    locs = [e["loc"] for e in info.value.errors]
    assert any(at.startswith(loc) for at in locs), info.value.errors
    assert all(e["msg"] for e in info.value.errors)
    with pytest.raises(PolicyInvalid):
        await store.put(doc, actor="test")
    assert await redis_client.exists(*KEYS) == 0  # nothing stored, nothing audited


def test_policy_invalid_is_a_bad_request_with_details() -> None:
    with pytest.raises(PolicyInvalid) as info:
        validate_document(nlp(strategy="fastest", timeout=-1))
    exc = info.value
    assert isinstance(exc, BadRequest)
    body = exc.to_dict()
    assert body["code"] == "policy_invalid"
    assert {d["loc"] for d in body["details"]} == {"services.nlp.strategy", "services.nlp.timeout"}
    assert "services.nlp.strategy" in body["message"]


def test_a_huge_name_in_a_policy_is_quoted_shortened() -> None:
    huge = "z" * 900_000
    doc = {"services": {huge: {}}, huge.upper(): 1,
           "limits": [{"id": huge, "rate": 1, "period": 1}] * 2}  # fmt: skip
    with pytest.raises(PolicyInvalid) as info:
        validate_document(doc)
    exc = info.value
    assert status_for(exc) == 422
    assert len(exc.errors) >= 4, exc.errors  # the key, the extra field, the ids, the duplicate
    assert len(exc.message) < 2000 and len(json.dumps(exc.to_dict())) < 4000
    assert any("(900000 characters)" in e["loc"] for e in exc.errors)
    assert any("duplicate limit id" in e["msg"] for e in exc.errors)


def test_every_error_is_reported_at_once() -> None:
    doc = {
        "services": {"nlp": {"strategy": "x", "version_weights": {"a": 0}}},
        "routes": [{"prefix": "/api/", "service": "a"}, {"prefix": "/y/", "service": "a"},
                   {"prefix": "/y/", "service": "a"}],
        "limits": [{"id": "l", "rate": 1, "period": 1}, {"id": "l", "rate": 0, "period": 1}],
        "extra": True,
    }  # fmt: skip
    with pytest.raises(PolicyInvalid) as info:
        validate_document(doc)
    assert {e["loc"] for e in info.value.errors} == {
        "services.nlp.strategy",
        "services.nlp.version_weights",
        "routes[0].prefix",
        "routes[2].prefix",
        "limits[1].rate",
        "limits[1].id",
        "extra",
    }


@pytest.mark.parametrize(
    ("rate", "period", "burst"),
    [(1, 86400, 1_000_000), (1, 86400, 13_032), (1, 86400, 13_031), (1_000_000, 0.001, 1)],
)
def test_a_limit_is_valid_exactly_when_the_rate_limiter_can_build_it(
    rate: int, period: float, burst: int
) -> None:
    """Every limit of a valid policy is built into a `gcra.Limit` on the gateway's
    request path: one the limiter refuses there must be refused here, by name."""
    try:
        Limit(rate, period, burst)
        buildable = True
    except ValueError:
        buildable = False
    doc = {"limits": [{"id": "daily", "rate": rate, "period": period, "burst": burst}]}
    if buildable:
        assert validate_document(doc).limits[0].burst == burst
        return
    with pytest.raises(PolicyInvalid) as info:
        validate_document(doc)
    [error] = info.value.errors
    assert error["loc"] == "limits[0]"
    assert error["msg"].startswith("limit 'daily': burst * period / rate")


@pytest.mark.parametrize(
    "prefix",
    ["/nlp/", "/nlp/x/", "/health/", "/health/deep/", "/api/", "/api/v2/", "/admin/x/",
     "/svc/", "/rpc/calc/", "/heartbeat/", "/ai_server/", "/metrics/", "/docs/"],
)  # fmt: skip
def test_a_route_sharing_a_path_with_the_gateways_own_is_refused(prefix: str) -> None:
    """`/nlp` reserves `/nlp` and what is under it: the gateway's route for `/health`
    also answers `/health/` (Sanic's slashes are not strict)."""
    with pytest.raises(PolicyInvalid) as info:
        validate_document(routes(prefix))
    assert info.value.errors[0]["loc"] == "routes[0].prefix"
    assert "overlaps the gateway's reserved prefix" in info.value.errors[0]["msg"]


@pytest.mark.parametrize(
    "prefix",
    ["/nlp-api/", "/nlpx/", "/healthz/", "/health-check/", "/svc-old/", "/rpcs/", "/apis/",
     "/administration/", "/ai_server2/", "/a/nlp/", "/v1/api/", "/NLP/"],
)  # fmt: skip
def test_a_route_that_only_starts_with_the_same_letters_is_accepted(prefix: str) -> None:
    """README's example (`/nlp-api/`) included: path segments are compared, not
    characters. (`/NLP/`: the gateway's router is case-sensitive, `/NLP` is not its.)"""
    assert validate_document(routes(prefix)).routes[0].prefix == prefix


def test_the_readmes_route_example_is_valid() -> None:
    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r'Policy `routes` \(`(\{"prefix".*?\})`\)', readme, re.S)
    assert examples, "the README's route example moved: update this test"
    for example in examples:
        validate_document({"routes": [json.loads(example.replace("\n  ", " "))]})


def test_malformed_json_is_invalid_too() -> None:
    with pytest.raises(PolicyInvalid) as info:
        validate_json('{"services": ')
    assert info.value.errors[0]["loc"] == "(document)"
    assert "not valid JSON" in info.value.errors[0]["msg"]
    assert validate_json('{"services": {"nlp": {"strategy": "hash"}}}').services["nlp"].strategy


def test_a_good_document_gets_its_defaults() -> None:
    doc = validate_document({
        "services": {"nlp": {"version_weights": {"v1": 90, "v2": 10}, "timeout": 5}},
        "routes": [{"prefix": "/models/", "service": "nlp"}],
        "limits": [{"id": "search", "service": "iptv", "rate": 20, "period": 1}],
    })  # fmt: skip
    assert doc.services["nlp"].strategy == "round_robin"
    assert doc.services["nlp"].timeout == 5.0 and doc.services["nlp"].retries is None
    assert doc.routes[0].strip_prefix is True and doc.routes[0].public is False
    limit = doc.limits[0]
    assert (limit.method, limit.key, limit.burst) == ("*", "credential", 20)  # burst = rate


def test_public_names() -> None:
    import common.policy

    assert sorted(common.policy.__all__) == [
        "DEFAULT_POLICY", "LimitRule", "PolicyDocument", "PolicyInvalid", "PolicyStore",
        "PolicyUnreadable", "PolicyWatcher", "RESERVED_PREFIXES", "RetryBudgetPolicy",
        "RouteRule", "ServicePolicy", "StrategyName",
        "changed_paths", "validate_document", "validate_json",
    ]  # fmt: skip


def test_default_policy_and_strategy_names() -> None:
    assert set(get_args(StrategyName)) == set(STRATEGIES)
    assert DEFAULT_POLICY.version == 0
    limits = {rule.id: rule for rule in DEFAULT_POLICY.limits}
    assert set(limits) == {"login", "register"}
    assert (limits["login"].rate, limits["login"].burst, limits["login"].key) == (30, 10, "ip")
    assert (limits["register"].rate, limits["register"].burst) == (10, 5)
    assert validate_document(DEFAULT_POLICY) == DEFAULT_POLICY  # it validates itself


def test_changed_paths() -> None:
    old = {
        "version": 1,
        "services": {"nlp": {"strategy": "hash", "version_weights": {"v1": 100}}, "old": {}},
        "routes": [{"prefix": "/a/", "service": "a"}],
        "limits": [{"id": "login", "rate": 30}, {"id": "gone", "rate": 1}],
    }
    new = {
        "version": 2,
        "services": {"nlp": {"strategy": "hash", "version_weights": {"v1": 90, "v2": 10}},
                     "iptv": {}},
        "routes": [{"prefix": "/a/", "service": "b"}],
        "limits": [{"id": "login", "rate": 20}, {"id": "added", "rate": 1}],
    }  # fmt: skip
    assert changed_paths(old, new) == [
        "limits.added",
        "limits.gone",
        "limits.login.rate",
        "routes",
        "services.iptv",
        "services.nlp.version_weights",
        "services.old",
    ]
    assert changed_paths(old, {**old, "version": 9}) == []


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # RFC 7396, appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_is_rfc_7396(target: Any, patch: Any, result: Any) -> None:
    before = json.dumps(target)
    assert merge_patch(target, patch) == result
    assert json.dumps(target) == before  # the target is not changed in place


def test_omission_warnings_name_each_section_left_out() -> None:
    assert omission_warnings({"services": {}, "routes": [], "limits": []}) == []
    warnings = omission_warnings({"services": {"nlp": {"strategy": "hash"}}})
    assert [w.split()[0] for w in warnings] == ['"routes"', '"limits"']
    assert "the default policy limits auth.login and auth.register" in warnings[1]
    assert "PATCH /admin/policy" in warnings[1]
