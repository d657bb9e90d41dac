"""Tunnel routes: a pass-through route whose connection, once its first request has
been checked, belongs to the upstream instance: both ways, bytes are relayed unread.

A pass-through route with `"tunnel": true` as well (`webapi.passthrough` for what
they share: public, the prefix kept, the instance chosen per connection, connect
failures retried) is spliced like any pass-through route, but nothing after the
first request line is looked at. Every later request of the connection reaches the
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
* the instance closing its side closes the client's (a response may have been cut,
  and nothing else can tell the client);
* at shutdown, reading from the client stops, and the tunnel closes once every byte
  the client sent has had some answer and the instance has then been silent for
  `QUIET_CLOSE` seconds (or at Sanic's graceful shutdown timeout).

Hot path: `Tunnel.from_client` and `Tunnel.from_upstream`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from webapi.splice import Owner, SpliceBase, UpstreamLeg

if TYPE_CHECKING:
    from webapi.context import PassThroughStats
    from webapi.proxy.attempts import Attempts

# At shutdown: how long the instance must have been silent before the tunnel closes.
QUIET_CLOSE = 0.5


class Tunnel(SpliceBase):
    """One client connection spliced to one upstream connection, unread (module docstring)."""

    __slots__ = ("attempts", "awaiting", "ending", "loop", "owner", "quiet", "upstream")

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
        upstream.splice = self
        stats.connections += 1
        stats.tunnels += 1

    @property
    def outstanding(self) -> bool:
        """Always: a tunnel cannot tell that the connection is between requests."""
        return True

    def from_client(self, data: bytes) -> bool:
        """Relay `data`; True: every read is activity (nothing is read to tell). Hot path."""
        self.awaiting = True
        self.upstream.transport.write(data)  # type: ignore[union-attr]
        return True

    def from_upstream(self, data: bytes) -> None:
        """Hot path."""
        self.awaiting = False
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
