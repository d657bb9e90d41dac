"""The push hub (`websocket.hub.ChannelHub`) on a real Redis: one subscriber never stops
delivery to the others, what it sends is JSON, a channel left while Redis was
away is left in Redis too, and a channel Redis refuses on a reconnect is left here,
its sessions told."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest
import redis.asyncio as aioredis

from common import constants
from common.connection import connect
from common.embedded_redis import EmbeddedRedis
from common.principal import Principal
from tests.helpers import wait_for_async
from websocket.connections import Connections
from websocket.hub import ChannelHub
from websocket.session import Session

if TYPE_CHECKING:
    from websocket.app import WsContext
    from websocket.client import ClientProtocol

pytestmark = pytest.mark.timeout(30)

# Redis's default user without the CLIENT command: the service's connections' handshake
# (CLIENT SETNAME) is refused with NOPERM, an error reply that is no connection error.
NO_CLIENT_ACL = ["--user", "default", "on", "nopass", "~*", "&*", "+@all", "-client"]
# Redis's default user with every push channel and no other (the hub needs no other).
PUSH_ACL = ["--user", "default", "on", "nopass", "~*", "resetchannels",
            f"&{constants.push_channel('*')}", "+@all"]  # fmt: skip


@pytest.fixture
async def hub(redis_url: str) -> AsyncIterator[ChannelHub]:
    redis = aioredis.Redis.from_url(redis_url)
    hub = ChannelHub(redis)
    try:
        yield hub
    finally:
        await hub.close()
        await redis.aclose()


async def test_a_subscriber_that_raises_is_dropped_and_the_others_still_receive(
    hub: ChannelHub, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    channel = f"hub:{uuid.uuid4().hex[:8]}"
    received: asyncio.Queue[str] = asyncio.Queue()
    calls: list[str] = []

    def broken(frame: str) -> None:  # what a write to a closed uvloop transport raised
        calls.append(frame)
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    await hub.subscribe(channel, broken)
    await hub.subscribe(channel, received.put_nowait)
    with caplog.at_level(logging.ERROR, logger="websocket.hub"):
        for n in range(3):
            await redis_client.publish(constants.push_channel(channel), str(n))
            assert json.loads(await asyncio.wait_for(received.get(), 5))["data"] == n
    assert len(calls) == 1  # dropped at its first failure
    failures = [r for r in caplog.records if r.getMessage() == "push delivery failed"]
    assert len(failures) == 1 and failures[0].exc_info is not None
    late: asyncio.Queue[str] = asyncio.Queue()  # a subscriber added afterwards receives too
    await hub.subscribe(channel, late.put_nowait)
    await redis_client.publish(constants.push_channel(channel), "4")
    assert json.loads(await asyncio.wait_for(late.get(), 5))["data"] == 4


async def test_a_payload_json_cannot_carry_is_delivered_as_a_string(
    hub: ChannelHub, redis_client: aioredis.Redis
) -> None:
    channel = f"hub:{uuid.uuid4().hex[:8]}"
    received: asyncio.Queue[str] = asyncio.Queue()
    await hub.subscribe(channel, received.put_nowait)
    for payload in ("1e400", "NaN", '{"x": -1e400}'):
        await redis_client.publish(constants.push_channel(channel), payload)
        frame = await asyncio.wait_for(received.get(), 5)
        message = json.loads(frame, parse_constant=_not_json)  # never Infinity or NaN
        assert message == {"type": "message", "channel": channel, "data": payload}


async def test_channels_left_while_redis_was_away_are_not_subscribed_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """redis-py forgets a channel only at the reply to its UNSUBSCRIBE, and subscribed
    again on reconnecting every channel left during an outage: in Redis and in redis-py
    for good, as long as nothing was published on it (a soak run: 41 of 50 channels
    whose clients left while Redis was away, 0 of 50 without the outage)."""
    async with _own_redis() as own:
        hub, admin = own.hub, own.client()
        kept: asyncio.Queue[str] = asyncio.Queue()
        left = [f"left:{n}" for n in range(5)]
        await hub.subscribe("kept", kept.put_nowait)
        for channel in left:
            await hub.subscribe(channel, _ignore)
        with caplog.at_level(logging.WARNING, logger="websocket.hub"):
            own.server.stop()
            await wait_for_async(lambda: _logged(caplog, "push channel connection lost"))
        for channel in left:  # the UNSUBSCRIBE cannot be sent
            hub.unsubscribe(channel, _ignore)
        own.start_again()

        await _delivering_again(admin, kept)
        numsub = await admin.pubsub_numsub(*(constants.push_channel(c) for c in left))
        assert [count for _, count in numsub] == [0] * len(left)
        subscribed = await admin.pubsub_channels(constants.push_channel("*"))
        assert subscribed == [constants.push_channel("kept").encode()]


async def test_a_closed_session_leaves_every_channel_even_when_redis_py_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A closing session's channels are left here at once, whatever the Redis calls
    after do: a soak run saw redis-py's UNSUBSCRIBE raise an AttributeError on its
    half-closed connection during an outage, which ended the session's leaving at its
    first channel (asyncio's "Task exception was never retrieved"), and its other
    channels kept delivering to the closed connection, subscribed in Redis for good.
    That error is a race; Redis back with an ACL refusing the service's handshake
    (CLIENT SETNAME: NOPERM, no connection error either) raises one every time."""
    unretrieved: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unretrieved.append(ctx))
    async with _own_redis() as own:  # the hub's connection makes a CLIENT SETNAME
        hub, admin = own.hub, own.client()
        kept: asyncio.Queue[str] = asyncio.Queue()
        conn = _Connection()
        session = Session(cast("WsContext", SimpleNamespace(hub=hub, connections=Connections(10))),
                          cast("ClientProtocol", conn))  # fmt: skip
        channels = [f"gone:{n}" for n in range(3)]
        await hub.subscribe("kept", kept.put_nowait)
        for channel in channels:
            await hub.subscribe(channel, conn.send)
        session.channels = set(channels)
        with caplog.at_level(logging.WARNING, logger="websocket.hub"):
            own.server.stop()
            await wait_for_async(lambda: _logged(caplog, "push channel connection lost"))
        own.start_again(*NO_CLIENT_ACL)

        session.close()

        await wait_for_async(lambda: hub.channels() == ["kept"], timeout=5)
        own.server.stop()
        own.start_again()

        await _delivering_again(admin, kept)
        numsub = await admin.pubsub_numsub(*(constants.push_channel(c) for c in channels))
        assert [count for _, count in numsub] == [0] * len(channels)
        for channel in [*channels, "kept"]:  # Redis delivers in order: "kept" comes last
            await admin.publish(constants.push_channel(channel), "after")
        while json.loads(await asyncio.wait_for(kept.get(), 5))["data"] != "after":
            pass  # a "back" a slow round of `delivered` gave up on
        assert conn.frames == []  # nothing for the closed connection
    gc.collect()  # a task that ended with an exception nobody retrieved is reported now
    assert unretrieved == []


