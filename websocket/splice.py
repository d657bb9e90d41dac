"""A relayed connection as a byte splice, the way nginx relays WebSockets.

Once both handshakes are done (Sanic accepted the client's upgrade, the
`websockets` client opened the upstream), frames need no parsing: a frame from
the client is masked, as the upstream expects; a frame from the upstream is
not, as the client expects. `Splice.take_over` replaces both transports'
protocols with a `_Leg` each, which writes what it reads to the other socket.
Neither library sees the connection again: Sanic's keepalive pings stop (the
upstream leg never had any), and pings, pongs and close frames from either end
are bytes like any other, answered end to end.

Nothing received is lost or parsed twice: from the handshake to the
take-over, `websocket.tap` holds what each side sends, unparsed, and
`take_over` replays it into the splice. Only when the take-over is unsafe (the
upstream closed in the same read as its handshake response, or Sanic's side is
no longer open) does `take_over` return None: each library then gets what was
held (`untap`), and the relay pumps frames as before.

Each leg walks the frame headers of its stream, which costs a few operations
per frame and never copies a payload, to know:

* where frames start, so that a close frame of our own is never written into
  the middle of one;
* which side sent a close frame, and that the other side got it;
* the size of each message from the client: one over WS_MAX_MESSAGE_BYTES is
  cut at its first header (never forwarded); the client gets 1009, the
  upstream a close 1001 "client went away". Messages from the upstream are
  not limited (nginx limits neither way; the upstream is ours).

Endings (close codes in `websocket.connections`):

* a close frame from either side passes through; the other side's answer
  passes back; the client's TCP connection is closed by us once the client has
  both sent and received a close (the server closes first, RFC 6455 §7.1.1),
  the upstream's by the upstream;
* the upstream's connection ends without a close frame (it died): the client
  gets 1014 "upstream connection lost";
* the client's connection ends without a close frame (it vanished): the
  upstream gets a masked close 1001 "client went away", then its own TCP close;
* `close()` (SIGTERM drain): 1001 to the client and a masked 1001 to the upstream.

Anything not done within `CLOSE_TIMEOUT` after a closing starts is aborted.
Backpressure: a leg whose socket's write buffer is over its high-water mark
(`pause_writing`) stops reading the other socket until it drains, so a slow
reader never grows a buffer in this process beyond a socket read.

Stalls: while the other socket is paused, nothing it does is seen, not even its
end (a paused transport reads no EOF, and a FIN waits behind the data the
service does not read). So an end that reads none of what it was sent for
`send_timeout` (WS_RELAY_SEND_TIMEOUT, 60 s: nginx's proxy_send_timeout and
send_timeout) while its write buffer is over the mark is aborted (a close frame
would wait behind what it does not read), and the other end is told as if it
had vanished: the client gets 1014 "upstream stopped reading", the upstream a
masked 1001 "client went away"; then the usual closing, bounded by
`CLOSE_TIMEOUT`. Any byte it reads starts the wait again, so a slow reader is
not cut, only one that stopped; the timer exists only while a leg is paused.

Hot path: `_Leg.data_received` (one write per socket read; a read of exactly one small
frame, the usual case, is checked inline; otherwise one header walk per frame).
"""

from __future__ import annotations

import asyncio

from sanic.server.protocols.websocket_protocol import WebSocketProtocol
from sanic.server.websockets.impl import WebsocketImplProtocol
from websockets.asyncio.client import ClientConnection
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import CLOSED, OPEN

from websocket.connections import BAD_GATEWAY, GOING_AWAY, MESSAGE_TOO_BIG
from websocket.tap import TapClientConnection, TapServerProtocol, untap

CLOSE_TIMEOUT = 2.0  # seconds from the start of a closing to aborting what is left
GONE = "client went away"  # the reason of the 1001 an upstream gets when its client left
UPSTREAM_LOST = "upstream connection lost"  # the reason of the 1014 when the upstream died
UPSTREAM_STALLED = "upstream stopped reading"  # the reason of the 1014 when it stopped reading
CLIENT_STALLED = "client stopped reading"  # why a client was aborted (logged, see `stalled`)


def server_close(code: int, reason: str) -> bytes:
    """An unmasked close frame, as a server sends it to a client."""
    return Frame(Opcode.CLOSE, Close(code, reason[:120]).serialize()).serialize(mask=False)


def client_close(code: int, reason: str) -> bytes:
    """A masked close frame, as a client sends it to a server."""
    return Frame(Opcode.CLOSE, Close(code, reason[:120]).serialize()).serialize(mask=True)


