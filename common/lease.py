"""A worker's heartbeat lease, renewed from a thread: a blocked event loop is not a death.

The lease (`common.registry`) says which instance still holds its calls; when it
lapses, another worker's reaper takes them over (`common.redelivery`). Renewed from
the event loop, it lapsed whenever a handler blocked the loop for longer than
`HEARTBEAT_TTL` (a sync client, a CPU-bound model in an `async def`): the call ran a
second time elsewhere while its first run was still going. So a `LeaseKeeper`
renews it from a thread of its own, with a blocking Redis client of its own
(`common.connection.connect_sync`: the same URL, AUTH and TLS), and the loop only has
to show it is alive: a timer stamps the time every `_TICK` seconds. The thread renews
the lease (the same heartbeat script as before: the record, `instances` while
accepting, the direct stream's expiry, pruning the dead) while the loop's last stamp
is recent enough:

- blocked over `_STALL_WARNING` (1 s): one warning per stall, "event loop blocked",
  with how long so far, the handler(s) on the loop's stack and the innermost frame
  (`where`), then an info line "event loop running again" once it is over;
- blocked over `LOOP_STALL_LIMIT` (60 s): the loop is taken for hung, an error is
  logged and the lease is no longer renewed, so its calls are redelivered once it
  lapses, as a dead worker's; renewing starts again if the loop ever comes back.

A heartbeat that fails (Redis away, or refusing writes) is tried again every
`_RETRY` (0.1 s), not at the next interval: a lease that lapsed in an outage is
renewed as soon as Redis answers, and the first heartbeat to get through tells the
loop (`on_renewed`: the worker's loops leave their backoff). One that finds no lease
of its own (Redis restarted without its data) registers the instance again and says
so (`on_registered`: the service publishes its catalog and limits again).

A dead process (SIGKILL, a crash), a stopped one (SIGSTOP stops the thread too) or a
partitioned one still loses its lease within `HEARTBEAT_TTL`. One limit remains: C
code that holds the GIL for seconds stops the thread too, and the lease lapses as it
did before (most numeric libraries release the GIL during long operations).

Cost: the loop runs a timer callback (4 µs) and the thread wakes every `_TICK`
(0.25 s; the thread every `HEARTBEAT_INTERVAL` if that is shorter), and the thread
writes the heartbeat every `HEARTBEAT_INTERVAL`, as the loop did: an idle worker's
CPU went from 1.5 to 2 ms a second (0.05 % of a core more). Nothing is done per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import CodeType, FrameType
from typing import Any

import redis

from common.connection import connect_sync
from common.instance_record import InstanceRecord
from common.log import get_logger
from common.outage import Outage
from common.registry import (
    HEARTBEAT_SCRIPT,
    heartbeat_events_due,
    heartbeat_request,
    queue_heartbeat_events,
)

# The service's logger: the heartbeat's lines are where they were before the thread.
log = get_logger("switchboard.service")

# How often the loop stamps the time, and the thread looks at the stamp (unless
# HEARTBEAT_INTERVAL is shorter), seconds: a stall is measured to within a tick.
# At 0.1 s an idle worker spent twice the CPU on it (measured: 1.4 ms/s, not 0.5).
_TICK = 0.25
# Between heartbeats that failed, seconds: a lease lapsed in an outage is renewed
# within this of Redis answering (each attempt also retries inside redis-py, ~0.3 s).
_RETRY = 0.1
# A loop blocked this long (seconds) gets its warning.
_STALL_WARNING = 1.0
# How long `stop()` waits for the thread's last heartbeat (a Redis call in progress).
_JOIN_TIMEOUT = 10.0
# How many frames of the loop's stack are searched for a handler.
_MAX_FRAMES = 200


class LeaseKeeper:
    """Renews one worker's lease from a thread while its event loop makes progress."""

    def __init__(
        self,
        redis_url: str,
        record: InstanceRecord,
        *,
        ttl: float,
        interval: float,
        stall_limit: float,
        accepting: Callable[[], bool],
        handlers: Mapping[str, Callable[..., Any]] | None = None,
        on_renewed: Callable[[], None] | None = None,
        on_registered: Callable[[], None] | None = None,
    ) -> None:
        """`accepting()`: whether the instance takes calls (read at each heartbeat);
        `handlers`: method name -> handler, to name the one blocking the loop;
        `on_renewed()`, `on_registered()`: run on the loop when a heartbeat gets through
        after failing, and when it finds no lease of this instance (registers it again)."""
        self.redis_url = redis_url
        self.record = record
        self.ttl_ms = int(ttl * 1000)
        self.interval = interval
        self.stall_limit = stall_limit
        self.accepting = accepting
        self.on_renewed = on_renewed
        self.on_registered = on_registered
        self._codes: dict[CodeType, str] = {}
        for name, fn in (handlers or {}).items():
            code = getattr(inspect.unwrap(fn), "__code__", None)
            if code is not None:
                self._codes[code] = name
        self._lock = threading.Lock()  # the stall state below, shared with the loop
        self._stamp = time.monotonic()  # when the loop last ran its tick
        self._warned = False  # this stall has had its warning
        self._gave_up = False  # this stall passed the limit: the lease is left to lapse
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start stamping (on the running loop) and renewing (in the thread)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tick()
        name = f"{self.record.service}-lease"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop renewing (the lease then ends by itself, or by deregistration) once the
        heartbeat in progress, if any, is done."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, _JOIN_TIMEOUT)
            self._thread = None

    # ------------------------------------------------------------------
    # The loop's side
    # ------------------------------------------------------------------
    def _tick(self) -> None:
        """Stamp the time; say so when a stall the thread reported is over."""
        now = time.monotonic()
        with self._lock:
            since, warned, gave_up = self._stamp, self._warned, self._gave_up
            self._stamp, self._warned, self._gave_up = now, False, False
        if warned:
            fields = {"seconds": _blocked(now, since), "lease_given_up": gave_up}
            log.info("event loop running again", extra={"fields": fields})
        assert self._loop is not None
        self._timer = self._loop.call_later(_TICK, self._tick)

    # ------------------------------------------------------------------
    # The thread's side
    # ------------------------------------------------------------------
    def _run(self) -> None:
        timeout = max(self.ttl_ms / 1000, 1.0)  # a heartbeat later than the TTL is late
        client = connect_sync(
            self.redis_url, name=f"{self.record.instance_id}-lease", socket_timeout=timeout
        )
        script = client.register_script(HEARTBEAT_SCRIPT)
        outage = Outage(log, "heartbeat failed", "heartbeat restored")
        next_beat = time.monotonic() + self.interval
        tick = min(_TICK, self.interval)
        failing = False
        try:
            while not self._stop.wait(min(tick, _RETRY) if failing else tick):
                if not self._loop_alive():
                    return  # the loop ended without `stop()`: nothing runs the calls
                now = time.monotonic()
                hung = self._watch(now)
                if now < next_beat:
                    continue
                next_beat = now + self.interval
                if hung:
                    continue
                try:
                    registered = self._beat(client, script)
                except Exception as exc:  # any: a heartbeat that stops unregisters a live worker
                    outage.failed(exc)
                    next_beat = now + min(self.interval, _RETRY)
                    failing = True
                    continue
                if failing:
                    self._on_loop(self.on_renewed)
                if registered:
                    self._on_loop(self.on_registered)
                failing = False
                outage.recovered()
        finally:
            client.close()

    def _on_loop(self, callback: Callable[[], None] | None) -> None:
        """Run `callback` on the event loop (from this thread)."""
        if callback is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(callback)

    def _beat(self, client: redis.Redis, script: Any) -> bool:
        """One heartbeat; another at once if `accepting` changed meanwhile, so a beat
        sent just before a drain began cannot put the instance back among the
        accepting ones after the drain's own beat. True when Redis held no lease of
        this instance (it is registered again)."""
        registered = False
        while True:
            accepting = self.accepting()
            keys, args = heartbeat_request(self.record, self.ttl_ms, accepting)
            result = script(keys=keys, args=args)
            if heartbeat_events_due(result):
                registered = registered or bool(result[0])
                with client.pipeline(transaction=False) as pipe:
                    queue_heartbeat_events(pipe, self.record, result)
                    pipe.execute()
            if self.accepting() == accepting or self._stop.is_set():
                return registered

    def _loop_alive(self) -> bool:
        loop = self._loop
        return loop is not None and loop.is_running() and not loop.is_closed()

    def _watch(self, now: float) -> bool:
        """Log a stall of the loop once as it passes each bound; True past the limit."""
        with self._lock:
            blocked = _blocked(now, self._stamp)
            warn = blocked >= _STALL_WARNING and not self._warned
            give_up = blocked >= self.stall_limit and not self._gave_up
            self._warned = self._warned or warn or give_up
            self._gave_up = self._gave_up or give_up
        fields: dict[str, Any] = {"seconds": blocked}
        if give_up:  # (also this stall's warning, if the limit comes first)
            fields.update(self._on_the_loop(), limit=self.stall_limit)
            log.error(
                "event loop blocked past LOOP_STALL_LIMIT: lease no longer renewed, "
                "its calls go to other instances",
                extra={"fields": fields},
            )
        elif warn:
            fields.update(self._on_the_loop())
            log.warning("event loop blocked", extra={"fields": fields})
        return blocked >= self.stall_limit

    def _on_the_loop(self) -> dict[str, Any]:
        """What the loop's thread is running: the handlers on its stack (innermost
        first) and its innermost frame. Read only when a stall is logged."""
        frame: FrameType | None = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return {}
        where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        methods: list[str] = []
        for _ in range(_MAX_FRAMES):
            if frame is None:
                break
            name = self._codes.get(frame.f_code)
            if name is not None and name not in methods:
                methods.append(name)
            frame = frame.f_back
        return {"methods": methods, "where": where}


def _blocked(now: float, stamp: float) -> float:
    """How long the loop has been blocked at least (seconds, rounded): its next tick
    was due `_TICK` after the last."""
    return round(max(now - stamp - _TICK, 0.0), 1)