async def test_a_subscribe_refused_at_the_connections_handshake_leaves_the_session_open() -> None:
    """Redis refusing the hub's new pub/sub connection an error reply that is no outage
    (an ACL user without CLIENT: CLIENT SETNAME is NOPERM) raised from the subscribe
    itself, and the session closed with 1011 internal error. Now the client gets an
    error frame for that subscribe, and the session stays open."""
    async with _own_redis(*NO_CLIENT_ACL) as own:  # the hub's CLIENT SETNAME refused
        hub = own.hub
        session, conn = _session(hub)
        session.received(json.dumps({"type": "subscribe", "channel": "news:1", "id": 7}))
        assert session.worker is not None
        await asyncio.wait_for(session.worker, 10)
        assert conn.failed == []
        (frame,) = (json.loads(f) for f in conn.frames)
        assert (frame["id"], frame["error"]["code"]) == (7, "subscribe_refused")
        assert "127.0.0.1" not in frame["error"]["message"]  # (redis-py's text names it)
        assert hub.channels() == [] and session.channels == set()


async def test_subscribes_racing_the_hubs_reconnect_are_all_subscribed() -> None:
    """The hub's connection killed (CLIENT KILL) as sessions subscribe: redis-py's
    subscribe made a second handshake on the connection the reader was making again,
    and the two read each other's replies: in 20 such kills with 10 sessions each, 1 or
    2 sessions closed with 1011 (an AttributeError, a RuntimeError from redis-py) and
    11 to 13 subscribes were told `subscribe_refused`, Redis having refused none (the
    other handshake's CLIENT SETINFO's error reply). Now each is subscribed, on the
    connection or by the reconnect, and delivers."""
    async with _own_redis() as own:
        hub, admin = own.hub, own.client()
        await hub.subscribe("kept", _ignore)  # (the hub's connection is made)
        sessions = [_session(hub) for _ in range(10)]
        for round_ in range(20):
            await admin.client_kill_filter(_type="pubsub")
            for n, (session, _) in enumerate(sessions):
                session.received(json.dumps({"type": "subscribe", "channel": f"news:{n}",
                                             "id": round_}))  # fmt: skip
            for n, (session, conn) in enumerate(sessions):
                if session.worker is not None:
                    await asyncio.wait_for(session.worker, 10)
                assert conn.failed == []
                assert [json.loads(f) for f in conn.frames] == [
                    {"type": "subscribed", "channel": f"news:{n}", "id": round_}
                ]
                conn.frames.clear()
                if round_ < 19:
                    await _ask(session, {"type": "unsubscribe", "channel": f"news:{n}"})
                    conn.frames.clear()
        for n in range(len(sessions)):
            await admin.publish(constants.push_channel(f"news:{n}"), "news")
        await wait_for_async(lambda: all(conn.frames for _, conn in sessions), timeout=5)
        for _, conn in sessions:
            assert [json.loads(f)["data"] for f in conn.frames] == ["news"]


