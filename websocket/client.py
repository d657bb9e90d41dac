"""A `/ws` client connection after the upgrade: an asyncio Protocol, no task while idle.

Sanic's WebSocket layer holds about 27 KB per idle connection (its Request,
HttpProtocol, WebsocketImplProtocol, the handler's task and coroutine frames,
a keepalive task per connection); the goal is under 20 KB (design §7, issue 5).
So, as `websocket.splice` does for the relay, `ClientProtocol.take_over`
replaces Sanic's protocol on the transport once the upgrade is done and the
handler returns: an idle connection is then the transport, a `ClientProtocol`,
a `websockets` sans-I/O `ServerProtocol` (the frame parser) and its `Session`
(`websocket.session`). What the client sent before the take-over was held
unparsed by `websocket.tap` and is replayed here.

* Frames are parsed on `data_received`; each message (fragments joined) goes to
  the session. Pings are answered by the parser, and a close frame too; a
  message over WS_MAX_MESSAGE_BYTES closes with 1009, bad UTF-8 with 1007.
* `send` writes to the transport at once. Past the transport's high-water
  mark (`pause_writing`) messages wait in `pending`; more than WS_SEND_QUEUE
  waiting closes the connection with 1013 (a slow consumer). Meanwhile the socket
  is not read: a client that sends (pings, say) and never reads cannot make its
  answers pile up in this process. Once the transport is closing, nothing is
  written (`send`, a ping, a close frame are no-ops): a client that reset its
  connection is gone, though the hub may still hold its `send` for a moment.
* `keepalive` is the process's one ping task: every WS_PING_INTERVAL it pings
  every connection, and WS_PING_TIMEOUT later closes with 1011 those whose pong
  did not come.
* The frame parser's own log lines (`websockets` logs "connection closed" at info
  for every connection a server's parser sees end, cleanly or not, with no path
  or code) go to `websocket.client` at debug, with the path (`PARSER_LOG`): a
  client that goes away is no error (README), and the closes worth a line are
  logged with their code by `log_close`. The parser's errors stay errors.
* `fail` (1007, 1008, 1009, 1011, 1013) writes a close frame and closes the TCP
  connection once what is buffered is sent; `close` (the 1001 drain) waits for
  the client's close frame. Either is aborted after CLOSE_TIMEOUT. The session
  ends, and the connection stops counting, as soon as the closing starts.

Hot path: `data_received` and `send`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sanic.server.websockets.impl import WebsocketImplProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import CLOSED, OPEN
from websockets.server import ServerProtocol

from websocket.connections import INTERNAL_ERROR, TRY_AGAIN_LATER, Connections
from websocket.errors import log_close
from websocket.tap import TapServerProtocol

if TYPE_CHECKING:
    from websocket.session import Session


CLOSE_TIMEOUT = 10.0  # seconds from the start of a closing to aborting the connection
# Why a connection's socket is not read (`ClientProtocol.hold`): bits of `held`.
WRITES_FULL = 1  # the transport is past its high-water mark: the client does not read
BACKLOG_FULL = 2  # the session has BACKLOG_LIMIT messages waiting (`websocket.session`)
INVALID_DATA = 1007
_TEXT, _BINARY, _CONT, _PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG


class _InfoAsDebug(logging.LoggerAdapter[logging.Logger]):
    """A logger whose info lines are written at debug (its others as they are)."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG if level == logging.INFO else level, msg, *args, **kwargs)


# The frame parsers' logger, shared by every connection (module docstring).
PARSER_LOG = _InfoAsDebug(logging.getLogger("websocket.client"), {"fields": {"path": "/ws"}})


