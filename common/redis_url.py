"""REDIS_URL's check and its redaction.

`REDIS_URL` must be a URL redis-py reads as written (`check_redis_url`), and an
error or a message quotes it only through `redacted_url`, never with its
credentials. `common.settings` checks the setting with it at start-up;
`common.dev_redis` the URL it hands to `make run`'s processes.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from redis.connection import parse_url

from common.errors import ConfigError

_REDIS_SCHEMES = ("redis", "rediss", "unix")
# The path of a redis:// URL as redis-py reads it: the database number, or nothing.
_DB_PATH = re.compile(r"/?\d*/?")


def check_redis_url(url: str) -> None:
    """`ConfigError` naming REDIS_URL unless redis-py reads `url` as written.

    redis-py refuses some URLs with a message quoting part of the password (an
    unencoded `/`, `#` or `?` in it ends the host part early) and silently misreads
    others (`redis://:pa/55@host` is localhost, port 0...): both are refused here,
    quoting the URL with its credentials and query replaced by `***`.
    """
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in _REDIS_SCHEMES:
        raise ConfigError(
            f"REDIS_URL={redacted_url(url)} is not valid: it must start with redis://, "
            "rediss:// (TLS) or unix:// (a socket path)"
        )
    options: dict[str, Any] = {}
    try:
        options = parse_url(url)  # type: ignore[no-untyped-call]
        # redis-py ignores a path that is not a database number: read as written,
        # a Redis URL has none but a number (or an unencoded '/' in the password).
        path = urlsplit(url).path
        misread = scheme != "unix" and "db" not in options and not _DB_PATH.fullmatch(path)
    except ValueError:
        misread = True
    if misread:
        raise ConfigError(
            f"REDIS_URL={redacted_url(url)} is not a valid Redis URL "
            "(redis://[[user]:password@]host[:port][/db]): the port and db must be numbers, "
            "and special characters (/ # ? @ : %) in a user name or password must be "
            "percent-encoded (urllib.parse.quote(password, safe=''))"
        )
    if scheme == "unix" and not options.get("path"):
        raise ConfigError("REDIS_URL=unix:// needs the socket's path: unix:///path/to/redis.sock")


def redacted_url(url: str) -> str:
    """`url` with whatever may hold a secret replaced by `***`: anything before the
    last `@` (user and password, even unencoded), and the query."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    _userinfo, at, location = rest.rpartition("@")
    location, query, _ = location.partition("?")
    return f"{scheme}{sep}{'***@' if at else ''}{location}{'?***' if query else ''}"