class _Leg(asyncio.Protocol):
    """One end of the splice: reads its socket, writes to the other end's."""

    __slots__ = ("close_seen", "closed_to", "ended", "forwarding", "head", "limit", "lost",
                 "message", "peer", "pending", "skip", "splice", "stall", "transport",
                 "unsent")  # fmt: skip

    def __init__(self, splice: Splice, transport: asyncio.Transport, limit: int | None) -> None:
        self.splice = splice
        self.transport = transport
        self.peer: _Leg = self
        self.limit = limit  # largest message accepted from this end, None: any
        self.skip = 0  # bytes of the current frame still to come
        self.head = b""  # the start of a frame header split across reads, not forwarded yet
        self.message = 0  # payload bytes of the current message so far (when limited)
        self.forwarding = True  # what this end sends is written to the other end
        self.pending: bytes | None = None  # a close frame for the other end, at a frame start
        self.close_seen = False  # this end sent a close frame
        self.closed_to = False  # a close frame was written to this end
        self.ended = False  # no more reading or writing: EOF, closing or lost
        self.lost = False  # connection_lost was called
        self.stall: asyncio.TimerHandle | None = None  # while paused: `_stalled`, if no progress
        self.unsent = 0  # the write buffer's size when `stall` was set

    def data_received(self, data: bytes) -> None:
        """Forward `data` to the other end. Hot path."""
        skip = self.skip
        if skip >= len(data) and not self.head:  # inside a frame's payload
            self.skip = skip - len(data)
            if self.forwarding:
                self.peer.transport.write(data)
                if self.pending is not None and self.skip == 0:
                    self._inject_now()
            return
        if self.head:
            data = self.head + data
            self.head = b""
        elif not skip and len(data) < 132 and self.pending is None:
            # The usual read: exactly one small frame, not a close (checked inline,
            # about a third of the relay's user time at 100-byte messages).
            b1 = data[1] if len(data) > 1 else 0
            opcode = data[0] & 0x0F
            size = b1 & 0x7F
            if size < 126 and opcode != 8 and size + (6 if b1 & 0x80 else 2) == len(data):
                limit = self.limit
                if limit is not None and opcode < 8:
                    message = self.message + size if opcode == 0 else size
                    if message > limit:
                        self._scan(data, 0)
                        return
                    self.message = message
                if self.forwarding:
                    self.peer.transport.write(data)
                return
        self._scan(data, skip)

    def _scan(self, data: bytes, pos: int) -> None:
        """Walk the frame headers from `pos`, forward up to where forwarding stops."""
        n = len(data)
        cut = n  # forward data[:cut]
        close_at = -1  # where this end's close frame starts
        too_big = False
        while pos < n:
            if self.pending is not None:
                cut = pos
                break
            if n - pos < 2:
                self.head, cut = data[pos:], pos
                break
            b0, b1 = data[pos], data[pos + 1]
            size = b1 & 0x7F
            start = pos + 2
            if size > 125:
                start += 2 if size == 126 else 8
                if start > n:
                    self.head, cut = data[pos:], pos
                    break
                size = int.from_bytes(data[pos + 2 : start], "big")
            if b1 & 0x80:
                start += 4  # the masking key
            opcode = b0 & 0x0F
            if opcode == 8:
                if close_at < 0:
                    close_at = pos
            elif self.limit is not None and opcode < 8:
                self.message = self.message + size if opcode == 0 else size
                if self.message > self.limit and self.forwarding:
                    cut, too_big = pos, True
                    self.pending = client_close(GOING_AWAY, GONE)
                    break
            pos = start + size
        at_boundary = pos <= n
        self.skip = 0 if at_boundary else pos - n
        if self.forwarding:
            if cut == n:
                self.peer.transport.write(data)
            elif cut:
                self.peer.transport.write(data[:cut])
            if 0 <= close_at < cut:
                self.peer.closed_to = True
            if self.pending is not None and at_boundary:
                self._inject_now()
        if too_big:
            reason = f"message over {self.limit} bytes"
            self.splice.refused = reason
            self.splice.upstream.inject(server_close(MESSAGE_TOO_BIG, reason))
        if close_at >= 0:
            self.close_seen = True
            self.splice.advance()

    def inject(self, frame: bytes) -> None:
        """Write the close `frame` to the other end at the next frame start, stop forwarding."""
        if not self.forwarding or self.peer.closed_to or self.peer.ended:
            return
        self.pending = frame
        if self.skip == 0:
            self._inject_now()

    def _inject_now(self) -> None:
        frame, self.pending = self.pending, None
        if frame is not None and not self.peer.ended:
            self.peer.transport.write(frame)
            self.peer.closed_to = True
        self.forwarding = False
        self.splice.advance()

    def pause_writing(self) -> None:
        if not self.peer.ended:
            self.peer.transport.pause_reading()
            self._watch()

    def resume_writing(self) -> None:
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None
        if not self.peer.ended:
            self.peer.transport.resume_reading()

    def _watch(self) -> None:
        """Check in `send_timeout` that this end has read some of what waits for it."""
        self.unsent = self.transport.get_write_buffer_size()
        self.stall = asyncio.get_running_loop().call_later(self.splice.send_timeout, self._stalled)

    def _stalled(self) -> None:
        self.stall = None
        if self.ended:  # closing: bounded by CLOSE_TIMEOUT
            return
        if self.transport.get_write_buffer_size() < self.unsent:  # it reads, slowly
            self._watch()
            return
        self.splice.stalled(self)

    def eof_received(self) -> bool:
        self.end()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None
        self.end()

    def end(self) -> None:
        if self.ended:
            if self.lost:
                self.splice.advance()
            return
        self.ended = True
        self.peer.forwarding = False  # nothing more can be written here
        if not self.peer.ended:
            self.peer.transport.resume_reading()  # its data is dropped: keep reading for EOF
        self.splice.ended(self)

    def close(self) -> None:
        if not self.ended:
            self.ended = True
            self.peer.forwarding = False
            self.transport.close()


