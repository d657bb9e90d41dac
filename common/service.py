"""`Service`: declare a worker service's methods and run it.

```python
svc = Service("iptv")

@svc.method
async def list_channels(category: str | None = None) -> list[dict]: ...

svc.run()  # or: await svc.serve(redis_url)
```

Lifecycle of `serve()`: connect to Redis, publish the method catalog and limits,
run the `on_startup` hooks, take a heartbeat lease, and only then start consuming
(a consumer without a lease would look dead to the other instances' reapers).
The lease is then renewed from a thread (`common.lease.LeaseKeeper`) while the event
loop makes progress: a handler that blocks the loop for a while is warned about,
not taken for dead, unless it blocks past `LOOP_STALL_LIMIT`.
Each of these steps waits out a Redis outage (unreachable, or refusing writes) and
is tried again, logged once ("waiting for redis", then "redis reachable"), so the
hooks must be safe to run again after failing half-way. On SIGTERM/SIGINT it drains: it stops
accepting at once (callers no longer route to it; with no other instance they
get `ServiceUnavailable` immediately), stops reading, finishes in-flight calls
within `SHUTDOWN_GRACE` while keeping its lease, flushes their replies,
deregisters, and runs the `on_shutdown` hooks. Calls still running after the
grace period are handed back: they stay pending and the next reap of another
instance takes them.

While serving, a heartbeat that fails (Redis away or refusing writes) is retried every
0.1 s, not at the next interval: a lease that lapsed in an outage is renewed as soon
as Redis answers, and the worker's read and reply loops, which may be deep in their
backoff, are woken to retry at once. When Redis holds no lease of the instance any
more (restarted without its data), that heartbeat registers it again and the service
publishes its catalog and limits again ("registered again"); the worker's loops make
its consumer groups again themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import constants
from common.aio import background, cancel_and_wait
from common.connection import connect_configured
from common.errors import ConfigError
from common.instance_record import InstanceRecord
from common.lease import LeaseKeeper
from common.log import get_logger, setup_logging
from common.outage import Outage
from common.params import MethodSpec
from common.registry import Registry, new_instance_id
from common.scopes import PRIVILEGED
from common.settings import Settings, exit_on_config_error, get_settings
from common.worker import Worker

log = get_logger("switchboard.service")

F = TypeVar("F", bound=Callable[..., Any])
Hook = Callable[["Service"], Awaitable[None]]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class Service:
    """A worker service: a name, its methods, and the loop that serves them."""

    def __init__(
        self,
        name: str,
        *,
        version: str = "0",
        concurrency: int | None = None,
        max_backlog: int | None = None,
        settings: Settings | None = None,
    ) -> None:
        if not _NAME.fullmatch(name):
            raise ConfigError(f"service name {name!r} must match {_NAME.pattern}")
        if name in PRIVILEGED:  # a privileged scope's: `*` would not reach it
            raise ConfigError(f"service name {name!r} is reserved (a privileged scope)")
        self.name = name
        self.version = version
        # Read at first use, not here: a service is declared at import, and a bad
        # setting must reach `run()`, which reports it in one line.
        self._settings = settings
        self._concurrency = concurrency
        self._max_backlog = max_backlog
        self._accepting = False
        self.instance_id = new_instance_id(name)
        self.methods: dict[str, MethodSpec] = {}
        self.worker: Worker | None = None
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._redis: aioredis.Redis | None = None
        self._republishing: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def settings(self) -> Settings:
        """The settings given, else the process's (`get_settings()`)."""
        if self._settings is None:
            self._settings = get_settings()
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        self._settings = settings

    @property
    def concurrency(self) -> int:
        """Calls run at once by this instance (default `RPC_CONCURRENCY`)."""
        return self._concurrency or self.settings.rpc_concurrency

    @property
    def max_backlog(self) -> int:
        """Calls queued beyond which callers get `Overloaded` (default `RPC_MAX_BACKLOG`)."""
        return self.settings.rpc_max_backlog if self._max_backlog is None else self._max_backlog

    @max_backlog.setter
    def max_backlog(self, max_backlog: int) -> None:
        self._max_backlog = max_backlog

    @overload
    def method(self, fn: F) -> F: ...
    @overload
    def method(self, *, name: str | None = None) -> Callable[[F], F]: ...

    def method(self, fn: F | None = None, *, name: str | None = None) -> Any:
        """Register a handler (async, or sync to run in the thread pool) as `service.<name>`."""

        def register(f: F) -> F:
            method_name = name or f.__name__
            if not _NAME.fullmatch(method_name):
                raise ConfigError(f"method name {method_name!r} must match {_NAME.pattern}")
            if method_name in self.methods:
                raise ConfigError(f"{self.name}.{method_name} is registered twice")
            self.methods[method_name] = MethodSpec(f"{self.name}.{method_name}", f)
            return f

        return register(fn) if fn is not None else register

    def on_startup(self, hook: Hook) -> Hook:
        """Run `hook(service)` once Redis is connected, before any call is taken."""
        self._startup.append(hook)
        return hook

    def on_shutdown(self, hook: Hook) -> Hook:
        """Run `hook(service)` after the last call has been answered."""
        self._shutdown.append(hook)
        return hook

    @property
    def redis(self) -> aioredis.Redis:
        """The service's Redis client (available from the startup hooks on)."""
        if self._redis is None:
            raise RuntimeError(f"{self.name} is not serving yet")
        return self._redis

    def request_stop(self) -> None:
        """Begin graceful shutdown (what SIGTERM does)."""
        self._stop.set()

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT, with JSON logging set up: the entry point of `__main__`.

        A `ConfigError` (a bad setting, or one a startup hook refuses) ends the process
        with one line on stderr and exit status 1.
        """
        with exit_on_config_error(self.name):
            self.settings.require_redis_url()
            setup_logging(self.name, self.settings.log_level)
            asyncio.run(self._run_with_signals())

    async def _run_with_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.serve()

    async def serve(self, redis_url: str | None = None) -> None:
        """Serve calls until `request_stop()`; then shut down gracefully."""
        self._stop = asyncio.Event()
        url = redis_url or self.settings.require_redis_url()
        self._redis = connect_configured(self.settings, url, name=self.instance_id)
        lease: LeaseKeeper | None = None
        registry = Registry(self._redis, self.settings.heartbeat_ttl)
        record = InstanceRecord(self.name, self.instance_id, kind="rpc", version=self.version)
        try:
            # Each step waits out a Redis outage (or Redis refusing writes) and is tried
            # again, so a Redis blip during start-up delays it instead of ending the
            # process. Every step is idempotent: a retried one may have half-happened.
            outage = Outage(log, "waiting for redis", "redis reachable")
            catalog = {n: spec.describe() for n, spec in self.methods.items()}
            limits = constants.limits_key(self.name)
            # What Redis must hold of the service: published again should Redis lose it
            # (restarted without its data: the lease thread finds its lease gone).
            published: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("catalog", lambda: registry.publish_catalog(self.name, catalog)),
                ("limits", lambda: self.redis.hset(limits, "max_backlog", str(self.max_backlog))),
            ]
            steps = [("ping", self._redis.ping), *published]
            for hook in self._startup:
                steps.append((f"startup hook {_name_of(hook)}", functools.partial(hook, self)))
            for step, run in steps:
                if not await self._until_done(step, run, outage):
                    return
            self.worker = Worker(
                self._redis,
                self.name,
                self.instance_id,
                self.methods,
                concurrency=self.concurrency,
                thread_pool=self.settings.rpc_thread_pool,
                dedup_window=self.settings.rpc_dedup_window,
                reap_interval=self.settings.heartbeat_interval,
                lease_ttl=self.settings.heartbeat_ttl,
                retry_delay=self.settings.task_retry_delay,
                dead_letter_cap=self.settings.dead_letter_cap,
                max_deliveries=self.settings.rpc_max_deliveries,
                max_payload=self.settings.rpc_max_payload_bytes,
            )
            self._accepting = True
            if not await self._until_done("heartbeat", lambda: registry.heartbeat(record), outage):
                return
            # Renewed from a thread from now on: a handler blocking the loop for a while
            # does not make this instance look dead (common.lease).
            lease = LeaseKeeper(
                url,
                record,
                ttl=self.settings.heartbeat_ttl,
                interval=self.settings.heartbeat_interval,
                stall_limit=self.settings.loop_stall_limit,
                accepting=lambda: self._accepting,
                handlers={name: spec.fn for name, spec in self.methods.items()},
                on_renewed=self._redis_answered,
                on_registered=lambda: self._publish_again(published),
            )
            lease.start()
            if not await self._until_done("consumer groups", self.worker.start, outage):
                return
            log.info(
                "serving",
                extra={"fields": {"instance": self.instance_id, "methods": sorted(self.methods)}},
            )
            await self._stop.wait()
            log.info("shutting down", extra={"fields": {"instance": self.instance_id}})
        finally:
            self._accepting = False
            try:
                with contextlib.suppress(RedisError, OSError):  # the lease ends by itself
                    await registry.heartbeat(record, accepting=False)
                if self.worker is not None:
                    await self.worker.stop(self.settings.shutdown_grace)
            finally:
                if lease is not None:  # first thing, even if cancelled: a lease left
                    await lease.stop()  # renewed would hold calls nobody runs
                await cancel_and_wait(self._republishing)
            with contextlib.suppress(RedisError, OSError):  # no heartbeat may follow this
                await registry.deregister(self.name, self.instance_id)
            for hook in self._shutdown:
                await hook(self)
            await self._redis.aclose()
            self._redis = None

    def _redis_answered(self) -> None:
        """The lease thread's heartbeat got through after failing: the worker's loops,
        possibly deep in their backoff, try again now."""
        if self.worker is not None:
            self.worker.redis_answered()

    def _publish_again(self, published: list[tuple[str, Callable[[], Awaitable[Any]]]]) -> None:
        """The lease thread registered the instance again (Redis had lost its lease, and
        with it, likely, the catalog and limits): publish them again, in a task. Not
        once draining: the instance is leaving (and the task would outlive `serve()`)."""
        if not self._accepting:
            return
        log.info("registered again", extra={"fields": {"instance": self.instance_id}})
        if self._republishing is None or self._republishing.done():
            self._republishing = background(
                self._publish(published), name=f"{self.name}-publish-again"
            )

    async def _publish(self, published: list[tuple[str, Callable[[], Awaitable[Any]]]]) -> None:
        outage = Outage(log, "publishing again failed", "published again")
        for step, run in published:
            if not await self._until_done(step, run, outage):
                return

    async def _until_done(
        self, step: str, run: Callable[[], Awaitable[Any]], outage: Outage
    ) -> bool:
        """Run one start-up step until Redis lets it finish (False if asked to stop meanwhile).

        A Redis error (unreachable, or refusing the step: OOM, a read-only replica) is
        waited out with a backoff, logged by `outage` once; anything else (a
        `ConfigError` from a hook, a bug) ends the start-up as before.
        """
        delay = 0.1
        while not self._stop.is_set():
            try:
                await run()
                outage.recovered()
                return True
            except (RedisError, OSError) as exc:
                outage.failed(exc, step=step)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 2.0)
        return False


def _name_of(hook: Hook) -> str:
    return f"{getattr(hook, '__module__', '?')}.{getattr(hook, '__qualname__', repr(hook))}"
