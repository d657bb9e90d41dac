"""The admin API (scope `admin`): the live policy, users, revocation, signing keys,
login throttles, and the proxy's counters (`GET /admin/proxy/stats`).

Policy: `GET /admin/policy` is the stored document; `PATCH /admin/policy`
changes part of it with a JSON merge patch (RFC 7396: `{"services": {"nlp":
{"strategy": "hash"}}}` changes that one field, `null` removes a member, a list
is replaced whole); `PUT /admin/policy` replaces it whole, and refuses (422) a
document that leaves out a section (`services`, `routes`, `limits`) the stored
policy has entries in, rather than removing them silently: `"limits": []` says
so (`common.policy.sections`). The new document is validated first; if it is
invalid the answer is 422 with every reason and the running policy stays. Send
the version you edited as `If-Match: <version>` (or `?expected_version=`): if
someone changed the policy since, the answer is 409 and nothing is written (a
PATCH without it is applied to whatever version is current, atomically); a value
that is no version (`abc`, `-1`) is 422 `invalid_params`. Every change is
versioned and audited (who, when, which paths changed) and every gateway applies
it within a second. `POST /admin/policy/validate` checks a document without
storing it, with `warnings` for the sections it leaves out. A route to a service
RPC workers serve is accepted with a warning (it answers 404 `rpc_service` while
they do): in `warnings` of the validate answer, and of a PUT or PATCH answer (the
stored document), which has the key only when there is one. `GET
/admin/policy/versions/<n>` of a version the history does not keep is 404.

Data set by hand in Redis gets an answer, not a 500: a stored document that is
not a valid policy (or not JSON) makes `GET /admin/policy` a 422 `policy_invalid`
(a `PUT` replaces it); a stored version that is not an integer makes reads of
the version and every `PUT` a 503 `policy_unreadable` until it is repaired in
Redis, and so does a policy key of another Redis type (for the reads of that
key: the history, the audit log); an audit entry's unreadable field is null in
the history. The gateways keep applying the last good policy meanwhile
(`common.policy.watcher`).
"""

from __future__ import annotations

import re
from typing import Any

from sanic import Blueprint, HTTPResponse

from common.compiled import c_modules_in_use, hot_path_state
from common.credentials import Principal
from common.errors import NotFound, quoted
from common.policy import PolicyDocument, PolicyStore, validate_document
from common.policy.sections import omission_warnings
from common.policy.store import HISTORY_KEEP
from webapi.access import ADMIN, call_rpc
from webapi.context import GatewayRequest
from webapi.errors import InvalidQuery, MalformedJson
from webapi.requests import json_object
from webapi.responses import json_response

bp = Blueprint("admin", url_prefix="/admin")


def _store(request: GatewayRequest) -> PolicyStore:
    return PolicyStore(request.app.ctx.redis)


def _actor(request: GatewayRequest) -> str:
    principal: Principal = request.ctx.principal
    if principal.key_id:
        return f"api_key:{principal.key_id} ({principal.name}, user {principal.subject})"
    return f"user:{principal.subject} ({principal.name})"


# ASCII digits only: int() also reads "1_0" (10) and other scripts' digits ("\u0661" is 1).
_INTEGER = re.compile(r"-?[0-9]{1,18}")


def _int_arg(name: str, value: str | None) -> int | None:
    if value is None or value == "":
        return None
    text = value.strip().strip('"')  # If-Match may quote it, as an entity tag
    if not _INTEGER.fullmatch(text):
        raise InvalidQuery(f"{name} must be an integer (ASCII digits, at most 18)")
    return int(text)


# RFC 5789 §3.1: the patch format PATCH /admin/policy takes, announced on GET.
_ACCEPT_PATCH = {"Accept-Patch": "application/merge-patch+json"}


def _expected_version(request: GatewayRequest) -> int | None:
    expected = _version_arg("If-Match", request.headers.get("if-match"))
    if expected is None:
        expected = _version_arg("expected_version", request.args.get("expected_version"))
    return expected


def _version_arg(name: str, value: str | None) -> int | None:
    """A policy version the client names (If-Match, `expected_version`): 422 for one
    that is not a version at all, `abc` and `-1` alike (a negative one used to be a
    409 "the policy is at version N, not -1", as if it could have matched)."""
    try:
        version = _int_arg(name, value)
    except InvalidQuery:
        version = -1
    if version is not None and version < 0:
        raise InvalidQuery(f"{name} must be an integer, a policy version (0 or more, in ASCII "
                           f"digits, at most 18): {quoted(value)} is not one")  # fmt: skip
    return version


@bp.get("/policy", ctx_access=ADMIN)
async def get_policy(request: GatewayRequest) -> HTTPResponse:
    document = await _store(request).get()
    return json_response(document.model_dump(mode="json"), headers=_ACCEPT_PATCH)


@bp.put("/policy", ctx_access=ADMIN)
async def put_policy(request: GatewayRequest) -> HTTPResponse:
    body = json_object(request, empty_ok=False)
    document = await _store(request).put(body, actor=_actor(request),
                                         expected_version=_expected_version(request))  # fmt: skip
    return _written(request, document)


@bp.patch("/policy", ctx_access=ADMIN)
async def patch_policy(request: GatewayRequest) -> HTTPResponse:
    """A JSON merge patch (RFC 7396) of the stored document (module docstring)."""
    body = json_object(request, empty_ok=False)
    document = await _store(request).patch(body, actor=_actor(request),
                                           expected_version=_expected_version(request))  # fmt: skip
    return _written(request, document)


