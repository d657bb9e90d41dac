"""The memory tests of `bench.ws`: idle connections held open against one server process.

The peers' method (`hold_idle`, copied from /work/shared/bench/peers/ws_bench.py):
open and close 50 connections (a warm-up), read the server's VmRSS, open the
N idle connections (200 at a time), read it again, close them, read it once
more; the growth per connection is the figure. `memory_switchboard` does it on
a fresh websocket process, `/ws`, each connection with its own JWT in the
upgrade's Authorization header; `memory_sanic` on the peers' plain Sanic
endpoint (`sanic-relay` /ws/idle), for the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import psutil

from bench.harness import free_port, print_error, record_error, stop_child
from bench.ws_load import Conn, Dialer, close_quietly, upgrade_status
from bench.ws_switchboard import Switchboard
from bench.ws_targets import CLIENT_PATH, IDLE_PATH, start_python


def rss_kb(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss // 1024)  # VmRSS


def fd_count(pid: int) -> int:
    return int(psutil.Process(pid).num_fds())


async def hold_idle(
    url: str,
    pid: int,
    n: int,
    args: argparse.Namespace,
    headers_for: Callable[[int], dict[str, str] | None],
    held: Callable[[], int | None] | None = None,
) -> dict[str, Any]:
    """Open `n` idle connections from this process (connection `i` with the
    headers `headers_for(i)`) and measure the server's RSS: before (after a
    warm-up of 50 opened and closed), held, and after closing them. `held` asks
    the server how many connections it counts (None: it cannot say)."""
    dialer = Dialer(args.client)
    sem = asyncio.Semaphore(args.idle_open_concurrency)
    errors: list[str] = []

    async def open_one(i: int) -> Conn | None:
        async with sem:
            try:
                return await asyncio.wait_for(dialer.open(url, headers_for(i)), 10)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}"[:200])
                return None

    async def open_many(first: int, k: int) -> list[Conn]:
        opened = await asyncio.gather(*(open_one(first + i) for i in range(k)))
        return [c for c in opened if c]

    async def close_all(conns: list[Conn]) -> None:
        async def one(c: Conn) -> None:
            async with sem:
                await close_quietly(c)

        await asyncio.wait_for(asyncio.gather(*(one(c) for c in conns)), 60)

    conns: list[Conn] = []
    try:
        # warm up the endpoint (first-use allocations), then take the baseline
        warm = 50
        await close_all(await open_many(n, warm))
        errors.clear()  # a warm-up failure shows again below
        await asyncio.sleep(args.settle)
        rss0, fd0 = rss_kb(pid), fd_count(pid)
        t = time.perf_counter()
        conns = await open_many(0, n)
        open_s = time.perf_counter() - t
        await asyncio.sleep(args.settle)  # let the server start every handler
        rss1, fd1 = rss_kb(pid), fd_count(pid)
        server_count = await asyncio.to_thread(held) if held else None
        await close_all(conns)
        await asyncio.sleep(args.settle)
        rss2 = rss_kb(pid)
    finally:
        await dialer.aclose()
    opened = len(conns)
    return {
        "path": urlsplit(url).path,
        "client": args.client,
        "requested": n,
        "opened": opened,
        "open_errors": len(errors),
        "first_error": errors[0] if errors else None,
        "open_s": round(open_s, 2),
        "server_fds_before": fd0,
        "server_fds_held": fd1,
        "server_counted": server_count,
        "rss_kb_before": rss0,
        "rss_kb_held": rss1,
        "rss_kb_after_close": rss2,
        "kb_per_conn": round((rss1 - rss0) / opened, 1) if opened else None,
    }


def wait_upgrade(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            last = upgrade_status(url)
            if last == 101:
                return
        except Exception as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last!r}")


def check_session(url: str, authorization: str) -> dict[str, Any]:
    """Prove `/ws` authenticates at the upgrade: a bad token is refused with 401, a
    good one gets a session that answers a ping."""
    from websockets.sync.client import connect

    refused = upgrade_status(url, {"Authorization": "Bearer not-a-token"})
    if refused != 401:
        raise RuntimeError(f"{url} answered {refused} to a bad token, not 401")
    with connect(
        url,
        additional_headers={"Authorization": authorization},
        open_timeout=5,
        compression=None,
        proxy=None,
    ) as ws:
        ws.send(json.dumps({"type": "ping", "id": 1}))
        answer = json.loads(ws.recv(timeout=5))
    if answer != {"type": "pong", "id": 1}:
        raise RuntimeError(f"{url}: an authenticated session answered {answer!r} to a ping")
    return {"status_bad_token": refused, "ping": "pong"}


def memory_switchboard(args: argparse.Namespace, sb: Switchboard) -> dict[str, Any]:
    """A fresh websocket process holding `idle_conns` connections to /ws, each
    authenticated with its own JWT (as many users would be)."""
    n = args.idle_conns
    # Minted before the first connection opens: signing must not slow the opening.
    tokens = [f"Bearer {sb.credentials.token(f'idle-{i}')}" for i in range(n + 50)]
    svc = sb.service("switchboard-memory.log", args.ready_timeout)
    try:
        url = svc.url(CLIENT_PATH)
        checks = check_session(url, tokens[-1])

        def connections() -> int | None:
            count: int | None = svc.health().get("connections")
            return count

        res = asyncio.run(
            hold_idle(
                url, svc.proc.pid, n, args, lambda i: {"Authorization": tokens[i]}, connections
            )
        )
        res["url"] = url
        res["checks"] = checks
        res["tokens"] = "one JWT per connection, in the Authorization header of the upgrade"
        if svc.proc.poll() is not None:
            res["error"] = f"the websocket process exited with {svc.proc.returncode}"
        return res
    finally:
        svc.stop()


def memory_sanic(args: argparse.Namespace, upstream_url: str) -> dict[str, Any]:
    port = free_port()
    proc = start_python("sanic-relay", args.tmp, port, upstream_url, args.loop)
    try:
        url = f"ws://127.0.0.1:{port}{IDLE_PATH}"
        wait_upgrade(url, args.ready_timeout, proc)
        res = asyncio.run(hold_idle(url, proc.pid, args.idle_conns, args, lambda i: None))
        res["url"] = url
        if proc.poll() is not None:
            res["error"] = f"sanic-relay exited with {proc.returncode}"
        return res
    finally:
        stop_child(proc)


def run_memory(
    args: argparse.Namespace, sb: Switchboard | None, upstream_url: str
) -> dict[str, Any]:
    """The memory tests of `args.memory`, each on a fresh server process."""
    memory: dict[str, Any] = {}
    for name in args.memory if args.idle_conns > 0 else ():
        t = time.monotonic()
        print(f"[ws] memory: {args.idle_conns} idle connections to {name}", flush=True)
        try:
            if name == "switchboard":
                assert sb is not None
                memory[name] = memory_switchboard(args, sb)
            else:
                memory[name] = memory_sanic(args, upstream_url)
        except Exception as e:
            memory[name] = {}
            log = "switchboard-memory.log" if name == "switchboard" else "sanic-relay.log"
            record_error(memory[name], e, args.tmp / log, "log_tail")
            print_error("ws", memory[name], "log_tail")
        memory[name]["wall_s"] = round(time.monotonic() - t, 1)
    return memory


def raise_nofile(need: int) -> dict[str, Any]:
    """Raise this process's RLIMIT_NOFILE (children inherit it) to `need`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    info: dict[str, Any] = {"before": [soft, hard]}
    if soft < need:
        new_hard = hard if hard == resource.RLIM_INFINITY or hard >= need else need
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, new_hard))
        except (ValueError, OSError):  # raising the hard limit needs privileges
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    info["after"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    return info