class ClientProtocol(asyncio.Protocol):
    """One `/ws` connection's socket: frames in and out; see the module docstring."""

    __slots__ = ("awaiting_pong", "done", "fragments", "held", "limit", "lost", "parser",
                 "pending", "session", "text", "timer", "transport")  # fmt: skip

    def __init__(self, transport: asyncio.Transport, parser: ServerProtocol, limit: int) -> None:
        self.transport = transport
        self.parser = parser
        self.limit = limit  # messages waiting past the transport's high-water mark
        self.session: Session | None = None
        self.pending: list[str] | None = None  # None while the transport takes writes
        self.fragments: list[bytes] | None = None  # a fragmented message so far
        self.text = False  # whether `fragments` is a text message
        self.awaiting_pong = False
        self.lost = False
        self.timer: asyncio.TimerHandle | None = None  # aborts a closing that takes too long
        self.done: asyncio.Future[None] | None = None  # made by `close`, set when lost
        self.held = 0  # why the socket is not read: WRITES_FULL | BACKLOG_FULL (0: it is)

    @classmethod
    def take_over(
        cls, ws: WebsocketImplProtocol, max_size: int, limit: int
    ) -> tuple[ClientProtocol, bytes] | None:
        """Take `ws`'s connection from Sanic: the new protocol and the bytes to replay into it
        once it has a session; None when the connection is no longer open.

        The caller must return from its handler without awaiting: Sanic is told
        the connection is gone, which cancels the handler's task.
        """
        sanic = ws.io_proto
        if not isinstance(sanic, TapServerProtocol) or sanic.tap is None:
            return None
        transport = sanic.transport
        if ws.ws_proto.state is not OPEN or transport is None or transport.is_closing():
            return None
        if ws.keepalive_ping_task is not None:
            ws.keepalive_ping_task.cancel()
            ws.keepalive_ping_task = None
        ws.ws_proto.state = CLOSED  # Sanic's own close, after the handler, writes nothing
        parser = ServerProtocol(max_size=max_size, state=OPEN, logger=PARSER_LOG)
        conn = cls(transport, parser, limit)
        transport.set_protocol(conn)
        early = sanic.release()  # (with what came in the upgrade's read: `TapServerProtocol`)
        sanic.transport = None  # nothing Sanic does from now on reaches the socket
        # Sanic's request-timeout timer would keep its protocol, request and all alive
        # for up to half a timeout more; HttpProtocol.close cancels it the same way.
        timer: asyncio.TimerHandle | None = sanic._callback_check_timeouts  # typed None there
        if timer is not None:
            timer.cancel()
            sanic._callback_check_timeouts = None
        sanic.connection_lost(None)
        return conn, early

    # -- incoming -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Parse `data`, hand complete messages to the session. Hot path."""
        parser = self.parser
        parser.receive_data(data)
        for frame in parser.events_received():
            if isinstance(frame, Frame):
                opcode = frame.opcode
                if opcode is _PONG:
                    self.awaiting_pong = False
                elif opcode is _TEXT or opcode is _BINARY or opcode is _CONT:
                    self._data_frame(frame)
        self._flush()

    def _data_frame(self, frame: Frame) -> None:
        if frame.opcode is not _CONT:
            if frame.fin:
                self._message(bytes(frame.data), frame.opcode is _TEXT)
                return
            self.fragments, self.text = [bytes(frame.data)], frame.opcode is _TEXT
            return
        if self.fragments is None:  # the parser refuses this; kept for the type checker
            return
        self.fragments.append(bytes(frame.data))
        if frame.fin:
            data, self.fragments = b"".join(self.fragments), None
            self._message(data, self.text)

    def _message(self, data: bytes, text: bool) -> None:
        session = self.session
        if session is None or self.parser.state is not OPEN:
            return
        if text:
            try:
                session.received(data.decode())
            except UnicodeDecodeError:
                self.fail(INVALID_DATA, "invalid UTF-8")
        else:
            session.received(bytes(data))

    def eof_received(self) -> bool:
        self.parser.receive_eof()
        self._flush()
        self._end()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._end()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    # -- outgoing -------------------------------------------------------------

    def send(self, text: str) -> None:
        """Send a text message, or queue it while the transport is full; nothing once the
        transport is closing (see `_flush`). Hot path."""
        parser = self.parser
        if parser.state is not OPEN or self.transport.is_closing():
            return
        pending = self.pending
        if pending is not None:
            if len(pending) >= self.limit:
                self.fail(TRY_AGAIN_LATER, f"send queue full ({len(pending)}): reading too slowly")
            else:
                pending.append(text)
            return
        parser.send_text(text.encode())
        for data in parser.data_to_send():
            self.transport.write(data)

    def pause_writing(self) -> None:
        if self.pending is None:
            self.pending = []
        # What the client sends may need answers (pongs to its pings, error frames): read
        # nothing more until it reads, or those answers pile up here without bound.
        self.hold(WRITES_FULL, True)

    def resume_writing(self) -> None:
        pending, self.pending = self.pending, None
        for text in pending or ():
            self.send(text)  # pauses again, if need be, keeping the order
        if self.pending is None:
            self.hold(WRITES_FULL, False)

    def hold(self, reason: int, held: bool) -> None:
        """Stop reading the socket for `reason` (`held`), or no longer for it: it is read
        while no reason holds it."""
        before = self.held
        self.held = before | reason if held else before & ~reason
        if self.held and not before:
            self.transport.pause_reading()
        elif before and not self.held:
            self.transport.resume_reading()

    def ping(self) -> bool:
        """Send a keepalive ping; False if the connection is closing."""
        if self.parser.state is not OPEN or self.transport.is_closing():
            return False
        self.awaiting_pong = True
        self.parser.send_ping(b"")
        self._flush()
        return True

    def _flush(self) -> None:
        """Write what the parser has for the client; drop it once the transport is closing.
        A client that reset its connection has a closing transport while its parser is
        still OPEN, and keeps it after `connection_lost` until the hub or a session task
        lets go of this connection: uvloop raises RuntimeError on writing to it then."""
        transport = self.transport
        for data in self.parser.data_to_send():
            if transport.is_closing():
                continue
            if data:
                transport.write(data)
            else:  # the parser's end of stream: the server closes the TCP connection
                transport.close()
        if self.parser.state is not OPEN:
            self._end()

    # -- endings --------------------------------------------------------------

    def fail(self, code: int, reason: str) -> None:
        """Close with `code` now: close frame, then the TCP connection."""
        if self.parser.state is OPEN:
            self.pending = None
            self.parser.fail(code, reason[:120])
            self._flush()

    async def close(self, code: int, reason: str) -> None:
        """The closing handshake with `code` (the drain): wait until the connection is closed."""
        if self.lost:
            return
        if self.done is None:
            self.done = asyncio.get_running_loop().create_future()
        if self.parser.state is OPEN:
            self.parser.send_close(code, reason[:120])
            self._flush()
        await asyncio.shield(self.done)

    def _end(self) -> None:
        """The closing started or the connection is gone: end the session (once)."""
        session, self.session = self.session, None
        if session is not None:
            session.close()
            close = self.parser.close_sent
            if close is not None and not self.parser.close_rcvd_then_sent:
                log_close("/ws", close.code, close.reason)
        if not self.lost and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.transport.abort)


async def keepalive(connections: Connections, interval: float, timeout: float) -> None:
    """Ping every `/ws` connection every `interval` s; close with 1011 those that have not
    answered `timeout` s later. One task per process, however many connections."""
    while True:
        await asyncio.sleep(interval)
        pinged = [c for c in connections if isinstance(c, ClientProtocol) and c.ping()]
        await asyncio.sleep(timeout)
        for conn in pinged:
            if conn.awaiting_pong:
                conn.fail(INTERNAL_ERROR, "keepalive ping timeout")
