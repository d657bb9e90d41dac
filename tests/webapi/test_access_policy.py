"""The admin policy API, through two real gateway processes sharing Redis
(`access_fixtures`): validation, versions and audit, strict integers, a limit the rate
limiter cannot keep, and a weight change followed by both gateways under load.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest
import redis

from common.policy import DEFAULT_POLICY
from tests.helpers import ServiceProcess, issue_api_key, wait_for
from tests.support.policy import policy_version
from tests.webapi.access_fixtures import (  # noqa: F401 (the `gateways` fixture)
    ADMIN_NAME,
    Gateways,
    bearer,
    gateways_fixture,
)
from tests.webapi.conftest import http_instance

pytestmark = pytest.mark.timeout(240)


# -- the admin policy API --------------------------------------------------------


def test_policy_admin_api_validates_versions_and_audits(gateways: Gateways) -> None:
    admin = bearer(gateways.admin_token())
    url = f"{gateways.url}/admin/policy"
    current = httpx.get(url, headers=admin).json()
    bad = {"services": {"calc": {"strategy": "fastest", "version_weights": {"v1": -1}}},
           "surprise": 1}  # fmt: skip
    refused = httpx.put(url, json=bad, headers=admin)
    assert refused.status_code == 422
    details = refused.json()["error"]["details"]
    assert {d["loc"] for d in details} >= {"services.calc.strategy", "surprise"}
    assert httpx.get(url, headers=admin).json() == current  # nothing changed
    checked = httpx.post(f"{url}/validate", json=bad, headers=admin)
    assert checked.status_code == 422
    assert httpx.put(url, content=b"{nope", headers=admin).status_code == 400

    stale = {**current, "services": {"calc": {"strategy": "random"}}}
    changed = httpx.put(url, json=stale, headers={**admin, "If-Match": str(current["version"])})
    assert changed.status_code == 200 and changed.json()["version"] == current["version"] + 1
    conflict = httpx.put(url, json=stale, headers={**admin, "If-Match": str(current["version"])})
    assert conflict.status_code == 409
    history = httpx.get(f"{url}/history", headers=admin).json()["changes"]
    assert history[0]["version"] == current["version"] + 1
    assert ADMIN_NAME in history[0]["actor"]
    assert "services.calc" in " ".join(history[0]["changes"])
    old = httpx.get(f"{url}/versions/{current['version']}", headers=admin)
    assert old.status_code == 200 and old.json()["services"] == current["services"]


def test_a_put_that_leaves_out_the_limits_is_refused_and_a_patch_keeps_them(
    gateways: Gateways,
) -> None:
    """README's way to change one service's strategy, `{"services": {"nlp": {"strategy":
    "hash"}}}`, as a PUT would remove the default limits on login and register: it is 422
    naming them, and validate warns; as a PATCH (merge patch) it changes the strategy
    and nothing else, compare-and-set on If-Match as a PUT; `"limits": []` removes them."""
    token = gateways.admin_token()
    admin = bearer(token)
    url = f"{gateways.url}/admin/policy"
    defaults = DEFAULT_POLICY.model_dump(mode="json")["limits"]
    before = gateways.put_policy(token, services={"nlp": {"retries": 2}}, limits=defaults)
    change = {"services": {"nlp": {"strategy": "hash"}}}

    refused = httpx.put(url, json=change, headers=admin)
    assert refused.status_code == 422, refused.text
    details = refused.json()["error"]["details"]
    assert [d["loc"] for d in details] == ["limits"]
    assert "'login', 'register'" in details[0]["msg"] and '"limits": []' in details[0]["msg"]
    assert httpx.get(url, headers=admin).json() == before  # nothing written
    checked = httpx.post(f"{url}/validate", json=change, headers=admin)
    assert checked.status_code == 200, checked.text
    warnings = checked.json()["warnings"]
    assert [w.split()[0] for w in warnings] == ['"routes"', '"limits"']
    got = httpx.get(url, headers=admin)
    assert got.headers["accept-patch"] == "application/merge-patch+json"

    patched = httpx.patch(url, json=change, headers={**admin, "If-Match": str(before["version"])})
    assert patched.status_code == 200, patched.text
    after = patched.json()
    assert after["version"] == before["version"] + 1
    assert after["services"]["nlp"] == {**before["services"]["nlp"], "strategy": "hash"}
    assert after["limits"] == defaults and after["routes"] == before["routes"]
    history = httpx.get(f"{url}/history", headers=admin).json()["changes"]
    assert history[0]["changes"] == ["services.nlp.strategy"]
    wait_for(lambda: all(policy_version(u) == after["version"] for u in gateways.urls), timeout=5)

    stale = httpx.patch(url, json=change, headers={**admin, "If-Match": str(before["version"])})
    assert stale.status_code == 409, stale.text
    bad = httpx.patch(url, json={"services": {"nlp": {"retries": 99}}}, headers=admin)
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["loc"] == (
        "services.nlp.retries")  # fmt: skip
    assert httpx.patch(url, json=[{"op": "remove", "path": "/limits"}],
                       headers=admin).status_code == 400  # fmt: skip
    assert httpx.get(url, headers=admin).json() == after  # none of these wrote anything

    removed = httpx.patch(url, json={"services": {"nlp": None}, "limits": []}, headers=admin)
    assert removed.status_code == 200, removed.text
    assert removed.json()["services"] == {} and removed.json()["limits"] == []
    explicit = httpx.put(url, json={**change, "limits": []}, headers=admin)  # said: accepted
    assert explicit.status_code == 200, explicit.text
    gateways.put_policy(token)  # as the other tests expect it: nothing in any section


def test_policy_admin_api_reads_integers_strictly(gateways: Gateways) -> None:
    admin = bearer(gateways.admin_token())
    url = f"{gateways.url}/admin/policy"
    current = httpx.get(url, headers=admin).json()
    for limit in ("0", "1001", "-1"):
        refused = httpx.get(f"{url}/history", params={"limit": limit}, headers=admin)
        assert refused.status_code == 422, (limit, refused.text)
        assert refused.json()["error"]["message"] == "limit must be between 1 and 1000"
    version = str(current["version"])
    # "1_0" is 10 to int(), and Arabic-Indic or fullwidth digits are digits to it.
    for text in ("1_0", "\u0661", "\uff11", version.translate(str.maketrans("0123456789",
                 "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669"))):  # fmt: skip
        by_query = httpx.put(url, params={"expected_version": text}, json=current, headers=admin)
        by_header = httpx.put(url, json=current, headers={**admin, "If-Match": text.encode()})
        for refused, name in ((by_query, "expected_version"), (by_header, "If-Match")):
            assert refused.status_code == 422, (text, refused.text)
            error = refused.json()["error"]
            assert error["code"] == "invalid_params"
            assert error["message"].startswith(f"{name} must be an integer")
    assert httpx.get(url, headers=admin).json() == current  # nothing written
    quoted = httpx.put(url, json=current, headers={**admin, "If-Match": f'"{version}"'})
    assert quoted.status_code == 200, quoted.text


def test_a_route_to_a_reserved_name_is_refused(gateways: Gateways) -> None:
    """admin, auth, registry: no HTTP instance may register under them."""
    admin = bearer(gateways.admin_token())
    url = f"{gateways.url}/admin/policy"
    current = httpx.get(url, headers=admin).json()
    for name in ("admin", "auth", "registry"):
        routes = [{"prefix": "/pub/", "service": name, "public": True}]
        for answer in (httpx.put(url, json={**current, "routes": routes}, headers=admin),
                       httpx.patch(url, json={"routes": routes}, headers=admin),
                       httpx.post(f"{url}/validate", json={**current, "routes": routes},
                                  headers=admin)):  # fmt: skip
            assert answer.status_code == 422, (name, answer.text)
            (detail,) = answer.json()["error"]["details"]
            assert detail["loc"] == "routes[0].service"
            assert f"'{name}' is reserved" in detail["msg"]
    assert httpx.get(url, headers=admin).json() == current  # nothing written


def test_a_route_to_an_rpc_service_is_accepted_with_a_warning(gateways: Gateways) -> None:
    """calc is an RPC service here: its route would answer 404 `rpc_service`."""
    admin = bearer(gateways.admin_token())
    url = f"{gateways.url}/admin/policy"
    current = httpx.get(url, headers=admin).json()
    routes = [{"prefix": "/pub/", "service": "nocalc"}, {"prefix": "/calc/", "service": "calc"}]
    checked = httpx.post(f"{url}/validate", json={**current, "routes": routes}, headers=admin)
    put = httpx.put(url, json={**current, "routes": routes}, headers=admin)
    patched = httpx.patch(url, json={"routes": routes[::-1]}, headers=admin)
    for answer, index in ((checked, 1), (put, 1), (patched, 0)):
        assert answer.status_code == 200, answer.text
        (warning,) = answer.json()["warnings"]
        assert warning.startswith(f"routes[{index}].service: 'calc' is served by RPC workers")
    cleared = httpx.patch(url, json={"routes": []}, headers=admin)
    assert "warnings" not in cleared.json()  # the document alone, as GET gives it


def test_an_if_match_that_is_no_version_is_422_and_an_unkept_version_404(
    gateways: Gateways,
) -> None:
    """`-1` was a 409 ("the policy is at version N, not -1") where `abc` was a 422;
    `versions/<n>` of a version the history does not keep was a 422."""
    admin = bearer(gateways.admin_token())
    url = f"{gateways.url}/admin/policy"
    current = httpx.get(url, headers=admin).json()
    version = current["version"]
    for text in ("-1", "abc", "99999999999999999999"):
        for answer in (
            httpx.patch(url, json={"routes": []}, headers={**admin, "If-Match": text}),
            httpx.put(url, json=current, params={"expected_version": text}, headers=admin),
        ):
            assert answer.status_code == 422, (text, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "invalid_params"
            assert "a policy version" in error["message"] and repr(text) in error["message"]
    assert httpx.get(url, headers=admin).json()["version"] == version

    for missing in ("99999999999999999999", str(version + 1000), "-1"):
        answer = httpx.get(f"{url}/versions/{missing}", headers=admin)
        assert answer.status_code == 404, (missing, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "not_found" and "not in the history" in error["message"]


def test_a_limit_the_rate_limiter_cannot_keep_is_refused_and_never_applied(
    gateways: Gateways,
) -> None:
    """burst * period / rate past the limiter's window (~35 years): validate and put
    answer 422 naming the limit; the same document written straight into Redis (as
    before the rule existed) is refused by every gateway, which keeps serving."""
    admin = bearer(gateways.admin_token())
    url = f"{gateways.url}/admin/policy"
    rule = {"id": "daily", "service": "*", "rate": 1, "period": 86400, "burst": 1_000_000}
    for answer in (httpx.post(f"{url}/validate", json={"limits": [rule]}, headers=admin),
                   httpx.put(url, json={"limits": [rule]}, headers=admin)):  # fmt: skip
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "policy_invalid"
        assert error["details"][0]["loc"] == "limits[0]"
        assert "limit 'daily': burst * period / rate" in error["details"][0]["msg"]

    good = gateways.put_policy(admin["Authorization"][7:], limits=[])
    raw = {**good, "version": good["version"] + 1,
           "limits": [{**rule, "method": "*", "key": "credential"}]}  # fmt: skip
    r = redis.Redis.from_url(gateways.redis_url)
    r.set("sb:{policy}:doc", json.dumps(raw))
    r.set("sb:{policy}:version", good["version"] + 1)
    r.publish("sb:{policy}:changed", good["version"] + 1)

    def refused(proc: ServiceProcess) -> bool:
        return '"msg": "stored policy is invalid' in proc.log_path.read_text(errors="replace")

    wait_for(lambda: all(refused(proc) for proc in gateways.procs[:2]), timeout=5)
    for gateway in gateways.urls:
        assert policy_version(gateway) == good["version"]  # the last good one
        added = httpx.post(f"{gateway}/rpc/calc/add", json={"a": 1, "b": 2}, headers=admin)
        assert added.status_code == 200, added.text
    gateways.put_policy(admin["Authorization"][7:], limits=[])  # the admin API still works


def test_policy_data_set_by_hand_gets_an_answer_not_a_500(gateways: Gateways) -> None:
    """A stored document that is not JSON is 422 on reading (a PUT repairs it); a stored
    version that is no integer is 503 `policy_unreadable` for every PUT, and the
    gateways keep the last good policy, saying so once, without a traceback."""
    admin = bearer(gateways.admin_token())
    url = f"{gateways.url}/admin/policy"
    good = gateways.put_policy(admin["Authorization"][7:], limits=[])
    r = redis.Redis.from_url(gateways.redis_url)
    r.set("sb:{policy}:doc", "garbage{")
    got = httpx.get(url, headers=admin)
    assert got.status_code == 422, got.text
    assert got.json()["error"]["code"] == "policy_invalid"
    assert got.json()["error"]["details"][0]["loc"] == "(document)"
    good = gateways.put_policy(admin["Authorization"][7:], limits=[])  # repairs it

    r.set("sb:{policy}:version", "abc")
    try:
        put = httpx.put(url, json={"limits": []}, headers=admin)
        assert put.status_code == 503, put.text
        assert put.json()["error"] == {
            "code": "policy_unreadable",
            "message": "the stored policy version is not an integer ('abc'): "
            "repair sb:{policy}:version in Redis",
        }
        assert httpx.get(url, headers=admin).json() == good  # nothing written
        r.xadd("sb:{policy}:audit", {"version": "x", "at": "y"})
        history = httpx.get(f"{url}/history", headers=admin)
        assert history.status_code == 200, history.text
        assert history.json()["changes"][0]["version"] is None
        assert history.json()["changes"][1]["version"] == good["version"]

        def refusals(proc: ServiceProcess) -> list[str]:
            return [line for line in proc.log_path.read_text(errors="replace").splitlines()
                    if '"msg": "stored policy is invalid' in line
                    and "policy version is not an integer" in line]  # fmt: skip

        wait_for(lambda: all(refusals(proc) for proc in gateways.procs[:2]), timeout=5)
        for gateway in gateways.urls:
            assert policy_version(gateway) == good["version"]  # the last good one
        for proc in gateways.procs[:2]:
            assert len(refusals(proc)) == 1  # said once
            assert "Traceback" not in proc.log_path.read_text(errors="replace")
    finally:
        r.set("sb:{policy}:version", good["version"])
    gateways.put_policy(admin["Authorization"][7:], limits=[])  # the admin API works again

    r.delete("sb:{policy}:doc")
    r.rpush("sb:{policy}:doc", "set by hand")  # a key of another Redis type
    try:
        put = httpx.put(url, json={"limits": []}, headers=admin)
        assert put.status_code == 503, put.text
        assert put.json()["error"] == {
            "code": "policy_unreadable",
            "message": "sb:{policy}:doc holds another Redis type than the policy store "
            "writes: repair or delete it in Redis",
        }
    finally:
        r.delete("sb:{policy}:doc")
    gateways.put_policy(admin["Authorization"][7:], limits=[])


# -- live policy under load ----------------------------------------------------------


def test_weight_change_applies_on_both_gateways_under_load(gateways: Gateways) -> None:
    """v1 takes all traffic, then the admin moves it to v2: both gateways follow
    within a second, and no request fails meanwhile."""
    admin = gateways.admin_token()
    service = f"canary{uuid.uuid4().hex[:6]}"
    registrar = issue_api_key(gateways.redis_url, ["registry"], user_id="backends")
    backends = []
    for version in ("v1", "v2"):
        name = f"{service}-{version}"
        backends.append(http_instance(gateways.url, registrar, service, name, VERSION=version))
    try:
        gateways.put_policy(admin, services={service: {"version_weights": {"v1": 100, "v2": 0}}})

        def routable(url: str) -> bool:
            r = httpx.get(f"{url}/svc/{service}/echo", headers=bearer(admin), timeout=5)
            return r.status_code == 200

        wait_for(lambda: all(routable(u) for u in gateways.urls), timeout=30)
        seen = asyncio.run(_load_while_switching(gateways, service, admin))
    finally:
        for proc in backends:
            proc.stop()
    failed = [s for *_rest, s in seen if s != 200]
    assert failed == []
    for url in gateways.urls:
        mine = [(t, instance) for u, t, instance, _s in seen if u == url]
        assert mine[0][1] == f"{service}-v1"  # before the change
        last_v1 = max(t for t, instance in mine if instance == f"{service}-v1")
        after = [instance for t, instance in mine if t > last_v1]
        assert len(after) > 20 and set(after) == {f"{service}-v2"}
        print(f"{url}: last v1 answer {last_v1:.3f} s after the change was accepted")
        assert last_v1 < 1.0  # applied within a second of the admin API's answer


async def _load_while_switching(
    gateways: Gateways, service: str, admin: str
) -> list[tuple[str, float, str, int]]:
    """(gateway, seconds since the change, instance, status) of every request."""
    seen: list[tuple[str, float, str, int]] = []
    changed_at: list[float] = []
    stop = asyncio.Event()

    async def load(client: httpx.AsyncClient, url: str) -> None:
        while not stop.is_set():
            r = await client.get(f"{url}/svc/{service}/echo")
            since = time.monotonic() - changed_at[0] if changed_at else -1.0
            instance = r.json().get("instance", "?") if r.status_code == 200 else "?"
            seen.append((url, since, instance, r.status_code))

    async with httpx.AsyncClient(timeout=10, headers=bearer(admin)) as client:
        workers = [asyncio.create_task(load(client, url))
                   for url in gateways.urls for _ in range(4)]  # fmt: skip
        await asyncio.sleep(0.5)
        document = {"services": {service: {"version_weights": {"v1": 0, "v2": 100}}}}
        current = (await client.get(f"{gateways.url}/admin/policy")).json()
        r = await client.put(f"{gateways.url}/admin/policy", json={**current, **document})
        assert r.status_code == 200, r.text
        changed_at.append(time.monotonic())
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*workers)
    return seen
