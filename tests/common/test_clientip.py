"""`client_ip`: X-Forwarded-For believed only from trusted proxies; `parse_networks`."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from common.clientip import client_ip, parse_networks
from common.errors import ConfigError

TRUSTED = parse_networks("10.0.0.0/8, 192.168.1.1 fd00::/8")


def test_no_trusted_proxies_ignores_a_spoofed_header() -> None:
    assert client_ip("203.0.113.7", "1.2.3.4", ()) == "203.0.113.7"
    assert client_ip("203.0.113.7", None, ()) == "203.0.113.7"


def test_untrusted_peer_ignores_the_header() -> None:
    assert client_ip("203.0.113.7", "1.2.3.4, 10.0.0.1", TRUSTED) == "203.0.113.7"


def test_trusted_peer_without_header_is_the_client() -> None:
    assert client_ip("10.0.0.1", None, TRUSTED) == "10.0.0.1"
    assert client_ip("10.0.0.1", "", TRUSTED) == "10.0.0.1"


def test_trusted_peer_gives_the_rightmost_untrusted_hop() -> None:
    # The client wrote "1.2.3.4" itself; the proxy appended the real address.
    assert client_ip("10.0.0.1", "1.2.3.4, 198.51.100.9", TRUSTED) == "198.51.100.9"


def test_chain_of_trusted_proxies_is_skipped() -> None:
    header = "6.6.6.6, 198.51.100.9, 192.168.1.1, 10.1.2.3"
    assert client_ip("10.0.0.1", header, TRUSTED) == "198.51.100.9"
    # Several X-Forwarded-For headers, joined with "," by the caller.
    assert client_ip("10.0.0.1", "198.51.100.9,10.9.9.9", TRUSTED) == "198.51.100.9"


def test_all_hops_trusted_gives_the_leftmost() -> None:
    assert client_ip("10.0.0.1", "10.0.0.5, 192.168.1.1", TRUSTED) == "10.0.0.5"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("1.2.3.4, garbage", "10.0.0.1"),  # the first hop is bad: the peer is the answer
        ("1.2.3.4, unknown, 10.0.0.7", "10.0.0.7"),  # stop at the bad entry, last good hop
        ("1.2.3.4, , 10.0.0.7", "10.0.0.7"),  # an empty entry is malformed too
        ("1.2.3.4, 300.1.1.1", "10.0.0.1"),
        ("1.2.3.4, 5.6.7.8:abc", "10.0.0.1"),
        ("1.2.3.4, [::1", "10.0.0.1"),
        ("1.2.3.4, [::1]x", "10.0.0.1"),
    ],
)
def test_garbage_stops_the_walk(header: str, expected: str) -> None:
    assert client_ip("10.0.0.1", header, TRUSTED) == expected


def test_entries_with_ports() -> None:
    assert client_ip("10.0.0.1", "198.51.100.9:5678", TRUSTED) == "198.51.100.9"
    assert client_ip("10.0.0.1", "[2001:db8::1]:80", TRUSTED) == "2001:db8::1"
    assert client_ip("10.0.0.1", "[2001:db8::1]", TRUSTED) == "2001:db8::1"
    assert client_ip("10.0.0.1", "198.51.100.9, 10.0.0.2:443", TRUSTED) == "198.51.100.9"


def test_ipv6() -> None:
    assert client_ip("fd00::1", "2001:db8::1, fd12::9", TRUSTED) == "2001:db8::1"
    assert client_ip("2001:db8::2", "2001:db8::1", TRUSTED) == "2001:db8::2"
    # Normalised text, so one client is one rate-limit key.
    assert client_ip("fd00::1", "2001:DB8:0:0::1", TRUSTED) == "2001:db8::1"
    # Mixed versions in one chain.
    assert client_ip("fd00::1", "198.51.100.9, 10.0.0.3", TRUSTED) == "198.51.100.9"


def test_ipv4_mapped_peer_counts_as_ipv4() -> None:
    assert client_ip("::ffff:10.0.0.1", "198.51.100.9", TRUSTED) == "198.51.100.9"
    assert client_ip("::ffff:203.0.113.7", "198.51.100.9", TRUSTED) == "203.0.113.7"


def test_peer_that_is_not_an_address_is_returned_as_is() -> None:
    assert client_ip("unix-socket", "1.2.3.4", TRUSTED) == "unix-socket"
    assert client_ip("", "1.2.3.4", TRUSTED) == ""


def test_parse_networks() -> None:
    assert parse_networks("") == ()
    assert parse_networks("  ") == ()
    assert parse_networks("10.0.0.0/8,192.168.1.1 ,\n::1, fd00::/8") == (
        ip_network("10.0.0.0/8"),
        ip_network("192.168.1.1/32"),
        ip_network("::1/128"),
        ip_network("fd00::/8"),
    )


@pytest.mark.parametrize("text", ["10.0.0.0/33", "localhost", "10.0.0.1/8", "1.2.3.4:80", "::g"])
def test_parse_networks_rejects_bad_entries(text: str) -> None:
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        parse_networks(f"10.0.0.0/8, {text}")
