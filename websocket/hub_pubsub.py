"""The push hub's Redis pub/sub connection (`HubPubSub`): redis-py's `PubSub`, which
the hub (`websocket.hub.ChannelHub`) writes its commands on itself, and which keeps
the commands awaiting a reply, in order, so that the hub's reader can match each
reply to its command.

Only the reader connects again (redis-py's `get_message`); the hub writes its
commands itself, at once, on the connection as it is ready (`HubPubSub.send`), and
not at all while it is down or being made again. redis-py's own subscribe connected
again as well, racing the reader's reconnect: sessions closed with 1011, and allowed
channels were refused (`HubPubSub`).

A connection made again subscribes only the channels that have a subscriber in the
hub then (`HubPubSub.on_connect`): redis-py's own list of channels forgot one only at
the reply to its UNSUBSCRIBE, so a channel whose last subscriber left while Redis was
away (its UNSUBSCRIBE could not be sent) was subscribed again, and stayed so, in
Redis and in the hub, as long as nothing was published on it (the names are the
clients': any number of them).

Each channel is subscribed again with a SUBSCRIBE of its own: Redis refuses a
SUBSCRIBE of several channels as a whole when its ACL leaves one of them out, and
redis-py's one SUBSCRIBE of them all, refused for one channel its user lost while the
hub was subscribed (an ACL changed at runtime, which also drops the connection), left
every channel silent for good, their clients still believing themselves subscribed.
Now only the refused channel is (the hub leaves it: `websocket.hub`).

An error reply names neither its command nor its channel, and others share the
connection (a reconnect's SUBSCRIBEs, UNSUBSCRIBEs, health-check PINGs, a SUBSCRIBE
given up on, whose reply still comes): Redis answers a connection's commands in
order, so `HubPubSub` keeps those awaiting a reply, in the order sent (`sent`), and
the reader takes each reply for the oldest one's (`replied`, `error_replied`; an
error was taken for the waiting subscribe's, whatever it answered: a subscribe given
up on then refused the next channel's).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection

from common import constants

# The argument of the hub's health-check PINGs: not redis-py's, whose replies its
# reader swallows; the hub reads them, to match each reply to its command.
PING_ARGUMENT = "switchboard-push-hub"


class _Sent:
    """A command sent on the hub's pub/sub connection whose replies have not all come:
    `kind`, the type of its replies ("subscribe", "unsubscribe", "pong"); `names`, the
    channels whose replies are still to come (a PING has none, and one reply)."""

    __slots__ = ("kind", "names")

    def __init__(self, kind: str, names: list[str]) -> None:
        self.kind, self.names = kind, names


# The replies to the hub's commands (`_Sent.kind`), by the command.
_REPLY_KINDS = {"SUBSCRIBE": "subscribe", "UNSUBSCRIBE": "unsubscribe", "PING": "pong"}
REPLIES = frozenset(_REPLY_KINDS.values())


class HubPubSub(PubSub):
    """redis-py's pub/sub connection, which the hub writes its commands on itself
    (`send`): at once, on the connection as it is ready, else not at all. Its reader,
    redis-py's `get_message`, is the one that connects again (and the first subscribe,
    `open`, the one that connects first); a connection made again subscribes the
    channels the hub has then (`subscribed`, the hub's own map: `on_connect`), each
    with a SUBSCRIBE of its own. The commands sent on the connection whose replies
    have not come are kept, in order (`sent`).

    Why not redis-py's `subscribe`: it reconnects too, when its write fails or finds
    the connection closed, and a subscribe racing the reader's reconnect (a Redis
    restart, a CLIENT KILL) made a second handshake on the one connection, and
    redis-py's two coroutines read each other's replies: sessions closed with 1011 (an
    AttributeError: the other had closed the connection under the write; a
    RuntimeError: two reads at once), or told `subscribe_refused` for an allowed
    channel (the other's handshake's error reply taken for the SUBSCRIBE's): in a run
    of 20 CLIENT KILLs, each with 10 sessions subscribing, 1 or 2 sessions closed and
    11 to 13 subscribes refused. A write now is synchronous, on a connection whose
    handshake and `on_connect` are done: in order with the reconnect's SUBSCRIBEs,
    never in a handshake.

    Redis answers a connection's commands in order, but an error reply names neither
    its command nor its channel: the reader matches each reply to the oldest command
    awaiting one (`replied`, `error_replied`). A SUBSCRIBE of several channels that
    one of them is refused (an ACL leaving it out) is refused as a whole, so the
    reconnect subscribes each channel with a command of its own (written at once, in
    one write): Redis refuses only those it refuses, and the reader knows which."""

    def __init__(self, redis: aioredis.Redis, subscribed: dict[str, Any]) -> None:
        # (the reader reads subscribe confirmations: `ChannelHub._answered`)
        super().__init__(redis.connection_pool)
        self._subscribed = subscribed
        self.sent: deque[_Sent] = deque()
        # The channels the hub left whose UNSUBSCRIBE Redis refused: still subscribed on
        # this connection (`ChannelHub._unsubscribe_refused`).
        self.unleft: set[str] = set()
        # The writer of the connection `on_connect` made ready: one of a connection
        # being made again (its handshake under way) is another, not ready yet.
        self._ready: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        """Connect, the first time, and subscribe the hub's channels (as `on_connect`
        does on the connections made again: redis-py does not call it on the first)."""
        await self.connect()  # type: ignore[no-untyped-call]
        connection = self.live_connection()
        assert connection is not None  # (`connect` made it)
        await self.on_connect(connection)

    def send(self, command: str, *args: str) -> None:
        """Write `command` (SUBSCRIBE, UNSUBSCRIBE or PING) at once, kept in `sent`; or,
        the connection down or being made again, nothing (the reconnect subscribes the
        hub's channels, and no other)."""
        self._write([(command, *args)])

    def _write(self, commands: list[tuple[str, ...]]) -> None:
        """Write `commands` in one write, on the ready connection only, and keep them
        in `sent` in that order. Synchronous: nothing is written between the check and
        the write, and `sent` is in the order of the connection's bytes. A write on a
        connection that is dropping is lost with it (the reader then reconnects)."""
        connection = self.live_connection()
        writer = None if connection is None else connection._writer
        if not commands or writer is None or writer is not self._ready or writer.is_closing():
            return
        assert connection is not None
        writer.writelines(connection.pack_commands(commands))
        for command, *args in commands:
            kind = _REPLY_KINDS[command]
            self.sent.append(_Sent(kind, [] if kind == "pong" else args))

    async def check_health(self) -> None:
        """redis-py's health check (a PING, once the connection was quiet for its
        `health_check_interval`), written by `send` as the hub's other commands, with an
        argument of the hub's own (`PING_ARGUMENT`): redis-py's reader would swallow the
        reply to its own. None on a connection that is not ready: the reader connects
        again first (`PubSub.parse_response`)."""
        conn = self.live_connection()
        if conn is None:
            await super().check_health()  # type: ignore[no-untyped-call]  # (raises)
            return
        now = asyncio.get_running_loop().time()
        if conn.health_check_interval and now > conn.next_health_check:
            self.send("PING", PING_ARGUMENT)

    def live_connection(self) -> Connection | None:
        """The connection (None before the first subscribe, and after `aclose`)."""
        return cast("Connection | None", self.connection)

    async def on_connect(self, connection: Connection) -> None:
        # A new connection has no subscription, and brings no reply to the old one's
        # commands. It subscribes the channels the hub has now (one being subscribed
        # included; none it left meanwhile, whose UNSUBSCRIBE could not be sent): read,
        # written and made ready at once, with no wait between.
        self.sent = deque()
        self.unleft = set()
        self._ready = connection._writer
        self._write([("SUBSCRIBE", constants.push_channel(c)) for c in self._subscribed])

    def replied(self, kind: str, name: str | None) -> None:
        """A confirmation of `kind` (`REPLIES`) for the channel `name` (None: a pong) has
        come: its command is the oldest of that kind awaiting it, and those before it
        were answered already (in order)."""
        for index, sent in enumerate(self.sent):
            if sent.kind == kind and (name is None or name in sent.names):
                for _ in range(index):
                    self.sent.popleft()
                if name is not None:
                    sent.names.remove(name)
                    if kind == "unsubscribe":
                        self.unleft.discard(name)
                if not sent.names:
                    self.sent.popleft()
                return

    def error_replied(self) -> _Sent | None:
        """An error reply has come: it answers the oldest command awaiting a reply (all of
        it: a refused command gets one reply, whatever its channels). That command."""
        return self.sent.popleft() if self.sent else None
