"""Upstream health for the reverse proxy: passive outlier ejection and active checks.

Passive (every proxied request reports its outcome) is `HealthBook`, shared
with the websocket service and so kept in `common.balancing`: a connect error
ejects the instance at once, a streak of 5xx answers or timeouts ejects it,
with a doubling backoff and a single trial request to re-admit it.

Active (instances that registered a `health_path`): a GET every `interval`;
`fall` consecutive failures mark the instance down, `rise` consecutive passes
mark it up again and also clear any passive ejection: a healthy instance is
re-admitted even if no request would have tried it. A check passes on a status
below 400, read from the response head: its body is not read (a health path that
streams, an event stream by mistake, must not hold the check open), and the whole
check has `timeout` to end. So a round of checks ends within `timeout`, whatever
one instance does, and every instance is checked every `interval` or so.

A check that cannot even be made (a health path no URL can hold, read from a record
written before heartbeats were checked, say) is a failed check of that instance,
logged once until a check of it is made again; a round that fails as a whole is
logged and the next one runs at its time: one instance never stops the checks of
the others.
"""

from __future__ import annotations

import asyncio

import httpx

from common.aio import cancelling
from common.balancing import HealthBook
from common.instance_record import InstanceRecord
from common.log import get_logger
from common.registry_view import RegistryView
from webapi.heartbeats import valid_health_path

log = get_logger("webapi.health")

__all__ = ["ActiveChecker", "HealthBook"]


class ActiveChecker:
    """GETs each instance's `health_path` every `interval` and reports to the book."""

    def __init__(
        self,
        view: RegistryView,
        book: HealthBook,
        *,
        interval: float = 2.0,
        timeout: float = 1.0,
        fall: int = 2,
        rise: int = 2,
    ) -> None:
        self.view, self.book = view, book
        self.interval, self.fall, self.rise = interval, fall, rise
        self.timeout = timeout
        self.client = httpx.AsyncClient(timeout=timeout)
        self._limit = asyncio.Semaphore(32)
        # (service, instance id) of the instances whose check could not be made (logged).
        self._unchecked: set[tuple[str, str]] = set()
        self._round_failed = False

    async def run(self) -> None:
        while not cancelling():
            try:
                await self.check_all()
            except Exception as exc:  # (a cancellation is not an Exception: it ends the loop)
                if not self._round_failed:
                    log.error("active health round failed", extra={"fields": {"error": repr(exc)}})
                self._round_failed = True
            else:
                self._round_failed = False
            await asyncio.sleep(self.interval)

    async def check_all(self) -> None:
        live = [r for service in self.view.services() for r in self.view.instances(service)]
        self._unchecked.intersection_update((r.service, r.instance_id) for r in live)
        checked = [r for r in live if r.kind in ("http", "ws") and r.health_path and r.address]
        self.book.forget(live, checked)  # (an instance no longer checked: its verdict too)
        await asyncio.gather(*(self._check(r) for r in checked))

    async def _check(self, record: InstanceRecord) -> None:
        key = (record.service, record.instance_id)
        url = f"http://{record.address}{record.health_path}"
        async with self._limit:
            try:
                if not valid_health_path(record.health_path):
                    raise ValueError("invalid health_path")  # (httpx would send some of them)
                async with asyncio.timeout(self.timeout):
                    async with self.client.stream("GET", url) as response:
                        ok = response.status_code < 400  # (closing drops the body unread)
            except (httpx.HTTPError, TimeoutError):
                ok = False
                self._unchecked.discard(key)
            except Exception as exc:  # the check could not be made: the instance's fault
                ok = False
                if key not in self._unchecked:
                    self._unchecked.add(key)
                    fields = {"target_service": record.service, "instance": record.instance_id,
                              "error": repr(exc)[:200]}  # fmt: skip
                    log.warning("health check could not be made", extra={"fields": fields})
            else:
                self._unchecked.discard(key)
        self.book.active_result(record, ok, fall=self.fall, rise=self.rise)

    async def close(self) -> None:
        await self.client.aclose()
