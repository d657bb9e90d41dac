"""Tunnel routes: a pass-through route whose connection, once its first request has
been checked, belongs to the upstream instance: both ways, bytes are relayed unread.

A pass-through route with `"tunnel": true` as well (`webapi.passthrough` for what
they share: public, the prefix kept, the instance chosen per connection, connect
failures retried) is spliced like any pass-through route, but nothing after the
first request line is read (only the end of the first request's head is looked
for: below). Every later request of the connection reaches the
same instance whatever its path, method or framing, as behind nginx's `stream`
module or HAProxy's `mode tcp`: the route's prefix then says where a connection
starts, not which requests the instance may be sent. Use it only for a service that
is public as a whole (static files, a public site); anything else is a normal or a
checked pass-through route.

Why: the checked splice frames every request and response with httptools and checks
each path, a few µs per request; in `make bench-proxy` that is most of what stands
between it and nginx's throughput (bench/README.md has the figures). The tunnel does
none of it.

What it gives up, as a TCP proxy does:

* requests are not counted (`GET /admin/proxy/stats` counts tunnels, not requests);
* it cannot tell when a request is answered: the connection's idle timeout is
  Sanic's response timeout (silence both ways), not the keep-alive timeout;
* the first request's head is relayed as it comes (the instance gets its bytes
  at once), and must end within `REQUEST_HEAD_TIMEOUT` of the tunnel's start, as a
  head on Sanic's path or one a checked splice holds must (`common.strict_http`): a
  client trickling it, a byte now and then (each restarted the idle timeout), held
  both connections for good. Past it, both close, with a 408 when nothing of the
  instance's has reached the client yet (it has no whole request to answer); else
  with no answer (only the close can tell the client). What follows the head (a
  body, an upgraded WebSocket, later requests) is relayed unbounded by it;
* the instance closing its side closes the client's (a response may have been cut,
  and nothing else can tell the client);
* at shutdown, reading from the client stops, and the tunnel closes once every byte
  the client sent has had some answer and the instance has then been silent for
  `QUIET_CLOSE` seconds (or at Sanic's graceful shutdown timeout).

Hot path: `Tunnel.from_client` and `Tunnel.from_upstream`.
"""

from __future__ import annotations

import asyncio
import re
from time import monotonic
from typing import TYPE_CHECKING

from common.http_head import MAX_HEAD
from webapi.splice import Owner, SpliceBase, UpstreamLeg

if TYPE_CHECKING:
    from webapi.context import PassThroughStats
    from webapi.proxy.attempts import Attempts

# At shutdown: how long the instance must have been silent before the tunnel closes.
QUIET_CLOSE = 0.5
# The end of a head: its empty last line, after a CRLF or a bare LF (which an instance
# may take for one: the deadline is met once the instance may have a whole head).
_HEAD_END = re.compile(rb"\n\r?\n")


class Tunnel(SpliceBase):
    """One client connection spliced to one upstream connection, unread (module docstring)."""

    __slots__ = ("answered", "attempts", "awaiting", "ending", "head_began", "head_tail",
                 "loop", "opening", "owner", "quiet", "upstream")  # fmt: skip

    def __init__(
        self,
        owner: Owner,
        upstream: UpstreamLeg,
        attempts: Attempts,
        stats: PassThroughStats,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.owner = owner
        self.loop = loop  # (Sanic's shutdown calls `end_after_answers` outside the loop)
        self.upstream = upstream
        self.attempts = attempts  # the instance was chosen by it (`connect`)
        self.awaiting = False  # the client's last bytes have had no answer yet
        self.ending = False  # shutting down: close once quiet
        self.quiet: asyncio.TimerHandle | None = None
        self.answered = False  # some of the instance's bytes have been written to the client
        # When the first request's head began to be relayed (`time.monotonic`); 0: it has
        # ended (module docstring). Its last two bytes so far: an end split across reads.
        self.head_began = monotonic()
        self.head_tail = b""
        # The first request's start, its request line (for the 408 a stalled head gets).
        self.opening = b""
        upstream.splice = self
        stats.connections += 1
        stats.tunnels += 1

    @property
    def outstanding(self) -> bool:
        """Always: a tunnel cannot tell that the connection is between requests."""
        return True

    def from_client(self, data: bytes) -> bool:
        """Relay `data`; True: every read is activity (nothing is read to tell). Hot path."""
        if self.head_began:  # (the first request's head has not ended: rarely past one read)
            self._first_head(data)
        self.awaiting = True
        self.upstream.transport.write(data)  # type: ignore[union-attr]
        return True

    def _first_head(self, data: bytes) -> None:
        """Look for the end of the first request's head in `data`, its next bytes."""
        seen = self.head_tail + data
        if _HEAD_END.search(seen) is not None:
            self.head_began = 0.0
            self.head_tail = self.opening = b""
            return
        self.head_tail = seen[-2:]
        if not self.opening:
            self.opening = data[:MAX_HEAD]

    def head_timed_out(self) -> bytes | None:
        """The first request's head has not ended in time (`head_overdue`): the tunnel
        closes. The request's start, for the 408 that answers it; None when the instance
        has written to the client already: then the client's connection closes too, with
        no answer (module docstring)."""
        if self.answered:
            self.upstream_gone()
            return None
        opening = self.opening
        self.close()
        return opening

    def from_upstream(self, data: bytes) -> None:
        """Hot path."""
        self.awaiting = False
        self.answered = True
        owner = self.owner
        client = owner.transport
        if client is not None:
            client.write(data)
        owner.touch()
        if self.ending:
            self._close_when_quiet()

    def end_after_answers(self) -> None:
        """Shutdown: read nothing more from the client; close once quiet (module docstring)."""
        self.ending = True
        client = self.owner.transport
        if client is not None:
            client.pause_reading()
        self._close_when_quiet()

    def _close_when_quiet(self) -> None:
        if self.quiet is not None:
            self.quiet.cancel()
        self.quiet = self.loop.call_later(QUIET_CLOSE, self._quiet_for_long)

    def _quiet_for_long(self) -> None:
        self.quiet = None
        if self.awaiting:  # a request not answered yet: wait for its answer
            return
        self.upstream_gone()

    def upstream_gone(self) -> None:
        """The instance closed (or the tunnel is done): the client's connection closes."""
        if self._detach():
            self.owner.passthrough_ended(b"", True)

    def _detach(self) -> bool:
        if self.quiet is not None:
            self.quiet.cancel()
            self.quiet = None
        return super()._detach()

    def resume_client(self) -> None:
        client = self.owner.transport
        if client is not None and not self.ending:
            client.resume_reading()
