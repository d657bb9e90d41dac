"""`common.balancing.sticky`: the sticky key each `hash_on` source reads."""

from __future__ import annotations

import pytest

from common.balancing.sticky import balance_key, cookie_value

HEADERS = {"x-balance-key": "default-key", "x-user-id": "u-42",
           "cookie": 'theme=dark; session="s-7"; empty='}  # fmt: skip


def key(hash_on: str | None, headers: dict[str, str] = HEADERS) -> str | None:
    return balance_key(hash_on, headers.get, lambda: "10.0.0.9")


@pytest.mark.parametrize(
    ("hash_on", "expected"),
    [
        (None, "default-key"),
        ("header:X-User-Id", "u-42"),
        ("header:X-Missing", None),
        ("cookie:session", "s-7"),
        ("cookie:theme", "dark"),
        ("cookie:empty", None),
        ("cookie:absent", None),
        ("client_ip", "10.0.0.9"),
    ],
)
def test_each_source(hash_on: str | None, expected: str | None) -> None:
    assert key(hash_on) == expected


def test_no_cookie_header_and_no_address_give_no_key() -> None:
    assert key("cookie:session", {}) is None
    assert balance_key("client_ip", {}.get, lambda: "") is None
    assert cookie_value("sessionx=1; xsession=2", "session") is None


def test_an_empty_header_is_no_key() -> None:
    # Else every request with `X-Balance-Key:` would go to the one owner of "".
    empty = {"x-balance-key": "", "x-user-id": ""}
    assert key(None, empty) is None
    assert key("header:X-User-Id", empty) is None
