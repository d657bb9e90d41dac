"""The live policy document: its models, its defaults and its validation.

One JSON document, kept in Redis by `PolicyStore`, says per service how traffic
is balanced and bounded (`ServicePolicy`), which extra path prefixes the gateway
routes (`RouteRule`) and which rate limits apply (`LimitRule`). Every model
forbids unknown fields and is strict about types (`"5"` is not a number here:
a policy is written by people, and a silently coerced value hides a mistake).
`validate_document` is the one entry: it answers a `PolicyDocument` or raises
`PolicyInvalid` with every reason at once, so a bad policy is never applied.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.codec import parse_json
from common.errors import BadRequest, ServiceError, quoted, shortened
from common.gcra import window_error
from common.scopes import RESERVED_SERVICES
from common.settings import MAX_BODY_LIMIT, MAX_TOTAL_TIMEOUT

if TYPE_CHECKING:
    from common.settings import Settings

# A service, limit or scope name (the scopes of issue 6 use the same rule).
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
# A version/tag, as the gateway accepts it in heartbeats.
VERSION_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
# Path segments of a route prefix: unreserved URL characters only, no "." or ".." segment.
_PREFIX = re.compile(r"^/(?:[A-Za-z0-9_~-][A-Za-z0-9._~-]*/)+$")

# Paths the gateway serves itself (design §6), each with every path under it: `/nlp`
# reserves `/nlp` and `/nlp/...`, not `/nlp-api/` (`overlaps`). A route may neither be
# under one nor cover one (the prefix "/" would swallow them all).
RESERVED_PREFIXES: tuple[str, ...] = (
    "/api/",
    "/rpc/",
    "/svc/",
    "/admin/",
    "/health",
    "/heartbeat",
    "/metrics",
    "/docs",
    "/nlp",
    "/ai_server",
    "/dashboard",
)

# Kept literal for the type checker; tests/common/test_policy.py checks it equals
# `common.balancing.STRATEGIES`.
StrategyName = Literal["round_robin", "weighted", "least_conn", "least_time", "hash", "random"]

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
NameOrAny = Annotated[str, Field(pattern=r"^(?:\*|[a-z][a-z0-9_-]{0,62})$")]  # "*": any
Version = Annotated[str, Field(pattern=VERSION_PATTERN)]
# What the `hash` strategy keys on (and the sticky version draw): a request header, a
# cookie, or the client's address (`common.balancing.sticky`).
HashOn = Annotated[
    str, Field(pattern=r"^(header:[A-Za-z0-9-]{1,64}|cookie:[A-Za-z0-9_.-]{1,64}|client_ip)$")
]

ROOT = "(document)"  # the `loc` of an error about the document as a whole

# Bounds that keep one document small enough to load on every change.
MAX_ITEMS = 1000
MAX_WEIGHT = 1_000_000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class RetryBudgetPolicy(_Model):
    """A service's retry budget (`common.balancing.RetryBudget`): retries may add
    `ratio` of the requests' load, plus `min_per_second` whatever the traffic."""

    ratio: Annotated[float, Field(ge=0, le=1)] = 0.2
    min_per_second: Annotated[float, Field(ge=0, le=1000)] = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryBudgetPolicy:
        """The default for services whose policy sets none (PROXY_RETRY_BUDGET_*)."""
        return cls(ratio=settings.proxy_retry_budget_ratio,
                   min_per_second=settings.proxy_retry_budget_min)  # fmt: skip