def _written(request: GatewayRequest, document: PolicyDocument) -> HTTPResponse:
    """The answer of a write: the document stored, with `warnings` when it has any (only
    then: the answer of a write without them stays the document, as `GET` gives it)."""
    answer = document.model_dump(mode="json")
    if warnings := _route_warnings(request, document):
        answer["warnings"] = warnings
    return json_response(answer)


def _route_warnings(request: GatewayRequest, document: PolicyDocument) -> list[str]:
    """A warning for each route to a service RPC workers serve (the catalog names it, or
    a live instance is an RPC worker): it answers 404 `rpc_service`, since no HTTP
    instance may join an RPC service (`webapi.heartbeats`). A warning, not a refusal:
    the service may be retired from RPC and come back as an HTTP one."""
    view = request.app.ctx.view
    return [
        f"routes[{index}].service: {quoted(rule.service)} is served by RPC workers: the "
        f"route answers 404 rpc_service while it is (call it at /rpc/{rule.service}/...)"
        for index, rule in enumerate(document.routes)
        if view.is_rpc_service(rule.service)
    ]


@bp.post("/policy/validate", ctx_access=ADMIN)
async def validate_policy(request: GatewayRequest) -> HTTPResponse:
    body = json_object(request, empty_ok=False)
    document = validate_document(body)
    warnings = omission_warnings(body) + _route_warnings(request, document)
    return json_response({"valid": True, "document": document.model_dump(mode="json"),
                          "warnings": warnings})  # fmt: skip


@bp.get("/policy/history", ctx_access=ADMIN)
async def policy_history(request: GatewayRequest) -> HTTPResponse:
    limit = _int_arg("limit", request.args.get("limit"))
    if limit is None:
        limit = 20
    if not 1 <= limit <= 1000:
        raise InvalidQuery("limit must be between 1 and 1000")
    return json_response({"changes": await _store(request).history(limit)})


@bp.get("/policy/versions/<version:int>", ctx_access=ADMIN)
async def policy_version(request: GatewayRequest, version: int) -> HTTPResponse:
    document = await _store(request).get_version(version)
    if document is None:  # (any integer the path names: -1 and 10**20 too)
        raise NotFound(f"policy version {version} is not in the history (it keeps the "
                           f"last {HISTORY_KEEP})")  # fmt: skip
    return json_response(document.model_dump(mode="json"))


async def _auth(request: GatewayRequest, method: str, **kwargs: Any) -> Any:
    return await call_rpc(request, f"auth.{method}", kwargs)


@bp.get("/users", ctx_access=ADMIN)
async def list_users(request: GatewayRequest) -> HTTPResponse:
    return json_response({"users": await _auth(request, "list_users")})


@bp.put("/users/<user_id:str>/roles", ctx_access=ADMIN)
async def set_roles(request: GatewayRequest, user_id: str) -> HTTPResponse:
    body = json_object(request, empty_ok=False)
    return json_response(
        await _auth(request, "set_roles", user_id=user_id, roles=body.get("roles"))
    )


@bp.put("/users/<user_id:str>/scopes", ctx_access=ADMIN)
async def set_scopes(request: GatewayRequest, user_id: str) -> HTTPResponse:
    body = json_object(request, empty_ok=False)
    return json_response(
        await _auth(request, "set_scopes", user_id=user_id, scopes=body.get("scopes"))
    )


@bp.post("/revoke", ctx_access=ADMIN)
async def revoke(request: GatewayRequest) -> HTTPResponse:
    """`{"kind": "session" | "token" | "key" | "user", "id": ...}`: revoked everywhere at once."""
    body = json_object(request, empty_ok=False)
    if not isinstance(body.get("kind"), str) or not isinstance(body.get("id"), str):
        raise MalformedJson('"kind" and "id" (strings) are required')
    return json_response(await _auth(request, "revoke", kind=body["kind"], id=body["id"]))


@bp.delete("/login-failures/<username:str>", ctx_access=ADMIN)
async def clear_login_failures(request: GatewayRequest, username: str) -> HTTPResponse:
    """Lift a username's login throttle, from every address and the account's:
    `{"cleared": whether it had failures}`."""
    return json_response(await _auth(request, "clear_login_failures", username=username))


@bp.post("/signing-keys/rotate", ctx_access=ADMIN)
async def rotate_signing_key(request: GatewayRequest) -> HTTPResponse:
    """A new signing key; tokens signed by the old one stay valid until they expire."""
    return json_response(await _auth(request, "rotate_signing_key"))


@bp.get("/proxy/stats", ctx_access=ADMIN)
async def proxy_stats(request: GatewayRequest) -> HTTPResponse:
    """This process's fast-path counters (`webapi.fastpath`), whether its hot path runs
    compiled (`common.compiled`) and which C modules it calls, its upstream pool and the
    retry budget of each service (`common.balancing.RetryBudget.state`)."""
    ctx = request.app.ctx
    fast = ctx.fast_path
    hot_path = hot_path_state()
    return json_response(
        {
            "fast_path": {
                "enabled": ctx.settings.proxy_fast_path,
                "answered": fast.answered,
                "direct": fast.direct,
                "handed_over": fast.handed_over,
            },
            "passthrough": {
                "connections": ctx.passthrough.connections,
                "tunnels": ctx.passthrough.tunnels,
                "requests": ctx.passthrough.requests,
                "connect_failures": ctx.passthrough.connect_failures,
            },
            "hot_path": {
                "compiled": hot_path.used,
                "state": hot_path.reason,
                "c_modules": list(c_modules_in_use()),  # (none with `SWITCHBOARD_C=0`)
            },
            "upstreams": ctx.proxy.pool.stats(),
            "retry_budgets": {
                service: budget.state()
                for service, budget in ctx.proxy.policy.retry_budgets().items()
            },
        }
    )
