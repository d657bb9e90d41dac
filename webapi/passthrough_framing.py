"""Where requests and responses begin and end on a checked pass-through splice
(`webapi.passthrough.PassThrough`): httptools callbacks on both directions, framing
only (they see no header, so they cost a few µs a request), and where the first
requests of a read end when the splice forwards only those."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, HttpResponseParser


class Requests:
    """httptools callbacks of the client's side: where requests start and end, their paths."""

    __slots__ = ("begun", "check", "complete", "foreign", "in_head", "parser", "url")

    def __init__(self, check: Callable[[bytes], bool]) -> None:
        self.check = check  # is this URL (of a GET, POST, ...) the route's?
        self.url = b""
        self.begun = 0  # requests begun in the bytes not forwarded yet
        self.complete = 0  # requests whose last byte was read, since the splice started
        self.foreign = 0  # the index among `begun` of the first request not the route's
        self.in_head = False  # a request's head is being read
        self.parser = HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.begun += 1
        self.url = b""
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.in_head = False
        if not self.foreign and not self.check(self.url):
            self.foreign = self.begun

    def on_chunk_header(self) -> None:
        # HTTP/1.0 has no transfer codings (RFC 9112 §6.1): an instance may take this
        # body for requests, none of them checked. (Only chunked bodies pay this.)
        if not self.foreign and self.parser.get_http_version() == "1.0":
            self.foreign = max(self.begun, 1)

    def on_message_complete(self) -> None:
        self.complete += 1


class _Ends:
    """httptools callbacks counting the requests that end."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete = 0

    def on_message_complete(self) -> None:
        self.complete += 1


def end_of_requests(data: bytes, count: int) -> int:
    """Where the first `count` requests of `data` (which starts with a request) end.

    httptools tells no offset, so this parses prefixes of `data` afresh, halving the
    range each time: only for a read that holds a request of another route, or a head
    not whole yet, behind route requests (a pipelining client). A read that starts
    inside a request's body cannot be parsed afresh: then both connections close
    instead, that body cut (a head not whole yet: all of it is held with the head).
    """
    low, high = 0, len(data)
    while low < high:
        middle = (low + high) // 2
        ends = _Ends()
        # An error is in a later request: the ones before it have ended all the same.
        with contextlib.suppress(HttpParserError, HttpParserUpgrade):
            HttpRequestParser(ends).feed_data(data[:middle])
        if ends.complete >= count:
            high = middle
        else:
            low = middle + 1
    return low


class Responses:
    """httptools callbacks of the upstream's side: how many responses have ended."""

    __slots__ = ("closing", "ended", "parser")

    def __init__(self) -> None:
        self.ended = 0
        self.closing = False  # the last response ends its connection (`Connection: close`)
        self.parser = HttpResponseParser(self)

    def on_message_complete(self) -> None:
        parser = self.parser
        if not 100 <= parser.get_status_code() < 200:  # interim responses answer nothing
            self.ended += 1
            self.closing = not parser.should_keep_alive()