@pytest.fixture
async def acl_hub() -> AsyncIterator[tuple[ChannelHub, aioredis.Redis]]:
    """A hub connected as the service's, its Redis user allowed the push channels only
    (`PUSH_ACL`); and a client of a user of the test's own, that may publish on any
    channel and change the hub's user (`_narrow`)."""
    async with _own_redis(*PUSH_ACL) as own:
        async with aioredis.Redis(port=own.server.port) as default:
            await default.execute_command("ACL", "SETUSER", "admin", "on", ">admin", "~*", "&*",
                                          "+@all")  # fmt: skip
        yield own.hub, own.client(username="admin", password="admin")


async def test_a_channel_redis_refuses_on_reconnecting_is_left_and_its_sessions_told(
    acl_hub: tuple[ChannelHub, aioredis.Redis],
) -> None:
    """The hub's Redis user loses a channel it is subscribed to, and its connection
    drops (Redis drops it itself as the ACL changes): the reconnect's SUBSCRIBE of
    every channel at once was refused as a whole, so no channel delivered again, the
    sessions still thinking themselves subscribed (0 of 3 channels delivered, 2 of them
    allowed). Now each channel is subscribed again on its own: the refused one is left
    here, each of its sessions told with an error frame (and free to subscribe again),
    and the others deliver."""
    hub, admin = acl_hub
    kept: asyncio.Queue[str] = asyncio.Queue()
    await hub.subscribe("kept", kept.put_nowait)
    (first, first_conn), (second, second_conn) = _session(hub), _session(hub)
    for session, channel in [(first, "closed:1"), (first, "open:1"), (second, "closed:1")]:
        await _ask(session, {"type": "subscribe", "channel": channel})
    first_conn.frames.clear()
    second_conn.frames.clear()

    await _narrow(admin, "open:*", "kept")

    await wait_for_async(lambda: first_conn.frames and second_conn.frames, timeout=5)
    for conn in (first_conn, second_conn):
        (frame,) = (json.loads(f) for f in conn.frames)
        assert frame["type"] == "error" and frame["channel"] == "closed:1"
        assert frame["error"]["code"] == "subscribe_refused"
    assert (first.channels, second.channels) == ({"open:1"}, set())
    assert hub.channels() == ["kept", "open:1"]
    await _delivering_again(admin, kept)
    await admin.publish(constants.push_channel("open:1"), "news")
    await wait_for_async(lambda: len(first_conn.frames) == 2, timeout=5)
    assert json.loads(first_conn.frames[1])["data"] == "news"

    await _narrow(admin, "*")  # allowed again
    await _delivering_again(admin, kept)  # (reconnected first: a race is no test here)
    await _ask(second, {"type": "subscribe", "channel": "closed:1", "id": 2})  # asked anew
    assert json.loads(second_conn.frames[-1]) == {"type": "subscribed", "channel": "closed:1",
                                                  "id": 2}  # fmt: skip
    await admin.publish(constants.push_channel("closed:1"), "back")
    await wait_for_async(lambda: json.loads(second_conn.frames[-1]).get("data") == "back")


