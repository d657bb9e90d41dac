"""The `switchboard` target of `bench.ws`: the websocket service relaying to the echo upstream.

One private redis-server serves the run. The upstream is registered in the
registry as service `echo` (kind `ws`) by heartbeat, re-sent every second from
a thread, as a backend does (tests/support/ws_backend.py). JWTs are signed with
the keyring in that Redis, as the auth service signs them, and the websocket
service (`python -m websocket`, default settings) verifies them at the upgrade.
The memory test (`bench.ws_memory`) starts its own websocket process on the
same Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import free_port, issue_token, python_env, signing_key, spawn, stop_child
from bench.ws_load import run_load, upgrade_status, wait_ws
from bench.ws_targets import RELAY_PATH, SERVICE


class Credentials:
    """Access tokens signed with the keyring the websocket service verifies against."""

    def __init__(self, redis_url: str) -> None:
        self.key = asyncio.run(signing_key(redis_url))

    def token(self, user: str = "bench") -> str:
        """A token for `user` with scope `*`, as a logged-in user gets one."""
        return issue_token(self.key, user, ["user"])


class Heartbeat:
    """Registers the echo upstream as `echo` (kind `ws`) every `interval` seconds, in a thread."""

    def __init__(self, redis_url: str, address: str, interval: float = 1.0) -> None:
        self.redis_url = redis_url
        self.address = address
        self.interval = interval
        self.failures = 0
        self._stop = threading.Event()
        self._first: BaseException | None = None
        self._beating = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        from common.connection import connect
        from common.instance_record import InstanceRecord
        from common.registry import Registry

        client = connect(self.redis_url, name="bench-heartbeat")
        registry = Registry(client, ttl=3.0)
        record = InstanceRecord(SERVICE, "bench-echo", kind="ws", address=self.address)
        try:
            while not self._stop.is_set():
                try:
                    await registry.heartbeat(record)
                except Exception as e:
                    self.failures += 1
                    if not self._beating.is_set():
                        self._first = e
                        return
                self._beating.set()
                await asyncio.sleep(self.interval)
        finally:
            self._beating.set()  # also on failure: start() must not wait for nothing
            await client.aclose()

    def start(self) -> None:
        """Start beating; raises if the first heartbeat fails."""
        self._thread.start()
        self._beating.wait(10)
        if self._first is not None:
            raise RuntimeError(f"the first heartbeat failed: {self._first!r}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(3)


class WsService:
    """One `python -m websocket` process (env REDIS_URL, WEBSOCKET_PORT, BIND_HOST,
    LOG_LEVEL=WARNING); its settings are the service's defaults."""

    def __init__(self, tmp: Path, redis_url: str, log: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = python_env(
            REDIS_URL=redis_url,
            WEBSOCKET_PORT=str(self.port),
            BIND_HOST="127.0.0.1",
            LOG_LEVEL="WARNING",
        )
        self.log = tmp / log
        self.proc = spawn([sys.executable, "-m", "websocket"], self.log, env=env)

    def url(self, path: str) -> str:
        return f"ws://{self.address}{path}"

    def health(self) -> dict[str, Any]:
        """GET /health (also when it answers 503)."""
        try:
            with urllib.request.urlopen(f"http://{self.address}/health", timeout=2) as r:
                body: dict[str, Any] = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
        return body

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"python -m websocket exited with {self.proc.returncode}")
            try:
                body = self.health()
                if body.get("status") == "ok":
                    return
                last = body
            except (OSError, ValueError) as e:
                last = e
            time.sleep(0.1)
        raise RuntimeError(f"python -m websocket not healthy after {timeout}s: {last!r}")

    def stop(self) -> None:
        stop_child(self.proc)


class Switchboard:
    """What the switchboard target and the memory test share: the redis-server,
    the signing key and the upstream's registration."""

    def __init__(self, tmp: Path, redis_url: str, redis_pid: int | None, upstream: str) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.redis_pid = redis_pid
        self.credentials = Credentials(redis_url)
        self.heartbeat = Heartbeat(redis_url, upstream)
        self.heartbeat.start()

    def service(self, log: str, timeout: float) -> WsService:
        svc = WsService(self.tmp, self.redis_url, log)
        try:
            svc.wait_healthy(timeout)
        except Exception:
            svc.stop()
            raise
        return svc

    def stop(self) -> None:
        self.heartbeat.stop()


def bench_switchboard(
    args: argparse.Namespace, sb: Switchboard, upstream_pid: int, out: dict[str, Any]
) -> None:
    svc = sb.service("switchboard.log", args.ready_timeout)
    try:
        url = svc.url(RELAY_PATH)
        authorization = f"Bearer {sb.credentials.token()}"
        out["url"] = url
        # The registry view may take a moment to show the upstream: poll the relay.
        wait_ws(url, args.ready_timeout, svc.proc, {"Authorization": authorization})
        status = upgrade_status(url)  # the relay must refuse a client without a credential
        if status != 401:
            raise RuntimeError(f"{url} answered {status} without a credential, not 401")
        out["checks"] = {"status_without_credential": status}
        print(f"[ws] switchboard: measuring {url}", flush=True)
        watch = {"relay": svc.proc.pid, "upstream": upstream_pid}
        if sb.redis_pid:
            watch["redis"] = sb.redis_pid  # ours, not the rest of the box (registry resyncs)
        out.update(run_load(url, args, args.tmp, "switchboard", watch, authorization))
        if svc.proc.poll() is not None:
            raise RuntimeError(f"the websocket process exited with {svc.proc.returncode}")
        out["heartbeat_failures"] = sb.heartbeat.failures
    finally:
        svc.stop()
