"""Scopes: the grammar and what reaches what (`common.scopes`)."""

from __future__ import annotations

import pytest

from common import Service
from common.errors import ConfigError
from common.scaffold import ScaffoldError, check_name
from common.scopes import (
    ADMIN,
    REGISTRY,
    RESERVED_SERVICES,
    allows,
    channel_resource,
    covers,
    parse,
    rpc_resource,
    valid_scope,
)
from webapi.errors import InvalidHeartbeat
from webapi.heartbeats import parse_heartbeat

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    "scope",
    ["*", "admin", "registry", "iptv", "iptv.*", "iptv.list_channels", "a", "nlp-v2.run", "x" * 63],
)
def test_valid_scopes(scope: str) -> None:
    assert valid_scope(scope)


@pytest.mark.parametrize(
    "scope",
    ["", " ", "**", "IPTV", "1svc", "iptv.", ".m", "iptv.m.x", "iptv.M", "iptv.*.*", "x" * 64,
     "admin.*", "admin.users", "registry.*", "registry.heartbeat", "*.m", "svc m", "svc\n",
     "svc:m", "é"],
)  # fmt: skip
def test_invalid_scopes(scope: str) -> None:
    assert not valid_scope(scope)


@pytest.mark.parametrize(
    ("scopes", "service", "method", "expected"),
    [
        ({"*"}, "iptv", "list_channels", True),
        ({"*"}, "iptv", None, True),
        ({"*"}, "admin", None, False),  # "*" is everything but the admin API
        ({"*"}, "admin", "policy", False),
        ({"admin"}, "admin", None, True),
        ({"admin"}, "admin", "auth.revoke", True),
        ({"admin"}, "iptv", "list_channels", False),  # admin is only the admin API
        # ... and the registry, which "*" (every user's by default) does not reach
        ({"*"}, "registry", "heartbeat", False),
        ({"*"}, "registry", None, False),
        ({"registry"}, "registry", "heartbeat", True),
        ({"admin"}, "registry", "heartbeat", True),
        ({"registry"}, "admin", None, False),
        ({"registry"}, "iptv", None, False),
        ({"registry.*", "registry.heartbeat"}, "registry", "heartbeat", False),  # look-alikes
        ({"iptv"}, "iptv", "list_channels", True),
        ({"iptv"}, "iptv", None, True),
        ({"iptv.*"}, "iptv", "search", True),
        ({"iptv.*"}, "iptv", None, True),
        ({"iptv"}, "nlp", "run", False),
        ({"iptv.search"}, "iptv", "search", True),
        ({"iptv.search"}, "iptv", "list_channels", False),
        ({"iptv.search"}, "iptv", None, False),  # a method scope never reaches the whole service
        ({"iptv.search", "nlp"}, "nlp", None, True),
        (set(), "iptv", "search", False),
        (set(), "admin", None, False),
    ],
)
def test_allows(scopes: set[str], service: str, method: str | None, expected: bool) -> None:
    assert allows(frozenset(scopes), service, method) is expected


@pytest.mark.parametrize(
    ("channel", "resource"),
    [
        ("iptv:now:7", ("iptv", None)),  # the first segment names the service
        ("iptv", ("iptv", None)),  # no colon: the whole name
        ("nlp-v2:a:b", ("nlp-v2", None)),
        ("admin:x", ("admin", None)),
        ("auth:x", ("admin", None)),  # an internal service, as on /svc/auth/
        ("IPTV:now:7", ("*", None)),  # not a service name: only "*" reaches it
        ("a.b:x", ("*", None)),
        ("9x", ("*", None)),
        (":x", ("*", None)),
    ],
)
def test_channel_resource(channel: str, resource: tuple[str, None]) -> None:
    assert channel_resource(channel) == resource


@pytest.mark.parametrize(
    ("scopes", "channel", "expected"),
    [
        ({"*"}, "iptv:now:7", True),
        ({"iptv"}, "iptv:now:7", True),
        ({"iptv.*"}, "iptv:now:7", True),
        ({"iptv.get_channel"}, "iptv:now:7", False),
        ({"iptv"}, "billing:x", False),
        ({"*"}, "admin:x", False),
        ({"admin"}, "admin:x", True),
        ({"*"}, "registry:x", False),
        ({"*"}, "auth:x", False),
        ({"auth"}, "auth:x", False),
        ({"*"}, "IPTV:x", True),
        ({"a.b"}, "a.b:x", False),  # a method scope never reaches a channel
        ({"admin"}, "a.b:x", False),
    ],
)
def test_who_reaches_a_channel(scopes: set[str], channel: str, expected: bool) -> None:
    assert allows(frozenset(scopes), *channel_resource(channel)) is expected


@pytest.mark.parametrize(
    ("granted", "scope", "expected"),
    [
        ({"*"}, "*", True),
        ({"*"}, "iptv", True),
        ({"*"}, "iptv.search", True),
        ({"*"}, "admin", False),
        ({"*", "admin"}, "admin", True),
        ({"*"}, "registry", False),  # a user cannot give a key what `*` lacks
        ({"registry"}, "registry", True),
        ({"*", "admin"}, "registry", True),  # an admin hands out backends' keys
        ({"registry"}, "*", False),
        ({"iptv"}, "*", False),
        ({"iptv"}, "iptv.*", True),
        ({"iptv.*"}, "iptv", True),
        ({"iptv"}, "iptv.search", True),
        ({"iptv.search"}, "iptv.search", True),
        ({"iptv.search"}, "iptv", False),
        ({"iptv.search"}, "iptv.list_channels", False),
        ({"nlp"}, "iptv.search", False),
    ],
)
def test_covers_is_the_subset_rule(granted: set[str], scope: str, expected: bool) -> None:
    assert covers(frozenset(granted), scope) is expected


def test_parse() -> None:
    assert parse("iptv  nlp.run\tadmin") == frozenset({"iptv", "nlp.run", ADMIN})
    assert parse("") == frozenset()
    assert parse(["a", "", "b"]) == frozenset({"a", "b"})


def test_a_generic_rpc_entry_opens_internal_services_to_admin_only() -> None:
    assert rpc_resource("auth", "set_roles") == ("admin", "auth.set_roles")
    assert rpc_resource("auth", None) == ("admin", "auth")  # (`/svc/auth/...`)
    assert rpc_resource("calc", "add") == ("calc", "add")
    assert rpc_resource("calc", None) == ("calc", None)
    assert not allows({"*", "auth"}, *rpc_resource("auth", "set_roles"))
    assert allows({"admin"}, *rpc_resource("auth", "set_roles"))


@pytest.mark.parametrize("name", sorted(RESERVED_SERVICES))
def test_a_new_service_cannot_take_a_name_the_gateway_reserves(name: str) -> None:
    """Not from the scaffold, nor as an HTTP backend (in either heartbeat form)."""
    with pytest.raises(ScaffoldError, match="reserved"):
        check_name(name)
    with pytest.raises(InvalidHeartbeat, match="reserved"):
        parse_heartbeat({"service": name, "address": "127.0.0.1:80"})
    with pytest.raises(InvalidHeartbeat, match="reserved"):
        parse_heartbeat({"params": {"data": [{"servicename": f"{name}_v2", "addrip": "h:80"}]}})


@pytest.mark.parametrize("name", [ADMIN, REGISTRY])
def test_no_worker_takes_a_privileged_scopes_name(name: str) -> None:
    with pytest.raises(ConfigError, match="reserved"):
        Service(name)
