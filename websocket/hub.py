"""Push channels: one Redis pub/sub subscription per channel per process, fanned out locally.

Clients subscribe by a short channel name (`iptv:now:7`); the hub subscribes to
the Redis channel behind it (`constants.push_channel`) when the first local
subscriber arrives and unsubscribes when the last one leaves, so Redis sees one
subscription per channel per process however many clients listen. A published
message is encoded once, as the text frame
`{"type": "message", "channel": "iptv:now:7", "data": <the payload>}` (the
payload parsed as JSON when it is JSON, strictly (`common.codec.parse_json`: `NaN` or
`1e400` is not), else as a string), and handed to each
subscriber's connection (`websocket.client`: written at once, or queued, bounded,
behind a full socket buffer), never waiting on any of them.

If the pub/sub connection drops, the hub subscribes its channels again when redis-py
reconnects; messages published meanwhile are lost (pub/sub keeps no history). Only
the channels that have a subscriber here then are subscribed again, each with a
SUBSCRIBE of its own (why: `websocket.hub_pubsub`). Should a message come all the
same on a channel with no subscriber here (one left as the message was on its way),
the hub leaves it then.

A channel whose UNSUBSCRIBE Redis refuses (an error reply: its ACL user lacks the
command) is left here all the same, and Redis keeps it subscribed, and sends its
messages on: the hub drops them, and does not answer each with an UNSUBSCRIBE again
(it did: refused again each time, and logged each time); it logs the refusal once
(`push channel unsubscribe refused by redis`, with the channels), and the next
connection leaves the channel. (Redis checks no channel ACL on an UNSUBSCRIBE, seen
on Redis 6.2: a channel the ACL lost is left all the same.)

Only the reader connects again; the hub writes its commands itself, at once, on the
connection as it is ready, and not at all while it is down or being made again
(`websocket.hub_pubsub`): an UNSUBSCRIBE then is the reconnect's to do (it leaves
what it does not subscribe), a SUBSCRIBE too (the channel is the hub's from before
its command, so the reconnect subscribes it, and its reply answers the subscribe
waiting). A subscribe while Redis is down raises once the reader's reconnect fails
(the session answers `service_unavailable`), and nothing of it is kept.

A channel Redis refuses as the hub subscribes it again (its user lost it while the
hub was subscribed: an ACL changed at runtime) is the only one silent: the hub leaves
it (a later subscribe asks Redis again), logs it (`push channel refused by redis`,
with its subscriber count; 10 a minute, then a count), and tells each of its
subscribers (`Refused`: the session sends the client an error frame,
`subscribe_refused`, naming the channel).

A channel's first subscribe waits for Redis's reply to its SUBSCRIBE (read by the
reader: `_answered`), at most `SUBSCRIBE_TIMEOUT`: an error reply (NOPERM from an ACL
user whose channel patterns leave the channel out, say) raises it, and nothing of
that subscribe is kept (the session answers it with an error frame, and goes on).
redis-py only sends the command: the reply came to the reader, which logged it as a
failure of its own, while the client had been told `subscribed` and the hub kept a
channel that never delivered. The reader matches each reply to its command (an
error reply names neither its command nor its channel: `websocket.hub_pubsub`).
Subscribes wait under the hub's lock, one at a time; the reader never waits on that
lock (what it leaves, it leaves at once: an UNSUBSCRIBE waits for nothing), or a
subscribe waiting for the reader would wait for good. A message the reader reads
between the reply and the subscriber's being added is not delivered: it raced the
subscribe, whose `subscribed` answer has not gone yet.

A subscriber that leaves (`unsubscribe`; `drop`, a closed connection's every
channel) is removed here first, at once: nothing is delivered to it after, whatever
the Redis calls that follow do. Unsubscribing in Redis is best effort: the connection
down, the reconnect leaves the channel (above).

One subscriber never stops delivery to the others: a `deliver` that raises (a bug)
is logged (`push delivery failed`, with the traceback) and dropped from its channel,
and the rest of the fan-out goes on (a `Refused` that raises, likewise: `push refusal
failed`). Any other unexpected error of the reader is
logged once (`push channel reader failed`) and reading goes on; should the reader
task end all the same, that is logged (`push channel reader ended`) and it is
started again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from common import constants
from common.aio import cancel_and_wait, cancelling
from common.codec import parse_json
from common.connection import REDIS_DOWN_ERRORS, as_text
from common.log import get_logger
from common.log_budget import LogBudget
from common.outage import Outage
from websocket.hub_pubsub import REPLIES, HubPubSub

log = get_logger("websocket.hub")

CHANNEL = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# How long a channel's first subscribe waits for Redis's reply (module docstring).
SUBSCRIBE_TIMEOUT = 5.0

# What a subscriber is to the hub: a function taking the encoded frame.
Deliver = Callable[[str], object]
# What a subscriber may be told besides: that Redis refused its channel when the hub
# subscribed it again (a reconnect); called with the channel, then no longer subscribed.
Refused = Callable[[str], object]


class ChannelHub:
    """Local subscribers per channel over one Redis pub/sub connection."""

    def __init__(self, redis: aioredis.Redis) -> None:
        # Per channel, its subscribers and what each is told if Redis refuses it later.
        self._subscribers: dict[str, dict[Deliver, Refused | None]] = {}
        self._pubsub = HubPubSub(redis, self._subscribers)
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        # The Redis channel whose SUBSCRIBE awaits its reply, and what the reply settles.
        self._answer: tuple[str, asyncio.Future[None]] | None = None
        self._refusals = LogBudget(log, "push channel refusals not logged", logging.WARNING, {})
        self._closed = False

    def channels(self) -> list[str]:
        return sorted(self._subscribers)

    async def subscribe(
        self, channel: str, deliver: Deliver, refused: Refused | None = None
    ) -> None:
        """Deliver `channel`'s messages to `deliver` (subscribing in Redis if it is the
        first). Raises what Redis answered when it refuses (a `ResponseError`), or the
        connection's error (`REDIS_DOWN_ERRORS`; `TimeoutError` when no reply came).
        Should Redis refuse the channel later (a reconnect's SUBSCRIBE: the ACL changed),
        `deliver` is no longer subscribed to it, and `refused(channel)` is called."""
        async with self._lock:
            subscribers = self._subscribers.get(channel)
            if subscribers is None:
                await self._subscribe(channel)
                subscribers = self._subscribers[channel]
            subscribers[deliver] = refused

    async def _subscribe(self, channel: str) -> None:
        """SUBSCRIBE `channel` in Redis and wait for the reply (the lock held). Meanwhile
        the channel is the hub's with no subscriber: nothing is delivered, and a
        reconnect subscribes it (`HubPubSub.on_connect` reads `_subscribers`); so a
        connection down or being made again as it is sent, the SUBSCRIBE not written,
        is subscribed by the reconnect, whose reply answers it (or whose failure)."""
        name = constants.push_channel(channel)
        answer = asyncio.get_running_loop().create_future()
        self._answer = (name, answer)
        self._subscribers[channel] = {}
        try:
            if self._pubsub.live_connection() is None:
                await self._pubsub.open()  # (which subscribes it)
            else:
                self._pubsub.send("SUBSCRIBE", name)
            if self._reader is None:
                self._start_reader()
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await answer
        except BaseException:
            # Not subscribed again on a reconnect; should Redis have subscribed it after
            # all, its first message finds no subscriber, and the hub leaves it then.
            self._subscribers.pop(channel, None)
            raise
        finally:
            self._answer = None

    def _answered(self, name: str | None, error: Exception | None = None) -> bool:
        """The reader's news for the SUBSCRIBE awaiting its reply: Redis's reply to the
        SUBSCRIBE of `name`, a confirmation or `error`; or, `name` None, the connection
        lost (`error`), which no reply follows. Whether that SUBSCRIBE was waiting for it."""
        waiting = self._answer
        if waiting is None or waiting[1].done():
            return False
        if name is not None and name != waiting[0]:
            return False  # another channel's (a reconnect's, one given up on)
        if error is not None:
            waiting[1].set_exception(error)
        else:
            waiting[1].set_result(None)
        return True

    def _refused(self, name: str, error: ResponseError) -> None:
        """Redis refused a SUBSCRIBE of `name` that nothing waits for: a reconnect's (the
        ACL changed while the channel was subscribed; or one given up on). The channel
        is left here, so that the next subscribe asks Redis again, and each subscriber
        is told (`Refused`); the others deliver on."""
        channel = _local(name)
        subscribers = self._subscribers.pop(channel, None)
        if not subscribers:  # left, or its subscribe given up on: nobody to tell
            return
        if self._refusals.spend():
            fields = {"channel": channel, "subscribers": len(subscribers), "error": str(error)}
            log.warning("push channel refused by redis", extra={"fields": fields})
        for refused in subscribers.values():
            try:
                if refused is not None:
                    refused(channel)
            except Exception:  # a bug in one must not keep the others from being told
                log.exception("push refusal failed", extra={"fields": {"channel": channel}})

    def unsubscribe(self, channel: str, deliver: Deliver) -> None:
        """Stop delivering `channel` to `deliver`, at once; then, if it was the last,
        unsubscribe in Redis (best effort, never raises: `_leave`). As `drop`."""
        self.drop([channel], deliver)

    def drop(self, channels: Iterable[str], deliver: Deliver) -> None:
        """Stop delivering `channels` to `deliver` (a closed connection's), at once and
        whatever Redis does; those it was the last subscriber of are unsubscribed in
        Redis (as `unsubscribe`)."""
        emptied = [channel for channel in channels if self._forget(channel, deliver)]
        if emptied:
            self._leave(emptied)

    def _leave(self, channels: list[str]) -> None:
        """UNSUBSCRIBE `channels` (none has a subscriber here), written at once; not
        when the connection is down or being made again: the reconnect leaves them,
        subscribing only the channels of `_subscribers` (`HubPubSub.send`)."""
        self._pubsub.send("UNSUBSCRIBE", *(constants.push_channel(c) for c in channels))

    def _forget(self, channel: str, deliver: Deliver) -> bool:
        """Remove `deliver` from `channel`'s subscribers; whether it was the last."""
        subscribers = self._subscribers.get(channel)
        if subscribers is None or deliver not in subscribers:
            return False
        del subscribers[deliver]
        if subscribers:
            return False
        del self._subscribers[channel]
        return True

    async def close(self) -> None:
        self._closed = True
        self._answered(None, RedisConnectionError("the push hub is closed"))  # (no reader now)
        await cancel_and_wait(self._reader)
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        self._refusals.flush()

    def _start_reader(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="push-hub")
        self._reader.add_done_callback(self._reader_ended)

    def _reader_ended(self, task: asyncio.Task[None]) -> None:
        """Only `close` should end the reader: otherwise every subscriber of this process
        would stop receiving, /health none the wiser. Say so, and start it again."""
        if self._closed or task is not self._reader:
            return
        error = "cancelled" if task.cancelled() else repr(task.exception())
        log.error("push channel reader ended", extra={"fields": {"error": error}})
        self._start_reader()

    async def _read(self) -> None:
        outage = Outage(log, "push channel connection lost", "push channel connection back")
        broken = Outage(log, "push channel reader failed", "push channel reader back")
        while not cancelling():
            try:
                message = await self._pubsub.get_message(timeout=1.0)
                outage.recovered()
                if message is not None:
                    kind = message.get("type")
                    if kind == "message":
                        self._fan_out(_local(message["channel"]), message["data"])
                    elif kind in REPLIES:
                        channel = message["channel"]  # (None: a pong)
                        name = None if channel is None else as_text(channel)
                        self._pubsub.replied(kind, name)
                        if kind == "subscribe":
                            self._answered(name)
                broken.recovered()
            except REDIS_DOWN_ERRORS as exc:
                self._answered(None, exc)  # (a reconnect may subscribe it: asked again)
                outage.failed(exc)
                await asyncio.sleep(0.5)
            except ResponseError as exc:
                if self._error_read(exc, broken):
                    await asyncio.sleep(0.5)
            except Exception as exc:  # a bug: logged once, and the others still get theirs
                broken.failed(exc)
                await asyncio.sleep(0.5)

    def _error_read(self, exc: ResponseError, broken: Outage) -> bool:
        """An error the reader's read raised: Redis's reply to the oldest command still
        unanswered on the connection (Redis answers in order: `HubPubSub.sent`), or,
        the connection closed, a reconnect's handshake refused (which no reply follows).
        Whether the reader pauses: an error that answers no command may come again at
        once (a handshake refused again)."""
        connection = self._pubsub.live_connection()
        if connection is None or not connection.is_connected:
            self._answered(None, exc)  # (as a connection lost: asked again)
            broken.failed(exc)
            return True
        sent = self._pubsub.error_replied()
        if sent is not None and sent.kind == "subscribe":
            for name in sent.names:  # (one: the hub subscribes a channel a command)
                if not self._answered(name, exc):
                    self._refused(name, exc)
            return False
        if sent is not None and sent.kind == "unsubscribe":
            self._unsubscribe_refused(sent.names, exc)
            return False
        broken.failed(exc)  # a PING's refusal: said once
        return sent is None

    def _unsubscribe_refused(self, names: list[str], error: ResponseError) -> None:
        """Redis refused the UNSUBSCRIBE of `names` (its ACL user lacks the command, say):
        it keeps them subscribed, and delivers their messages still. Left here all the
        same, with no subscriber; their messages are dropped, not each answered with an
        UNSUBSCRIBE again (Redis refusing each: 20 messages, 20 refusals, each logged).
        The next connection leaves them (it subscribes only the hub's channels); so does
        an UNSUBSCRIBE that works (one leaving the channel again, later). Logged once
        a refusal (10 a minute, then a count)."""
        self._pubsub.unleft.update(names)
        if self._refusals.spend():
            fields = {"channels": [_local(name) for name in names], "error": str(error)}
            log.warning("push channel unsubscribe refused by redis", extra={"fields": fields})

    def _fan_out(self, channel: str, payload: bytes | str) -> None:
        subscribers = self._subscribers.get(channel)
        if subscribers is None:  # left as this message was on its way, or Redis refused to
            if constants.push_channel(channel) not in self._pubsub.unleft:
                self._leave([channel])
            return
        if not subscribers:  # its subscribe is not answered yet: nobody is told of it
            return
        frame = encode(channel, payload)
        failed: list[Deliver] | None = None
        for deliver in list(subscribers):
            try:
                deliver(frame)
            except Exception:  # a bug in one connection must not stop the fan-out
                log.exception("push delivery failed", extra={"fields": {"channel": channel}})
                failed = [*(failed or ()), deliver]
        for deliver in failed or ():
            self.drop([channel], deliver)


def encode(channel: str, payload: bytes | str) -> str:
    """The text frame a subscriber receives for one published payload."""
    text = as_text(payload)
    data: Any
    try:  # strictly: `NaN` or `1e400` would go out as NaN or Infinity, which is not JSON
        data = parse_json(text, lone_surrogates=True)
    except ValueError:
        data = text
    return json.dumps({"type": "message", "channel": channel, "data": data})


_PREFIX = len(constants.push_channel(""))


def _local(name: bytes | str) -> str:
    """The hub's name of a Redis push channel (`constants.push_channel`'s inverse)."""
    return as_text(name)[_PREFIX:]
