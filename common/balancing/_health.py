"""Passive health: outlier ejection of upstream instances (`HealthBook`).

Every request to an instance reports its outcome: a fatal failure (the callers
report connect errors as fatal) ejects the instance at once, a streak of failures
(3 by default: the gateway counts 5xx answers and timeouts, since one slow answer
does not make an instance dead) ejects it. An ejection lasts a backoff that doubles with each
consecutive ejection (1 s, 2 s, 4 s ... up to 30 s). When it ends, exactly one
request is let through as a trial: success re-admits the instance and resets its
backoff, failure ejects it again. A trial that never reports back (cancelled
request) is forgotten after `trial_timeout`, so an instance can never stay stuck
ejected. Active checks (the gateway's `ActiveChecker`) report through
`active_result`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from common.log import get_logger
from common.registry import InstanceRecord

log = get_logger("switchboard.health")

T = TypeVar("T", bound=InstanceRecord)


@dataclass(slots=True)
class _State:
    failures: int = 0  # consecutive 5xx
    ejected_until: float = 0.0
    backoff: float = 0.0  # next ejection's length; 0 = base
    trial_started: float | None = None
    active_down: bool = False
    active_fails: int = 0
    active_passes: int = 0


class HealthBook:
    """Per-instance health, shared by every request of one gateway process."""

    def __init__(
        self,
        *,
        failures_to_eject: int = 3,
        base_ejection: float = 1.0,
        max_ejection: float = 30.0,
        trial_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures_to_eject = failures_to_eject
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.trial_timeout = trial_timeout
        self.clock = clock
        self._states: dict[str, _State] = {}

    def _state(self, instance_id: str) -> _State:
        state = self._states.get(instance_id)
        if state is None:
            state = self._states[instance_id] = _State()
        return state

    def usable(self, candidates: Sequence[T]) -> list[T]:
        """The candidates a request may go to now (hot path: dict lookups only).

        An instance whose ejection just ended is included once, as the trial.
        """
        now = self.clock()
        out = []
        for record in candidates:
            state = self._states.get(record.instance_id)
            if state is None:
                out.append(record)
            elif state.active_down:
                continue
            elif state.ejected_until <= now and state.trial_started is None:
                out.append(record)
            elif (
                state.ejected_until <= now
                and state.trial_started is not None
                and now - state.trial_started > self.trial_timeout
            ):
                state.trial_started = None  # the trial never reported: allow another
                out.append(record)
        return out

    def is_ejected(self, instance_id: str) -> bool:
        state = self._states.get(instance_id)
        return state is not None and (state.ejected_until > self.clock() or state.active_down)

    def started(self, instance_id: str) -> None:
        """A request is going to this instance (marks the trial after an ejection)."""
        state = self._states.get(instance_id)
        if state is not None and state.backoff and state.trial_started is None:
            state.trial_started = self.clock()

    def succeeded(self, instance_id: str) -> None:
        state = self._states.get(instance_id)
        if state is not None:
            state.failures = 0
            state.backoff = 0.0
            state.trial_started = None
            state.ejected_until = 0.0

    def failed(self, instance_id: str, *, fatal: bool) -> None:
        """`fatal`: connect error or timeout (eject now); otherwise a 5xx (eject on a streak)."""
        state = self._state(instance_id)
        state.failures += 1
        trial = state.trial_started is not None
        state.trial_started = None
        if fatal or trial or state.failures >= self.failures_to_eject:
            self._eject(instance_id, state)

    def _eject(self, instance_id: str, state: _State) -> None:
        length = state.backoff or self.base_ejection
        state.ejected_until = self.clock() + length
        state.backoff = min(length * 2, self.max_ejection)
        state.failures = 0
        log.warning(
            "upstream ejected", extra={"fields": {"instance": instance_id, "seconds": length}}
        )

    def active_result(self, instance_id: str, ok: bool, *, fall: int, rise: int) -> None:
        state = self._state(instance_id)
        if ok:
            state.active_fails = 0
            state.active_passes += 1
            if state.active_passes >= rise and (state.active_down or state.ejected_until):
                state.active_down = False
                self.succeeded(instance_id)
        else:
            state.active_passes = 0
            state.active_fails += 1
            if state.active_fails >= fall:
                state.active_down = True

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the state of instances that are gone from the registry."""
        alive = set(keep)
        for instance_id in list(self._states):
            if instance_id not in alive:
                del self._states[instance_id]
