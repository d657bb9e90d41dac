"""`common.forwarding`'s readings of a client's fields: its credential fields
(`credential_fault`), the gateway's marks in its `Via` fields (`via_hops`), and the
fields forwarded for it (`hop_headers_out`)."""

from __future__ import annotations

import pytest

from common.forwarding import (
    API_KEY_PREFIX,
    FORWARDED_PREFIX,
    MAX_VIA_HOPS,
    REPLACED,
    VIA,
    credential_fault,
    hop_headers_out,
    strip_hop_by_hop,
    via_hops,
    via_loop,
)


@pytest.mark.parametrize(
    ("authorization", "api_key"),
    [
        ([], []),
        (["Bearer eyJ.jwt.sig"], []),
        ([], ["sbk_key"]),
        (["Bearer sbk_key"], ["sbk_key"]),  # the same credential twice
        (["bearer  sbk_key "], [" sbk_key"]),
        (["Basic dXNlcjpwdw=="], ["sbk_key"]),  # not a bearer: the key is the credential
        (["Bearer eyJ.jwt.sig"], [" "]),  # an empty X-Api-Key: no second credential
    ],
)
def test_one_credential_is_no_fault(authorization: list[str], api_key: list[str]) -> None:
    assert credential_fault(authorization, api_key) is None


@pytest.mark.parametrize(
    ("authorization", "api_key", "said"),
    [
        (["Bearer sbk_key", "Bearer forged"], [], "more than one Authorization"),
        (["Bearer a", "Bearer a"], [], "more than one Authorization"),
        ([], ["sbk_a", "sbk_b"], "more than one X-Api-Key"),
        (["Bearer forged"], ["sbk_key"], "different credentials"),
        (["Bearer"], ["sbk_key"], "different credentials"),
    ],
)
def test_ambiguous_credential_fields_are_a_fault(
    authorization: list[str], api_key: list[str], said: str
) -> None:
    fault = credential_fault(authorization, api_key)
    assert fault is not None and said in fault


@pytest.mark.parametrize(
    ("value", "hops"),
    [
        ("", 0),
        ("1.0 edge", 0),
        (VIA, 1),
        (f"1.0 edge, {VIA},{VIA} , HTTP/1.1 switchboard (Switchboard/2)", 3),
        ("1.1 switchboardX, 1.1 switchboardX, foo switchboard", 1),
        ("1.1 xswitchboard, 1.1 switchboard.example:80, 1.1 Switchboard", 0),
        ("1.1 edge (switchboard, 1.1 switchboard, (1.1 switchboard)), 1.1 switchboard", 1),
        ("1.1 edge (a \\) 1.1 switchboard, b), 1.1 switchboard", 1),  # a quoted pair
        ("switchboard, 1.1  switchboard", 1),  # no protocol: no entry of the gateway's
    ],
)
def test_via_hops_counts_entries_received_by_the_gateway(value: str, hops: int) -> None:
    assert via_hops(value) == hops


def test_a_loop_is_max_via_hops_marks_over_every_line() -> None:
    assert not via_loop(None) and not via_loop([])
    assert not via_loop([VIA] * (MAX_VIA_HOPS - 1))
    assert via_loop([VIA] * (MAX_VIA_HOPS - 1) + [f"1.0 edge, {VIA}"])
    assert not via_loop(["1.1 switchboardX"] * (MAX_VIA_HOPS + 1))


def test_the_clients_forwarding_fields_are_dropped() -> None:
    sent = [
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("x-client-ip", "6.6.6.6"),
        ("True-Client-IP", "6.6.6.6"),
        ("X-Forwarded-Prefix", "/admin"),
        ("X-FORWARDED-PORT", "443"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded", "for=6.6.6.6"),  # (not `X-Forwarded-*`: a client's own field)
        ("X-Tenant", "acme"),
    ]
    out = hop_headers_out(sent, client_ip="10.0.0.1", scheme="http", host="gw",
                          request_id="rid", upstream="svc")  # fmt: skip
    assert out == [
        ("X-Forwarded", "for=6.6.6.6"),
        ("X-Tenant", "acme"),
        ("Host", "svc"),
        ("X-Forwarded-For", "6.6.6.6, 10.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "gw"),
        ("X-Request-Id", "rid"),
        ("Via", VIA),
    ]


def _forwarded_one_rule_at_a_time(
    headers: list[tuple[str, str]], drop: frozenset[str]
) -> list[tuple[str, str]]:
    """The client's fields `hop_headers_out` keeps, each rule applied in its own pass
    (as it was written before the passes were folded into one)."""
    kept = [(k, v) for k, v in headers
            if not (k.lower() == "x-api-key" or (k.lower() == "authorization"
                    and v[7:].lstrip().startswith(API_KEY_PREFIX)))]  # fmt: skip
    kept = [(k, v) for k, v in kept if k.lower() not in drop]
    return [
        (k, v)
        for k, v in strip_hop_by_hop(kept)
        if k.lower() not in REPLACED and not k.lower().startswith(FORWARDED_PREFIX)
    ]


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Accept", "*/*"), ("User-Agent", "curl"), ("Content-Type", "text/plain")],
        [("Authorization", "Bearer sbk_abc"), ("X-Api-Key", "sbk_abc"), ("A", "1")],
        [("authorization", "bearer   sbk_abc"), ("AUTHORIZATION", "Bearer eyJ.jwt.sig")],
        [("Authorization", "Basic dXNlcjpwdw=="), ("x-API-key", "k")],
        # `Connection` naming fields before and after it, in any case, with `close`.
        [("X-Secret", "s"), ("Connection", "X-Secret, Close"), ("x-other", "o"),
         ("connection", " X-OTHER ,keep-alive"), ("Close", "c"), ("X-Kept", "k")],
        [("Connection", "keep-alive"), ("Keep-Alive", "5"), ("TE", "trailers"),
         ("Trailer", "x"), ("Upgrade", "h2c"), ("Transfer-Encoding", "chunked"),
         ("Proxy-Authorization", "Basic eA=="), ("PROXY-Foo", "1")],
        [("X-Forwarded-For", "10.0.0.1"), ("x-forwarded-for", "10.0.0.2, 10.0.0.3"),
         ("X-Forwarded-Proto", "https"), ("X-Forwarded-Port", "443"), ("Forwarded", "for=x"),
         ("X-Real-IP", "x"), ("X-Client-IP", "x"), ("True-Client-IP", "x"), ("Host", "gw"),
         ("Content-Length", "3"), ("X-Request-Id", "theirs"), ("X-Forwarded", "kept")],
        [("Sec-WebSocket-Key", "k"), ("sec-websocket-version", "13"), ("Via", "1.1 edge")],
    ],
)  # fmt: skip
@pytest.mark.parametrize("drop", [frozenset(), frozenset({"sec-websocket-key", "x-kept"})])
def test_the_forwarded_fields_are_each_rules_in_one_pass(
    headers: list[tuple[str, str]], drop: frozenset[str]
) -> None:
    out = hop_headers_out(headers, client_ip="10.9.9.9", scheme="https", host="gw.example",
                          request_id="rid", upstream="svc", drop=drop)  # fmt: skip
    prior = [v for k, v in headers if k.lower() == "x-forwarded-for"]
    assert out == [
        *_forwarded_one_rule_at_a_time(headers, drop),
        ("Host", "svc"),
        ("X-Forwarded-For", ", ".join([*prior, "10.9.9.9"])),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "gw.example"),
        ("X-Request-Id", "rid"),
        ("Via", VIA),
    ]