async def test_a_subscribe_is_not_refused_by_another_channels_refusal(
    acl_hub: tuple[ChannelHub, aioredis.Redis],
) -> None:
    """Redis answers every SUBSCRIBE, in order, even those the hub gave up on (their
    sessions closed while Redis was slow to answer, busy with a slow command): the
    refusal of one, read while the next channel's subscribe waited for its reply, was
    taken for the next one's, which raised NOPERM for an allowed channel. Replies are
    now matched to the commands they answer, in order."""
    hub, admin = acl_hub
    await _narrow(admin, "open:*")
    await hub.subscribe("open:1", _ignore)  # (the hub's connection is made)
    await admin.execute_command("CLIENT", "PAUSE", 1000)  # Redis answers nobody for a second
    # A refused SUBSCRIBE is answered at once, pause or not (Redis checks the ACL
    # first): one waits behind one Redis holds. Each wait is cancelled, as a closing
    # session's is.
    for channel in ("open:3", "closed:1"):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(hub.subscribe(channel, _ignore), 0.1)
    received: asyncio.Queue[str] = asyncio.Queue()
    await hub.subscribe("open:2", received.put_nowait)
    assert hub.channels() == ["open:1", "open:2"]
    await admin.publish(constants.push_channel("open:2"), "news")
    assert json.loads(await asyncio.wait_for(received.get(), 5))["data"] == "news"


async def test_a_subscribe_is_not_refused_by_an_unsubscribes_refusal(
    acl_hub: tuple[ChannelHub, aioredis.Redis], caplog: pytest.LogCaptureFixture
) -> None:
    """Any error reply read while a subscribe waited was taken for its refusal: one to
    the UNSUBSCRIBE sent just before (the hub's Redis user lost the command) refused an
    allowed channel. That one is the reader's to log, once."""
    hub, admin = acl_hub
    await hub.subscribe("left:1", _ignore)
    await admin.execute_command("ACL", "SETUSER", "default", "-unsubscribe")
    received: asyncio.Queue[str] = asyncio.Queue()
    with caplog.at_level(logging.WARNING, logger="websocket.hub"):
        hub.unsubscribe("left:1", _ignore)  # (sent; its reply read after)
        await hub.subscribe("open:1", received.put_nowait)
    await admin.publish(constants.push_channel("open:1"), "news")
    assert json.loads(await asyncio.wait_for(received.get(), 5))["data"] == "news"
    (refused,) = _records(caplog, "push channel unsubscribe refused by redis")
    assert "unsubscribe" in refused.fields["error"]  # type: ignore[attr-defined]