class ServicePolicy(_Model):
    """How requests to one service are balanced and bounded.

    `version_weights` splits the traffic of requests that name no version
    between versions (tag -> relative weight); a version left out gets none.
    `timeout` bounds the wait for the response head (shorter or longer than
    the gateway's PROXY_TIMEOUT, which still bounds each silence in the bodies),
    `total_timeout` the whole exchange, from the first try to the response's last
    byte (None: PROXY_TOTAL_TIMEOUT, whose default is no bound), `connect_timeout`
    each connect (gateway and websocket relay), `retries` the extra attempts after
    the first, `retry_budget` how many failed tries may be
    retried at all (None: the gateway's settings, PROXY_RETRY_BUDGET_*), `max_body`
    the largest request body forwarded, in bytes (None: PROXY_MAX_BODY), `hash_on`
    the key of sticky requests: `header:<name>`, `cookie:<name>` or `client_ip`
    (None: the `X-Balance-Key` header).
    """

    strategy: StrategyName = "round_robin"
    version_weights: dict[Version, Annotated[int, Field(ge=0, le=MAX_WEIGHT)]] = Field(
        default_factory=dict, max_length=MAX_ITEMS
    )
    timeout: Annotated[float, Field(gt=0, le=3600)] | None = None
    total_timeout: Annotated[float, Field(gt=0, le=MAX_TOTAL_TIMEOUT)] | None = None
    connect_timeout: Annotated[float, Field(gt=0, le=60)] | None = None
    retries: Annotated[int, Field(ge=0, le=5)] | None = None
    retry_budget: RetryBudgetPolicy | None = None
    max_body: Annotated[int, Field(gt=0, le=MAX_BODY_LIMIT)] | None = None
    hash_on: HashOn | None = None

    @field_validator("version_weights")
    @classmethod
    def _some_weight(cls, weights: dict[str, int]) -> dict[str, int]:
        if weights and not any(weights.values()):
            raise ValueError("at least one version needs a weight above 0 (or give no weights)")
        return weights


class RouteRule(_Model):
    """Requests under `prefix` go to the HTTP instances of `service`."""

    prefix: Annotated[str, Field(max_length=200)]
    service: Name
    strip_prefix: bool = True
    public: bool = False
    # Relay the connection byte for byte (`webapi.passthrough`): no credential is
    # checked and nothing is rewritten, so it must be public and keep its prefix.
    passthrough: bool = False
    # A passthrough route whose connections, after their first request, are relayed
    # unread (`webapi.tunnel`): for a service that is public as a whole.
    tunnel: bool = False

    @model_validator(mode="after")
    def _passthrough_is_plain(self) -> RouteRule:
        if self.passthrough and (not self.public or self.strip_prefix):
            raise ValueError(
                "a passthrough route forwards requests unchanged and without a credential "
                'check: it needs "public": true and "strip_prefix": false'
            )
        if self.tunnel and not self.passthrough:
            raise ValueError('a tunnel is a passthrough route: it needs "passthrough": true')
        return self

    @field_validator("service")
    @classmethod
    def _not_reserved(cls, service: str, info: ValidationInfo) -> str:
        # `admin`, `registry`, `auth` (`common.scopes.RESERVED_SERVICES`): no HTTP instance
        # may register under them (`webapi.heartbeats`), so such a route could never be
        # served; and one to `admin` reads as if it opened the admin API. Refused when
        # written; a document stored before this rule is read as it is (`validate_json`),
        # or a gateway started after an upgrade would run without the whole policy.
        if service in RESERVED_SERVICES and not (info.context or {}).get("stored"):
            names = ", ".join(sorted(RESERVED_SERVICES))
            raise ValueError(
                f"{service!r} is reserved ({names}: names the gateway gives a meaning of its "
                "own, which no HTTP instance may register under): a route to it could "
                "never be served"
            )
        return service

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError("must start and end with '/'")
        if ".." in prefix:
            raise ValueError("must not contain '..'")
        for reserved in RESERVED_PREFIXES:
            if overlaps(prefix, reserved):
                raise ValueError(f"overlaps the gateway's reserved prefix {reserved!r}")
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(
                "must be '/segment/.../' with letters, digits, '.', '_', '~' or '-' "
                "in each segment, and no empty or '.' segment"
            )
        return prefix


