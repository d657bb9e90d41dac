"""The systems under test of `bench.rpc`: each one's echo worker and client.

  switchboard    `Service("bench")` + `RpcClient`
  floor          the peers' `raw-pipe`: pipelined LPUSH+BRPOP, batched worker
  asyncredisrpc  PyPI `asyncredisrpc`: its own `AsyncServer` / `AsyncClient`
  faststream     FastStream's `RedisBroker` list subscriber + `broker.request`
                 (`faststream-w64`: the same with `max_workers=64`)

Each worker runs in its own process, started by `spawn_worker` as
`python -m bench.rpc --serve SYSTEM` (which calls `serve`). Each client has the
same shape: `await call(payload)` returns the echoed payload, `await aclose()`.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.harness import exit_with_parent, python_env, set_loop, spawn

# Switchboard and the floor first and back to back: the goal compares them.
DEFAULT_SYSTEMS = ("switchboard", "floor", "asyncredisrpc", "faststream")
SYSTEMS = (*DEFAULT_SYSTEMS, "faststream-w64")  # the last one only when asked for
DESCRIPTIONS = {
    "switchboard": "Service + RpcClient (1 worker process)",
    "asyncredisrpc": "asyncredisrpc AsyncServer/AsyncClient (PyPI)",
    "faststream": "FastStream RedisBroker request/reply, list subscriber",
    "faststream-w64": "FastStream, subscriber max_workers=64",
    "floor": "raw-pipe: pipelined LPUSH+BRPOP, batched worker",
}
# The module each system needs in this process and its worker, and how to get it.
NEEDS = {
    "asyncredisrpc": ("asyncredisrpc", "pip install -r requirements-dev.txt"),
    "faststream": ("faststream.redis", "pip install -r bench/requirements.txt"),
    "faststream-w64": ("faststream.redis", "pip install -r bench/requirements.txt"),
}
SERVICE = "bench"


def spawn_worker(system: str, redis_url: str, loop: str, log_path: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "bench.rpc", "--serve", system, "--redis-url", redis_url]
    argv += ["--loop", loop]
    return spawn(argv, log_path, python_env(REDIS_URL=redis_url), append=False)


# --------------------------------------------------------------------------
# Worker side (a child process: `python -m bench.rpc --serve SYSTEM ...`)
# --------------------------------------------------------------------------
def serve(system: str, redis_url: str, loop: str) -> None:
    exit_with_parent()
    set_loop(loop)
    if system == "switchboard":
        from common import Service

        svc = Service(SERVICE)

        @svc.method
        async def echo(x: dict[str, Any]) -> dict[str, Any]:
            return x

        svc.run()  # REDIS_URL from the environment; SIGTERM = graceful stop
        return
    # The peers' servers have no graceful stop: SIGTERM ends the process, as in
    # the peers' harness.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if system == "asyncredisrpc":
        asyncio.run(arr_server(redis_url))
    elif system.startswith("faststream"):
        asyncio.run(fs_server(redis_url, 64 if system == "faststream-w64" else 1))
    else:
        asyncio.run(raw_pipe_server(redis_url))


def unavailable(system: str) -> str | None:
    """Why `system` cannot run here (its package is not importable), or None."""
    if system not in NEEDS:
        return None
    module, how = NEEDS[system]
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install
        return f"{module} is not importable ({type(e).__name__}: {e}); {how}"
    return None


# --------------------------------------------------------------------------
# The floor, copied from /work/shared/bench/peers/rpc_bench.py (`raw-pipe`:
# `_raw_conn`, `RawPipeClient`, `raw_pipe_server`), unchanged but for style.
# --------------------------------------------------------------------------
RAW_Q = "raw:req"


def _raw_conn(url: str) -> Any:
    """A bare redis-py asyncio Connection (hiredis parser when installed)."""
    from urllib.parse import urlparse

    from redis.asyncio.connection import Connection

    u = urlparse(url)
    db = int((u.path or "/0")[1:] or 0)
    return Connection(host=u.hostname or "127.0.0.1", port=u.port or 6379, db=db)


class RawPipeClient:
    """Floor client: LPUSH+BRPOP written in ONE send on a private connection
    (1 client round trip per call); idle connections are reused LIFO."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.idle: list[Any] = []
        self.prefix = f"raw:rep:{os.getpid()}:"
        self.ids = itertools.count()

    async def call(self, payload: Any) -> Any:
        conn = self.idle.pop() if self.idle else _raw_conn(self.url)
        rid = next(self.ids)
        reply = self.prefix + str(rid)
        msg = json.dumps({"id": rid, "reply": reply, "args": payload})
        try:
            await conn.send_packed_command(
                conn.pack_commands([("LPUSH", RAW_Q, msg), ("BRPOP", reply, 5)]),
                check_health=False,
            )
            await conn.read_response()
            item = await conn.read_response()
        except BaseException:
            await conn.disconnect(nowait=True)  # half-read connection: drop it
            raise
        self.idle.append(conn)
        if item is None:
            raise TimeoutError("no reply")
        return json.loads(item[1])["result"]

    async def aclose(self) -> None:
        for c in self.idle:
            await c.disconnect()
        self.idle.clear()