async def test_a_channel_redis_refuses_to_unsubscribe_is_not_unsubscribed_at_each_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis refusing the UNSUBSCRIBE of a channel the hub left (its ACL user lost the
    command) keeps the channel subscribed, and sends its messages on: the hub answered
    each with an UNSUBSCRIBE again, which Redis refused again (20 messages, 21
    refusals, and a warning each). Now the channel is left here with the refusal
    logged once, its messages dropped; the next connection leaves it in Redis."""
    async with _own_redis() as own:
        hub, admin = own.hub, own.client()
        kept: asyncio.Queue[str] = asyncio.Queue()
        await hub.subscribe("kept", kept.put_nowait)
        await hub.subscribe("left:1", _ignore)
        await admin.execute_command("ACL", "SETUSER", "default", "-unsubscribe")
        with caplog.at_level(logging.WARNING, logger="websocket.hub"):
            hub.unsubscribe("left:1", _ignore)
            for n in range(20):
                await admin.publish(constants.push_channel("left:1"), str(n))
            await admin.publish(constants.push_channel("kept"), "after")  # read last
            assert json.loads(await asyncio.wait_for(kept.get(), 5))["data"] == "after"
            await hub.subscribe("later", _ignore)  # answered once Redis read what came before
        (entry,) = await admin.acl_log()
        assert (entry["object"], entry["count"]) == ("unsubscribe", 1)
        (refused,) = _records(caplog, "push channel unsubscribe refused by redis")
        assert refused.fields["channels"] == ["left:1"]  # type: ignore[attr-defined]
        assert _records(caplog, "push channel reader failed") == []
        assert hub.channels() == ["kept", "later"]
        numsub = await admin.pubsub_numsub(constants.push_channel("left:1"))
        assert numsub == [(constants.push_channel("left:1").encode(), 1)]  # (Redis's way)

        await admin.client_kill_filter(_type="pubsub")  # a new connection leaves it
        await _delivering_again(admin, kept)
        numsub = await admin.pubsub_numsub(constants.push_channel("left:1"))
        assert numsub == [(constants.push_channel("left:1").encode(), 0)]


class _OwnRedis:
    """A Redis server of a test's own (`extra_args`: its ACL), which the test may stop and
    start again on its port (`start_again`), and a hub connected to it as the service's
    (`common.connection.connect`: its connections' handshake makes a CLIENT SETNAME)."""

    def __init__(self, *extra_args: str) -> None:
        self.server = EmbeddedRedis(extra_args=list(extra_args)).start()
        self.redis = connect(self.server.url, name="websocket")
        self.hub = ChannelHub(self.redis)
        self.clients: list[aioredis.Redis] = []

    def start_again(self, *extra_args: str) -> None:
        """Start the server again (stopped by the test) on its port, with `extra_args`."""
        self.server = EmbeddedRedis(port=self.server.port, extra_args=list(extra_args)).start()

    def client(self, **kwargs: Any) -> aioredis.Redis:
        """A client of the test's (`kwargs`: `aioredis.Redis`'s), closed at the end."""
        client = aioredis.Redis(port=self.server.port, **kwargs)
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def _own_redis(*extra_args: str) -> AsyncIterator[_OwnRedis]:
    """An `_OwnRedis`; then its hub closed, its clients, and its server stopped."""
    own = _OwnRedis(*extra_args)
    try:
        yield own
    finally:
        await own.hub.close()
        await own.redis.aclose()
        for client in own.clients:
            await client.aclose()
        own.server.stop()


class _Connection:
    """What a session needs of its connection (`websocket.client.ClientProtocol`) here."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.failed: list[tuple[int, str]] = []

    def send(self, frame: str) -> None:
        self.frames.append(frame)

    def fail(self, code: int, reason: str) -> None:
        self.failed.append((code, reason))


def _ignore(frame: str) -> None:
    pass


def _session(hub: ChannelHub) -> tuple[Session, _Connection]:
    """A session of a user whose scopes reach any channel, on a `_Connection`."""
    conn = _Connection()
    ctx = SimpleNamespace(hub=hub, settings=SimpleNamespace(ws_max_subscriptions=10),
                          connections=Connections(10))  # fmt: skip
    session = Session(cast("WsContext", ctx), cast("ClientProtocol", conn))
    session.principal = Principal("user", "u1", "alice", frozenset(), frozenset({"*"}))
    return session, conn


async def _ask(session: Session, message: dict[str, Any]) -> None:
    """Hand `session` a client's `message`; return once it is answered."""
    session.received(json.dumps(message))
    if session.worker is not None:
        await asyncio.wait_for(session.worker, 10)


async def _narrow(admin: aioredis.Redis, *channels: str) -> None:
    """Leave the hub's Redis user (default) only the push `channels` (patterns), and
    drop its connections (Redis 6.2 and later drop those subscribed to a channel the
    change leaves out on their own)."""
    patterns = [f"&{constants.push_channel(c)}" for c in channels]
    await admin.execute_command("ACL", "SETUSER", "default", "resetchannels", *patterns)
    await admin.client_kill_filter(_type="pubsub", skipme=True)


def _logged(caplog: pytest.LogCaptureFixture, message: str) -> bool:
    return bool(_records(caplog, message))


def _records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.getMessage() == message]


def _not_json(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


async def _delivering_again(admin: aioredis.Redis, kept: asyncio.Queue[str]) -> None:
    """Until a message published on channel "kept" reaches the hub's subscriber `kept`
    again: then the reconnect has subscribed all it does."""

    async def delivered() -> bool:
        await admin.publish(constants.push_channel("kept"), "back")
        with contextlib.suppress(TimeoutError):
            return json.loads(await asyncio.wait_for(kept.get(), 1))["data"] == "back"
        return False

    await wait_for_async(delivered, timeout=15)
