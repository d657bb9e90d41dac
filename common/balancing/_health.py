"""Passive health: outlier ejection of upstream instances (`HealthBook`).

Every request to an instance reports its outcome: a fatal failure (the callers
report connect errors as fatal) ejects the instance at once, a streak of failures
(3 by default: the gateway counts 5xx answers and timeouts, since one slow answer
does not make an instance dead) ejects it. An ejection lasts a backoff that doubles with each
consecutive ejection (1 s, 2 s, 4 s ... up to 30 s). When it ends, exactly one
request is let through as a trial: success re-admits the instance and resets its
backoff, failure ejects it again. A trial that never reports back (cancelled
request) is forgotten after `trial_timeout`, so an instance can never stay stuck
ejected. One incident is one ejection: a failure reported while the instance is
ejected, or by a request that started before its latest ejection (the other requests
in flight when it died or restarted), is not judged again (no new ejection, no
doubling, no log line); the backoff doubles only when the trial fails (a success
resets it). Active checks (the gateway's `ActiveChecker`) report through
`active_result`; their verdict lasts while the instance is checked at the same health
path: `forget` drops it for an instance no longer checked (it heartbeats without a
health path now), and a changed health path starts the count over. What is kept of
an instance gone from the registry is dropped by `forget` (the gateway's checker, once
a round) and by `forget_departed` (at each change of its service's instances).

State is kept per service, then per instance id: an id is an instance's name within
its service (the native heartbeat lets a backend choose it), so two services may
both have a `worker-1`, and ejecting one leaves the other alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from common.instance_record import InstanceRecord
from common.log import get_logger

log = get_logger("switchboard.health")

T = TypeVar("T", bound=InstanceRecord)


@dataclass(slots=True)
class _State:
    failures: int = 0  # consecutive 5xx
    ejected_until: float = 0.0
    ejected_at: float = float("-inf")  # when the latest ejection began
    backoff: float = 0.0  # next ejection's length; 0 = base
    trial_started: float | None = None
    active_down: bool = False
    active_fails: int = 0
    active_passes: int = 0
    active_path: str | None = None  # the health path the active counts are about


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
        # service -> instance id -> state; a service with nothing to say has no entry.
        self._states: dict[str, dict[str, _State]] = {}

    def _state(self, service: str, instance_id: str) -> _State:
        states = self._states.get(service)
        if states is None:
            states = self._states[service] = {}
        state = states.get(instance_id)
        if state is None:
            state = states[instance_id] = _State()
        return state

    def _find(self, service: str, instance_id: str) -> _State | None:
        states = self._states.get(service)
        return None if states is None else states.get(instance_id)

    def usable(self, service: str, candidates: Sequence[T]) -> list[T]:
        """The candidates (instances of `service`) a request may go to now (hot path:
        dict lookups only).

        An instance whose ejection just ended is included once, as the trial.
        """
        states = self._states.get(service)
        if not states:
            return list(candidates)
        now = self.clock()
        out = []
        for record in candidates:
            state = states.get(record.instance_id)
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

    def is_ejected(self, service: str, instance_id: str) -> bool:
        state = self._find(service, instance_id)
        return state is not None and (state.ejected_until > self.clock() or state.active_down)

    def started(self, service: str, instance_id: str) -> None:
        """A request is going to this instance (marks the trial after an ejection)."""
        state = self._find(service, instance_id)
        if state is not None and state.backoff and state.trial_started is None:
            state.trial_started = self.clock()

    def succeeded(self, service: str, instance_id: str) -> None:
        state = self._find(service, instance_id)
        if state is not None:
            state.failures = 0
            state.backoff = 0.0
            state.trial_started = None
            state.ejected_until = 0.0

    def failed(
        self, service: str, instance_id: str, *, fatal: bool, elapsed: float | None = None
    ) -> None:
        """`fatal`: connect error or timeout (eject now); otherwise a 5xx (eject on a streak).

        `elapsed`: how long the failed request took (seconds), which tells a request
        that started before the latest ejection; without it only a failure reported
        during an ejection is recognised as part of it.
        """
        state = self._state(service, instance_id)
        now = self.clock()
        if state.ejected_until > now or (
            elapsed is not None and now - elapsed < state.ejected_at
        ):  # the incident that ejected it: judged already
            return
        state.failures += 1
        trial = state.trial_started is not None
        state.trial_started = None
        if fatal or trial or state.failures >= self.failures_to_eject:
            self._eject(service, instance_id, state, now)

    def _eject(self, service: str, instance_id: str, state: _State, now: float) -> None:
        length = state.backoff or self.base_ejection
        state.ejected_at = now
        state.ejected_until = now + length
        state.backoff = min(length * 2, self.max_ejection)
        state.failures = 0
        fields = {"target_service": service, "instance": instance_id, "seconds": length}
        log.warning("upstream ejected", extra={"fields": fields})

    def active_result(self, record: InstanceRecord, ok: bool, *, fall: int, rise: int) -> None:
        """The outcome of one active check of `record` at its `health_path`."""
        state = self._state(record.service, record.instance_id)
        if state.active_path != record.health_path:  # another check: its own count
            _clear_active(state)
            state.active_path = record.health_path
        if ok:
            state.active_fails = 0
            state.active_passes += 1
            if state.active_passes >= rise and (state.active_down or state.ejected_until):
                state.active_down = False
                self.succeeded(record.service, record.instance_id)
        else:
            state.active_passes = 0
            state.active_fails += 1
            if state.active_fails >= fall:
                state.active_down = True

    def tracked(self) -> int:
        """How many instances this book keeps state for."""
        return sum(len(states) for states in self._states.values())

    def forget_departed(self, service: str, live: Collection[str]) -> None:
        """Drop the state of `service`'s instances not in `live` (instance ids). Not on
        the request path: at each resync of the service's instances (one dict lookup
        when, as usual, nothing is kept of the service)."""
        states = self._states.get(service)
        if states is None:
            return
        for instance_id in [i for i in states if i not in live]:
            del states[instance_id]
        if not states:
            del self._states[service]

    def forget(
        self, live: Iterable[InstanceRecord], checked: Iterable[InstanceRecord] = ()
    ) -> None:
        """Drop the state of instances gone from the registry, and the active checks'
        verdict on live instances not in `checked` (they have no health path now, so no
        check would ever clear it). Not on the request path: once per round of checks."""
        alive: dict[str, set[str]] = {}
        for record in live:
            alive.setdefault(record.service, set()).add(record.instance_id)
        active = {(r.service, r.instance_id): r.health_path for r in checked}
        for service in list(self._states):
            self.forget_departed(service, alive.get(service, ()))
            for instance_id, state in self._states.get(service, {}).items():
                path = active.get((service, instance_id))
                if state.active_path is not None and path != state.active_path:
                    _clear_active(state)


def _clear_active(state: _State) -> None:
    state.active_down = False
    state.active_fails = state.active_passes = 0
    state.active_path = None