class Splice:
    """The two legs of one relayed connection: see the module docstring."""

    def __init__(
        self,
        sanic: WebSocketProtocol,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        max_size: int | None,
        send_timeout: float,
    ) -> None:
        self._sanic = sanic
        self.send_timeout = send_timeout  # see "Stalls" in the module docstring
        self.client = _Leg(self, client, max_size)
        self.upstream = _Leg(self, upstream, None)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.upstream_died = False
        self.refused: str | None = None  # why the client was closed with 1009, if it was
        self.stalled_end: str | None = None  # UPSTREAM_STALLED or CLIENT_STALLED, if one was
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def take_over(
        cls,
        ws: WebsocketImplProtocol,
        upstream: ClientConnection,
        max_size: int | None,
        send_timeout: float,
    ) -> Splice | None:
        """Splice `ws` to `upstream`, or None when it cannot be done safely (relay as before).

        `max_size`: the largest message from the client; `send_timeout`: see "Stalls" in
        the module docstring."""
        sanic = ws.io_proto
        if not isinstance(sanic, TapServerProtocol) or not isinstance(
            upstream, TapClientConnection
        ):
            untap(ws)
            return None
        client, server = sanic.transport, upstream.transport
        end = upstream.tap.find(b"\r\n\r\n") if upstream.tap is not None else -1
        if (
            sanic.tap is None
            or end < 0  # the end of the handshake response
            or ws.ws_proto.state is not OPEN
            or upstream.protocol.state is not OPEN  # say, it closed as soon as it opened
            or client is None
            or client.is_closing()
            or server.is_closing()
        ):
            sanic.untap()
            upstream.untap()
            return None
        if ws.keepalive_ping_task is not None:
            ws.keepalive_ping_task.cancel()
            ws.keepalive_ping_task = None
        ws.ws_proto.state = CLOSED  # Sanic's own close, after the handler, writes nothing
        splice = cls(sanic, client, server, max_size, send_timeout)
        client.set_protocol(splice.client)
        server.set_protocol(splice.upstream)
        early = sanic.release()  # (with what came in the upgrade's read: `upgraded`)
        for leg, data in ((splice.client, early), (splice.upstream, upstream.release()[end + 4 :])):
            if data:
                leg.data_received(data)
        return splice

    async def run(self) -> bool:
        """Wait until both connections are closed; False if the upstream died."""
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.abort()
            asyncio.get_running_loop().call_soon(self._sanic.connection_lost, None)
            raise
        finally:
            if self._timer is not None:
                self._timer.cancel()
        # Tell Sanic its connection is gone, as its transport would have.
        self._sanic.connection_lost(None)  # type: ignore[no-untyped-call]
        return not self.upstream_died

    async def close(self, code: int, reason: str) -> None:
        """Close both ends with `code` (the drain), and wait until they are closed."""
        self.upstream.inject(server_close(code, reason))
        self.client.inject(client_close(code, reason))
        self.advance()
        await asyncio.shield(self._done)

    def abort(self) -> None:
        for leg in (self.client, self.upstream):
            if not leg.lost:
                leg.ended = True
                leg.transport.abort()

    def stalled(self, leg: _Leg) -> None:
        """`leg`'s end read nothing for `send_timeout` while the other end waited on it:
        abort it; its `connection_lost` tells the other end (`ended`)."""
        self.stalled_end = UPSTREAM_STALLED if leg is self.upstream else CLIENT_STALLED
        leg.transport.abort()

    def ended(self, leg: _Leg) -> None:
        """`leg`'s connection ended: tell the other end, if it was not told yet."""
        other = leg.peer
        if leg is self.upstream:
            self.upstream_died = not (leg.close_seen or leg.closed_to or other.ended)
        if not other.ended and not other.closed_to:
            if leg is self.upstream:
                lost = UPSTREAM_STALLED if self.stalled_end == UPSTREAM_STALLED else UPSTREAM_LOST
                frame = leg.pending or server_close(BAD_GATEWAY, lost)
            else:
                frame = leg.pending or client_close(GOING_AWAY, GONE)
            leg.pending = None
            if leg.skip == 0:
                other.transport.write(frame)
                other.closed_to = True
            else:  # in the middle of a frame: all that is left is to end the connection
                other.close()
        self.advance()

    def advance(self) -> None:
        """Close what the close handshakes have finished; done when both are closed."""
        client, upstream = self.client, self.upstream
        if client.lost and upstream.lost:
            if not self._done.done():
                self._done.set_result(None)
            return
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)
        if not client.ended and client.closed_to and client.close_seen:
            client.close()  # the server closes the TCP connection first