async def raw_pipe_server(url: str) -> None:
    """Floor worker: BRPOP one request; then ONE pipelined send carrying all
    replies plus `RPOP req 256` to drain whatever queued up meanwhile, so
    under load it costs one round trip per batch, not per request."""
    conn = _raw_conn(url)
    await conn.connect()
    dumps, loads = json.dumps, json.loads
    pending: list[Any] = []
    while True:
        if not pending:
            await conn.send_packed_command(
                conn.pack_commands([("BRPOP", RAW_Q, 1)]), check_health=False
            )
            item = await conn.read_response()
            if item is None:
                continue
            pending = [item[1]]
        cmds: list[tuple[Any, ...]] = []
        for raw in pending:
            req = loads(raw)
            cmds.append(("LPUSH", req["reply"], dumps({"id": req["id"], "result": req["args"]})))
        cmds.append(("RPOP", RAW_Q, 256))
        await conn.send_packed_command(conn.pack_commands(cmds), check_health=False)
        for _ in range(len(cmds) - 1):
            await conn.read_response()
        pending = await conn.read_response() or []


# --------------------------------------------------------------------------
# The asyncredisrpc peer, copied from /work/shared/bench/peers/rpc_bench.py
# (`arr_server`, `ArrClient`, `arr_client`), unchanged but for style: the
# library's own AsyncServer (RPUSH/BLPOP, one call at a time) and AsyncClient
# (RPUSH the request, BLPOP a per-call reply list, no timeout of its own).
# --------------------------------------------------------------------------
ARR_QUEUE = "bench"


async def arr_server(url: str) -> None:
    from urllib.parse import urlparse

    from asyncredisrpc.server import AsyncServer  # type: ignore[import-untyped]  # no types

    u = urlparse(url)
    srv = AsyncServer(ARR_QUEUE, host=u.hostname or "127.0.0.1", port=u.port or 6379)

    @srv.task  # type: ignore[untyped-decorator]
    async def echo(x: Any) -> Any:
        return x

    await srv.async_run()


class ArrClient:
    def __init__(self, url: str) -> None:
        from urllib.parse import urlparse

        from asyncredisrpc.client import AsyncClient  # type: ignore[import-untyped]  # no types

        u = urlparse(url)
        self.c = AsyncClient(ARR_QUEUE, host=u.hostname or "127.0.0.1", port=u.port or 6379)

    async def call(self, payload: Any) -> Any:
        err, res = await self.c.call("echo", payload)
        if err != 0:
            raise RuntimeError(f"asyncredisrpc error {err}")
        return res

    async def aclose(self) -> None:
        if self.c.redis is not None:
            await self.c.redis.aclose()


# --------------------------------------------------------------------------
# The FastStream peer, copied from /work/shared/bench/peers/rpc_bench.py
# (`_fs_server_factory`, `FsClient`, `fs_client`), unchanged but for style:
# a RedisBroker list subscriber that returns its argument, and
# `broker.request(payload, list=...)`, which publishes the request to the list
# and waits for the reply on a fresh pub/sub channel.
# --------------------------------------------------------------------------
FS_LIST = "fs:echo"


async def fs_server(url: str, max_workers: int) -> None:
    from faststream.redis import RedisBroker

    broker = RedisBroker(url, logger=None, max_connections=512)  # type: ignore[arg-type]  # None: silent
    kw = {"max_workers": max_workers} if max_workers > 1 else {}

    @broker.subscriber(list=FS_LIST, **kw)  # type: ignore[call-overload, untyped-decorator]
    async def echo(x: Any) -> Any:
        return x

    await broker.start()
    try:
        await asyncio.Event().wait()
    finally:
        await broker.stop()


class FsClient:
    def __init__(self, url: str) -> None:
        from faststream.redis import RedisBroker

        self.broker = RedisBroker(url, logger=None, max_connections=512)  # type: ignore[arg-type]  # None: silent

    async def call(self, payload: Any) -> Any:
        msg = await self.broker.request(payload, list=FS_LIST, timeout=5.0)
        return await msg.decode()

    async def aclose(self) -> None:
        await self.broker.stop()


# --------------------------------------------------------------------------
# Switchboard client, behind the same `call(payload)` / `aclose()` shape.
# --------------------------------------------------------------------------
class SwitchboardClient:
    def __init__(self, url: str, call_timeout: float) -> None:
        from common import RpcClient

        self.rpc = RpcClient(url, timeout=call_timeout)
        self.call_timeout = call_timeout

    async def call(self, payload: Any) -> Any:
        return await self.rpc.call(f"{SERVICE}.echo", payload, timeout=self.call_timeout)

    async def aclose(self) -> None:
        await self.rpc.close()


async def make_client(system: str, url: str, call_timeout: float) -> Any:
    if system == "switchboard":
        client = SwitchboardClient(url, call_timeout)
        await client.rpc.start()
        return client
    if system == "asyncredisrpc":
        arr = ArrClient(url)
        await arr.c.connect()
        return arr
    if system.startswith("faststream"):
        fs = FsClient(url)
        await fs.broker.connect()
        return fs
    return RawPipeClient(url)