def overlaps(prefix: str, reserved: str) -> bool:
    """Whether route `prefix` and reserved path `reserved` share a path, segment by segment.

    A route takes its prefix's path and every path under it (`match_route`: `/a/b/`
    takes `/a/b` and `/a/b/...`); the gateway's route for `/health` takes `/health/`
    too (Sanic's slashes are not strict) and, for `/api/`, what is under it. So they
    overlap exactly when one's segments start the other's: `/health/` and `/api/v2/`
    do, `/healthz/` and `/nlp-api/` do not (a prefix test by characters would say
    they do). Sanic matches paths case-sensitively, and so does this.
    """
    ours, theirs = _segments(prefix), _segments(reserved)
    shared = min(len(ours), len(theirs))
    return ours[:shared] == theirs[:shared]


def _segments(path: str) -> list[str]:
    return [segment for segment in path.split("/") if segment]


class LimitRule(_Model):
    """A rate limit: `rate` requests per `period` seconds, `burst` back to back.

    `service`/`method` narrow it ("*": any); `key` says whose budget it counts
    against. A missing `burst` is filled with `rate` on validation.
    """

    id: Name
    service: NameOrAny = "*"
    method: NameOrAny = "*"
    key: Literal["credential", "user", "ip"] = "credential"
    rate: Annotated[int, Field(ge=1, le=1_000_000)]
    period: Annotated[float, Field(gt=0, le=86400)]
    burst: Annotated[int, Field(ge=1, le=1_000_000)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_burst(cls, data: Any) -> Any:
        rate = data.get("rate") if isinstance(data, dict) else None
        valid_rate = isinstance(rate, int) and not isinstance(rate, bool) and rate >= 1
        if valid_rate and data.get("burst") is None:  # a bad rate is reported once, as rate
            return {**data, "burst": rate}
        return data

    @model_validator(mode="after")
    def _buildable(self) -> LimitRule:
        # The gateway builds a `gcra.Limit` from each rule on its request path: a rule
        # it would refuse there must be refused here, by the same check.
        error = window_error(self.rate, self.period, self.burst or self.rate)
        if error:
            raise ValueError(f"limit {self.id!r}: {error}")
        return self


class PolicyDocument(_Model):
    """The whole live policy; `version` is set by `PolicyStore.put`, never by hand."""

    version: Annotated[int, Field(ge=0)] = 0
    services: dict[Name, ServicePolicy] = Field(default_factory=dict, max_length=MAX_ITEMS)
    routes: list[RouteRule] = Field(default_factory=list, max_length=MAX_ITEMS)
    limits: list[LimitRule] = Field(default_factory=list, max_length=MAX_ITEMS)

    @field_validator("routes")
    @classmethod
    def _unique_prefixes(cls, routes: list[RouteRule]) -> list[RouteRule]:
        _unique((r.prefix for r in routes), "route prefix", "routes")
        return routes

    @field_validator("limits")
    @classmethod
    def _unique_ids(cls, limits: list[LimitRule]) -> list[LimitRule]:
        _unique((rule.id for rule in limits), "limit id", "limits")
        return limits

    def service(self, name: str) -> ServicePolicy | None:
        """The policy of service `name`, None when the document has none."""
        return self.services.get(name)

    @cached_property
    def passthrough_prefixes(self) -> tuple[bytes, ...]:
        """What the path of a pass-through route's request starts with: each prefix without
        its last `/` (a route also takes the bare `/prefix`). A first, cheap filter; empty
        when no route is a pass-through one."""
        return tuple(r.prefix[:-1].encode() for r in self.routes if r.passthrough)

    def to_json(self) -> str:
        """The canonical stored form (compact JSON)."""
        return self.model_dump_json()


def _unique(values: Iterable[str], what: str, field: str) -> None:
    seen: dict[str, int] = {}
    for index, value in enumerate(values):
        if value in seen:
            raise ValueError(
                f"duplicate {what} {quoted(value)} ({field}[{seen[value]}] and [{index}])"
            )
        seen[value] = index


DEFAULT_POLICY = PolicyDocument(
    limits=[
        LimitRule(id="login", service="auth", method="login", key="ip", rate=30, period=60,
                  burst=10),
        LimitRule(id="register", service="auth", method="register", key="ip", rate=10, period=60,
                  burst=5),
    ]
)  # fmt: skip


class PolicyInvalid(BadRequest):
    """A policy document was rejected; `errors` lists every reason as {loc, msg}."""

    code = "policy_invalid"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        reasons = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
        super().__init__(f"invalid policy: {reasons}")
        self.errors = errors

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "details": self.errors}


