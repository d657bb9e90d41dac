"""`replay`: a whole simple upstream response, read in C, given to its `Connection` as
httptools' callbacks would give it (issue 4's prototype; `common.compiled.c_module`).

When the build is used (unless `SWITCHBOARD_C=0`), `Connection.data_received` hands the
first read of an exchange to `webapi.proxy._cresp.parse_response` (its C source says
what it answers and what it declines). When that read is one whole response with a
Content-Length body (or none: HEAD, 204, 304), the C returns what the callbacks would
have recorded, and `replay` makes the same state changes and `Receiver` calls, in the
same order, mostly through the methods the callbacks call: the head (`_head`, as
`on_headers_complete`), the body (`on_body`), the end (as `on_message_complete`).
`data_received` does the rest as after `feed_data` (`_finish`: the connection back to
the pool). Anything the C declines is fed to httptools as without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from httptools import HttpParserCallbackError

from common.compiled import caused

if TYPE_CHECKING:
    from webapi.proxy.connection import Connection
    from webapi.proxy.response import Receiver

# `_cresp.parse_response`'s answer: status, reason, raw headers, the Content-Length
# field's value, `should_keep_alive()`, body.
Whole = tuple[int, bytes, list[tuple[bytes, bytes]], bytes | None, bool, bytes]


def replay(conn: Connection, resp: Receiver, whole: Whole) -> None:
    """Give `whole` to `conn`'s exchange `resp` as `feed_data` would. A receiver's error
    is raised as httptools raises it (`HttpParserCallbackError`, the error as its
    context) and stops the replay, as it stops the parser. Hot path."""
    status, reason, headers, length, keep_alive, body = whole
    conn._reason = reason  # on_status
    conn._raw_headers = headers  # on_header, for each field
    conn._framed = length is not None
    conn._content_length = length
    try:  # on_headers_complete (a body over the limit fails there)
        conn._head(resp, status, keep_alive)
    except Exception as exc:  # (`caused`: `from exc`, which mypyc compiles without its `from`)
        raise caused(HttpParserCallbackError("User callback error"), exc)  # noqa: B904
    if body:
        try:
            conn.on_body(body)
        except Exception as exc:
            raise caused(HttpParserCallbackError("`on_body` callback error"), exc)  # noqa: B904
    # on_message_complete (after a HEAD's head, `_head` has ended the message)
    if conn._resp is not None and not conn._message_done and conn._parser is not None:
        conn._keep_alive = keep_alive
        conn._message_done = True
