"""Checks of the method rules both services share (`common.router`)."""

from __future__ import annotations

import httpx


def assert_head_answers_as_get(url: str) -> None:
    """HEAD `url` is answered as GET `url` is, without the body."""
    get = httpx.get(url, timeout=5)
    head = httpx.head(url, timeout=5)
    assert (get.status_code, head.status_code) == (200, 200)
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert int(head.headers["content-length"]) > 0
