"""Writing what a worker finished: the Redis commands for a batch of finished calls.

A batch is written in one pipelined write (`common.worker`), in an order that makes
a crash at any point safe:

1. the replies into the deduplication window (`done` hash of the current bucket),
2. the replies onto each caller's inbox (one RPUSH per inbox),
3. `XACK` + `XDEL` of the entries,

with failed tasks' retries (a zset) and dead letters (a capped list) before the acks;
all in one transaction (MULTI/EXEC), so that Redis takes the acks only with the
writes they follow. Out of memory, Redis refuses every write but not `XACK` and
`XDEL` (they free memory): outside a transaction the entries were acked and deleted
while their replies were refused, and a worker killed while it held those replies
lost calls that had run (their callers waited out their timeouts) instead of leaving
them to be redelivered (at-least-once). In a transaction, a command Redis refuses
discards the whole batch (EXECABORT), entries left pending. A batch of acks alone
(replies dropped past their deadline, `common.outbox`) is written without one: Redis
takes those out of memory.

A batch Redis will not take (`write_apart`): Redis drops the connection of a write
holding a value over its own limit (`proto-max-bulk-len`, set lower than
`RPC_MAX_PAYLOAD_BYTES`), and writing the same batch again would fail forever, the
other calls of the batch never answered. A write that fails while Redis answers a
PING (`common.connection.WriteRefused`) is therefore written again entry by entry; an
entry that fails alone twice, Redis still answering, is answered with `ResultTooLarge`
instead (its retry or dead letter, if a task's, left out), or failing that only acked,
and logged once.

A write Redis refuses for now (`refusal`: out of memory, a read-only replica after a
failover, a failed save, a script running too long, ...: `common.redis_failures`)
is different: Redis answers each refused command with an error reply, the batch is
kept and written again (`common.outbox`), as during an outage.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

from redis.exceptions import ResponseError

from common import constants
from common.connection import RawConnection, WriteRefused
from common.errors import ResultTooLarge
from common.log import get_logger
from common.protocol import error_reply
from common.redis_failures import is_refusal

log = get_logger("switchboard.worker")

# An inbox whose client went away disappears after this long.
INBOX_TTL_SECONDS = 60

_MULTI: tuple[Any, ...] = ("MULTI",)
_EXEC: tuple[Any, ...] = ("EXEC",)


@dataclass(slots=True)
class Finished:
    """A processed entry waiting to be written."""

    stream: str
    entry_id: bytes
    call_id: str | None = None
    inbox: str | None = None
    reply: bytes | None = None
    remember: bool = True  # store the reply in the deduplication window
    retry: tuple[bytes, float] | None = None  # (retry zset member, due epoch ms)
    dead: bytes | None = None  # dead-letter record
    method: str = ""  # the call's, for the log
    # A call's deadline (epoch seconds): no caller waits for its reply after it, so a
    # reply Redis refuses is held no longer (`common.outbox`). None: an ack, or a task's.
    deadline: float | None = None


class ReplyWrites:
    """Builds the commands that write a batch of `Finished` calls of one service."""

    def __init__(self, service: str, bucket_seconds: float, dead_letter_cap: int) -> None:
        self.service = service
        self._bucket_seconds = bucket_seconds
        self.dead_letter_cap = dead_letter_cap
        self._expiry_set: dict[str, float] = {}

    def commands(self, batch: list[Finished]) -> list[tuple[Any, ...]]:
        """The batch's writes, in the crash-safe order of the module docstring."""
        commands: list[tuple[Any, ...]] = []
        remembered: list[Any] = []
        by_inbox: dict[str, list[bytes]] = defaultdict(list)
        by_stream: dict[str, list[bytes]] = defaultdict(list)
        retries: list[Any] = []
        dead: list[bytes] = []
        for done in batch:
            if done.reply is not None:
                if done.remember and done.call_id:
                    remembered += (done.call_id, done.reply)
                if done.inbox:
                    by_inbox[done.inbox].append(done.reply)
            if done.retry is not None:
                retries += (done.retry[1], done.retry[0])
            if done.dead is not None:
                dead.append(done.dead)
            by_stream[done.stream].append(done.entry_id)
        if remembered:
            key = constants.done_key(self.service, int(time.time() // self._bucket_seconds))
            commands.append(("HSET", key, *remembered))
            if self._expire_due(key):
                commands.append(("PEXPIRE", key, int(self._bucket_seconds * 3000)))
        if retries:
            commands.append(("ZADD", constants.retry_key(self.service), *retries))
        if dead:
            key = constants.dead_letter_key(self.service)
            commands.append(("LPUSH", key, *dead))
            commands.append(("LTRIM", key, 0, self.dead_letter_cap - 1))
        for inbox, replies in by_inbox.items():
            commands.append(("RPUSH", inbox, *replies))
            # With every push, not once a second: the client's BLPOP deletes the inbox
            # it empties, so a push may have just made it again, without an expiry.
            commands.append(("EXPIRE", inbox, INBOX_TTL_SECONDS))
        writes = bool(commands)
        for stream, ids in by_stream.items():
            commands.append(("XACK", stream, constants.WORKER_GROUP, *ids))
            commands.append(("XDEL", stream, *ids))
        # The acks only with what they follow (see the module docstring).
        return [_MULTI, *commands, _EXEC] if writes else commands

    def _expire_due(self, key: str) -> bool:
        """Whether to (re)set `key`'s expiry in this batch: at most once a second per key.

        For keys nothing deletes (a deduplication bucket): their expiry only cleans up
        old buckets, so once a second is plenty, and it saves a command per batch on
        the hot path. Not for inboxes: see `commands`.
        """
        now = time.monotonic()
        if now - self._expiry_set.get(key, -1.0) < 1.0:
            return False
        if len(self._expiry_set) > 10_000:
            self._expiry_set.clear()
        self._expiry_set[key] = now
        return True

    async def write(self, conn: RawConnection, batch: list[Finished]) -> list[Any]:
        """Write `batch` in one write on `conn` and return its replies. `WriteRefused`
        when it fails while Redis still answers a PING (`RawConnection.write_failure`):
        Redis will not take it (see the module docstring)."""
        try:
            return await conn.execute(self.commands(batch))
        except Exception as exc:  # any: a bug building the commands is poison too
            raise await conn.write_failure(exc)  # noqa: B904 (exc, or caused by it)

    async def write_apart(
        self, conn: RawConnection, batch: list[Finished]
    ) -> tuple[list[Any], list[Finished], ResponseError | None]:
        """Write `batch`, which Redis refused whole (`WriteRefused`), entry by entry (see
        the module docstring). The replies of what was written, the entries left
        unwritten, and why: Redis stopped answering (None), or it refuses writes for now
        (`refusal`). The caller writes those again as it does during an outage."""
        replies: list[Any] = []
        for i, done in enumerate(batch):
            failure: BaseException | None = None
            instead = _answered_instead(done, self.service)
            for attempt in (done, done, instead, acked_only(done)):
                try:
                    written = await self.write(conn, [attempt])
                except WriteRefused as exc:
                    failure = exc.error
                    continue
                except Exception:  # Redis no longer answers
                    return replies, batch[i:], None
                refused = refusal(written)
                if refused is not None:  # not this entry's fault: it is written again
                    return replies, batch[i:], refused
                replies += written
                if attempt is not done:
                    assert failure is not None
                    _log_refused(done, attempt, failure)
                break
            else:  # not even its ack: left pending (`_log_refused` says so)
                assert failure is not None
                _log_refused(done, None, failure)
        return replies, [], None


def refusal(replies: list[Any]) -> ResponseError | None:
    """The first of a write's `replies` that is Redis refusing writes for now (out of
    memory, a read-only replica, ...: `common.redis_failures.REFUSALS`), if any: the
    write is to be made again. Other error replies (a key of the wrong type) are not."""
    for reply in error_replies(replies):
        if is_refusal(reply):
            return reply
    return None


def error_replies(replies: list[Any]) -> list[ResponseError]:
    """The error replies among a write's `replies`, those of its transactions' commands
    too (each EXEC answers a list of them: no other reply here is a list; `write_apart`
    returns one EXEC's per entry). Empty for a write Redis took whole. Hot path."""
    errors: list[ResponseError] = []
    for reply in replies:
        if type(reply) is list:
            errors += [r for r in reply if isinstance(r, ResponseError)]
        elif isinstance(reply, ResponseError):
            errors.append(reply)
    return errors


def _answered_instead(done: Finished, service: str) -> Finished:
    """`done` with its reply replaced by a `ResultTooLarge` error, without its task
    writes (a retry, a dead letter: large arguments, not a reply, may be what Redis
    refused)."""
    if done.call_id is None or done.reply is None:
        return acked_only(done)
    error = ResultTooLarge.refused(f"{service}.{done.method}", len(done.reply))
    return replace(done, reply=error_reply(done.call_id, error), retry=None, dead=None)


def acked_only(done: Finished) -> Finished:
    """`done` without its writes but its entry's ack (and deletion)."""
    return Finished(done.stream, done.entry_id, method=done.method)


def _log_refused(done: Finished, written: Finished | None, exc: BaseException) -> None:
    """Log what became of an entry Redis refused (`written`: what was written instead)."""
    fields = {"method": done.method, "bytes": len(done.reply or b""),
              "error": str(exc) or type(exc).__name__}  # fmt: skip
    if written is None:
        message = "entry refused by redis, left unwritten"
    elif written.reply is not None:
        message = "reply refused by redis, answered with an error"
    else:
        message = "entry refused by redis, acked without its writes"
    log.error(message, extra={"fields": fields})
