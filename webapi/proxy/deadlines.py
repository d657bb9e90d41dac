"""`Deadlines`: many rarely-firing timeouts checked by one periodic sweep.

Every proxied request needs a timeout on its upstream exchange, and almost none
fires. A timer of the event loop per exchange costs about 2.7 µs to start and
cancel here (uvloop's, measured 2026-11-21), a few percent of the gateway's
whole CPU per request on the fast path; an entry in a dict costs a tenth of that.
One timer per pool sweeps the dict every `resolution` seconds while anything is
due, so a timeout fires at most `resolution` late: far below any timeout the
proxy has (the shortest the policy allows is 10 ms; the defaults are seconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

RESOLUTION = 0.05  # seconds: how late a deadline may fire


class Deadlines:
    """Callbacks due at loop times; `set` (re)arms one per key, `clear` disarms it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = RESOLUTION) -> None:
        self._loop = loop
        self._resolution = resolution
        self._due: dict[object, tuple[float, Callable[[], None]]] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def set(self, key: object, when: float, callback: Callable[[], None]) -> None:
        """Call `callback()` once `loop.time()` reaches `when` (replacing `key`'s entry)."""
        self._due[key] = (when, callback)
        if self._sweep_handle is None:
            self._sweep_handle = self._loop.call_later(self._resolution, self._sweep)

    def clear(self, key: object) -> None:
        self._due.pop(key, None)

    def _sweep(self) -> None:
        self._sweep_handle = None
        now = self._loop.time()
        fired = [(key, callback) for key, (when, callback) in self._due.items() if when <= now]
        for key, callback in fired:
            # A callback may have re-armed or cleared another entry meanwhile.
            entry = self._due.get(key)
            if entry is not None and entry[1] is callback and entry[0] <= now:
                del self._due[key]
                callback()
        if self._due and self._sweep_handle is None:
            self._sweep_handle = self._loop.call_later(self._resolution, self._sweep)

    def close(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        self._due.clear()