class PolicyUnreadable(ServiceError):
    """The policy store holds data no writer of ours writes (set by hand, or corrupted):
    a version that is not an integer. Nothing was written; it needs repairing in Redis.
    The gateway answers it 503 (the store's fault, not the request's)."""

    code = "policy_unreadable"


def validate_document(data: object, *, stored: bool = False) -> PolicyDocument:
    """`data` (parsed JSON) as a `PolicyDocument`, or `PolicyInvalid` with every reason.
    `stored`: a document read back from the store, which rules added since it was
    written do not refuse (a route to a reserved name)."""
    if isinstance(data, PolicyDocument):
        data = data.model_dump(mode="json")
    # Duplicates are found on the raw input too, so they are reported together
    # with every other error (pydantic skips a list's own check when an item fails).
    duplicates = _duplicates(data)
    try:
        document = PolicyDocument.model_validate(data, context={"stored": stored})
    except ValidationError as exc:
        reasons = [_reason(e) for e in exc.errors()]
        if duplicates:
            reasons = [r for r in reasons if not r["msg"].startswith("duplicate ")]
        raise PolicyInvalid(reasons + duplicates) from None
    return document


def validate_json(text: str | bytes) -> PolicyDocument:
    """A stored document's JSON text as a `PolicyDocument` (`validate_document`'s
    `stored`); malformed JSON is a `PolicyInvalid` too."""
    return validate_document(policy_json(text), stored=True)


def policy_json(text: str | bytes) -> Any:
    """A JSON text, parsed but not yet validated (`PolicyStore.put` looks at what the
    document leaves out); malformed JSON is a `PolicyInvalid`."""
    try:
        return parse_json(text)
    except ValueError as exc:  # JSONDecodeError, or undecodable bytes
        raise PolicyInvalid([{"loc": ROOT, "msg": f"not valid JSON: {exc}"}]) from None


def _duplicates(data: object) -> list[dict[str, str]]:
    """A reason for each route prefix or limit id that repeats an earlier one."""
    out: list[dict[str, str]] = []
    if not isinstance(data, dict):
        return out
    for field, key, what in (("routes", "prefix", "route prefix"), ("limits", "id", "limit id")):
        items = data.get(field)
        if not isinstance(items, list):
            continue
        seen: dict[str, int] = {}
        for index, item in enumerate(items):
            value = item.get(key) if isinstance(item, dict) else None
            if not isinstance(value, str):
                continue
            if value in seen:
                msg = f"duplicate {what} {quoted(value)} (also {field}[{seen[value]}])"
                out.append({"loc": f"{field}[{index}].{key}", "msg": msg})
            else:
                seen[value] = index
    return out


def _reason(error: Any) -> dict[str, str]:
    loc = ""
    for part in error["loc"]:
        if isinstance(part, int):
            loc += f"[{part}]"
        elif part == "[key]":
            loc += " (key)"  # pydantic's marker for a bad dict key
        else:
            loc += f".{shortened(part)}" if loc else shortened(str(part))
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "model_type" and not error["loc"]:
        msg = "the policy must be a JSON object"
    return {"loc": loc or ROOT, "msg": msg}
