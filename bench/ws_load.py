"""The load side of `bench.ws`: the load client, its CPU meter, and the readiness checks.

The load client runs in its own process (`python -m bench.ws --load URL ...`,
started by `run_load`, stopped by PID) and writes one JSON document. Copied
from the peers' `/work/shared/bench/peers/ws_bench.py` (`Dialer`, `make_msg`,
`ping_pong`, `run_phase`, `load_async`, `pin_to_one_cpu`, `wait_ws`), with
two additions: the client sends the target's credential (`Authorization`,
handed over in the environment so that it shows neither on a command line nor
in the JSON), and the CPU is metered with psutil per process tree (nginx's
master and worker) instead of per session.

Per target, on fresh connections each: a discarded warm-up, the throughput run
(32 connections of strict ping-pong, with the CPU each process spent), then the
1-connection latency run, last, with client, relay and upstream pinned to one CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from bench.harness import (
    box_busy,
    latency_ms,
    other_busy_pct,
    python_env,
    spawn,
    stop_child,
)

MSG_BYTES = 100
AUTH_ENV = "BENCH_WS_AUTHORIZATION"  # the load client's Authorization header, if any
UNPINNED = ("redis",)  # metered but never pinned: not on the message path


def make_msg(conn_id: int, seq: int) -> str:
    """A unique 100-byte ASCII text message."""
    return f"{conn_id:05d}:{seq:010d}:".ljust(MSG_BYTES, "x")


# --------------------------------------------------------------------------
# Client connections (the load process and the idle-connection phase)
# --------------------------------------------------------------------------
class Conn(NamedTuple):
    send: Callable[[str], Awaitable[None]]
    recv: Callable[[], Awaitable[str]]
    close: Callable[[], Awaitable[Any]]


class Dialer:
    """Opens client WebSocket connections with the chosen library, with
    compression and keep-alive pings off and no HTTP proxy."""

    def __init__(self, lib: str) -> None:
        self.lib = lib
        self.session: Any = None

    async def open(self, url: str, headers: dict[str, str] | None = None) -> Conn:
        if self.lib == "aiohttp":
            import aiohttp

            if self.session is None:
                self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            ws = await self.session.ws_connect(
                url,
                headers=headers,
                compress=0,
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
            )
            return Conn(ws.send_str, ws.receive_str, ws.close)
        from websockets.asyncio.client import connect

        wsc = await connect(
            url,
            additional_headers=headers,
            compression=None,
            proxy=None,
            ping_interval=None,
            open_timeout=10,
            close_timeout=2,
        )
        return Conn(wsc.send, wsc.recv, wsc.close)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()


class PhaseStats:
    def __init__(self, max_errors: int) -> None:
        self.lat_ns: list[int] = []
        self.errors = 0
        self.first_error: str | None = None
        self.max_errors = max_errors
        self.done_at = 0.0  # when the last worker sent its last message

    def error(self, e: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(e).__name__}: {e}"[:200]


async def close_quietly(conn: Conn | None) -> None:
    if conn is None:
        return
    try:
        async with asyncio.timeout(3):
            await conn.close()
    except BaseException:  # also when cancelled: closing is best effort
        pass


async def ping_pong(
    dialer: Dialer,
    url: str,
    headers: dict[str, str] | None,
    conn: Conn | None,
    conn_id: int,
    stop_at: float,
    max_msgs: int,
    stats: PhaseStats,
) -> None:
    """Strict ping-pong on one connection until stop_at or max_msgs; after an
    error it reconnects, until the phase has seen max_errors errors."""
    pc, now = time.perf_counter_ns, time.perf_counter
    lat = stats.lat_ns
    seq = 0
    try:
        while seq < max_msgs and now() < stop_at and stats.errors < stats.max_errors:
            try:
                if conn is None:
                    conn = await dialer.open(url, headers)
                send, recv = conn.send, conn.recv
                while seq < max_msgs and now() < stop_at:
                    out = make_msg(conn_id, seq)
                    seq += 1
                    t = pc()
                    await send(out)
                    back = await recv()
                    if back != out:
                        raise ValueError(f"bad echo: {str(back)[:40]!r}")
                    lat.append(pc() - t)
            except Exception as e:
                stats.error(e)
                await close_quietly(conn)
                conn = None
        stats.done_at = max(stats.done_at, now())
    finally:
        await close_quietly(conn)


# --------------------------------------------------------------------------
# CPU: per process tree (nginx = master + worker), this process, the box
# --------------------------------------------------------------------------
def process_tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def _tree_cpu(procs: list[psutil.Process]) -> tuple[float, float]:
    user = system = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            user, system = user + t.user, system + t.system
    return user, system


def cpu_snapshot(watch: dict[str, list[psutil.Process]]) -> dict[str, tuple[float, float]]:
    """(user, sys) CPU seconds of each watched tree and of this process (`client`)."""
    snap = {name: _tree_cpu(procs) for name, procs in watch.items()}
    t = os.times()
    snap["client"] = (t.user, t.system)
    return snap


def pin_to_one_cpu(pids: list[int]) -> dict[int, set[int]]:
    """Pin every thread of this process and of `pids` to one CPU (the 1-connection
    run then measures the path's own cost, not the price of waking another vCPU).
    Returns the old affinities for `restore_affinity`."""
    cpu = min(os.sched_getaffinity(0))
    saved: dict[int, set[int]] = {}
    for pid in [os.getpid(), *pids]:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, {cpu})
            except OSError:
                saved.pop(tid, None)
    return saved


def restore_affinity(saved: dict[int, set[int]]) -> None:
    for tid, cpus in saved.items():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


# --------------------------------------------------------------------------
# The load process
# --------------------------------------------------------------------------
async def run_phase(
    dialer: Dialer,
    url: str,
    headers: dict[str, str] | None,
    conns: int,
    seconds: float,
    max_msgs: int,
    grace: float,
    watch: dict[str, list[psutil.Process]] | None = None,
) -> dict[str, Any]:
    """Open `conns` connections, then ping-pong on all of them for `seconds` (or
    `max_msgs` messages in total). Workers still waiting for a reply `grace` s
    after the deadline are cancelled and counted as errors. With `watch`, also
    the CPU seconds each watched tree used meanwhile, and the rest of the box's."""
    stats = PhaseStats(max_errors=max(20, conns * 2))
    opened = await asyncio.gather(
        *(asyncio.wait_for(dialer.open(url, headers), 10) for _ in range(conns)),
        return_exceptions=True,
    )
    live: list[Conn] = []
    for c in opened:
        if isinstance(c, BaseException):
            stats.error(c)
        else:
            live.append(c)
    per_conn = max(1, max_msgs // max(1, len(live)))
    cpu0 = cpu_snapshot(watch) if watch is not None else None
    box0, t0 = box_busy(), time.perf_counter()
    stop_at = t0 + seconds
    tasks = [
        asyncio.create_task(ping_pong(dialer, url, headers, c, i, stop_at, per_conn, stats))
        for i, c in enumerate(live)
    ]
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=seconds + grace)
        for t in pending:
            t.cancel()
            stats.error(TimeoutError(f"no echo within {grace}s after the deadline"))
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - t0
    elapsed = (stats.done_at or time.perf_counter()) - t0
    box = box_busy() - box0
    lat = sorted(x / 1e6 for x in stats.lat_ns)  # ms
    n = len(lat)
    out: dict[str, Any] = {
        "connections": conns,
        "connected": len(live),
        "messages": n,
        "errors": stats.errors,
        "first_error": stats.first_error,
        "elapsed_s": round(elapsed, 3),
        "msgs_per_s": round(n / elapsed, 1) if elapsed > 0 else 0.0,
        "stopped_by": "count" if n + stats.errors >= per_conn * len(live) else "time",
        "lat_ms": latency_ms(lat),
    }
    if cpu0 is not None and watch is not None:
        cpu1 = cpu_snapshot(watch)
        cpu = {k: round(sum(cpu1[k]) - sum(cpu0[k]), 3) for k in cpu0}
        out["cpu_s"] = cpu  # user + sys
        out["cpu_user_s"] = {k: round(cpu1[k][0] - cpu0[k][0], 3) for k in cpu0}
        out["box_busy_s"] = round(box, 3)
        out["busy_pct"] = round(sum(cpu.values()) / ((os.cpu_count() or 1) * wall) * 100, 1)
        out["other_busy_pct"] = other_busy_pct(box, sum(cpu.values()), wall)
    return out


async def load_async(args: argparse.Namespace) -> dict[str, Any]:
    auth = os.environ.get(AUTH_ENV)
    headers = {"Authorization": auth} if auth else None
    dialer = Dialer(args.client)
    pids = {k: int(v) for k, v in (w.split("=", 1) for w in args.watch)}
    watch = {k: process_tree(pid) for k, pid in pids.items()}
    url = args.load
    out: dict[str, Any] = {"client": args.client, "loop": args.loop}
    try:
        if args.warmup > 0:
            out["warmup"] = await run_phase(
                dialer, url, headers, args.connections, args.warmup, args.max_msgs, args.grace
            )
        if args.duration > 0:
            out["loaded"] = await run_phase(
                dialer,
                url,
                headers,
                args.connections,
                args.duration,
                args.max_msgs,
                args.grace,
                watch,
            )
        if args.lat_count > 0:  # last, so that pinning cannot affect the throughput run
            pinned = [p.pid for k, procs in watch.items() if k not in UNPINNED for p in procs]
            saved = pin_to_one_cpu(pinned) if args.c1_affinity == "one-cpu" else {}
            try:
                out["c1"] = await run_phase(
                    dialer, url, headers, 1, args.lat_seconds, args.lat_count, args.grace, watch
                )
            finally:
                restore_affinity(saved)
            out["c1"]["affinity"] = args.c1_affinity
    finally:
        await dialer.aclose()
    return out


def load_main(args: argparse.Namespace) -> None:
    """The load process's entry point: run the phases, write ONE JSON document."""
    result = asyncio.run(load_async(args))
    Path(args.load_out).write_text(json.dumps(result))


# --------------------------------------------------------------------------
# Harness side
# --------------------------------------------------------------------------
def wait_ws(
    url: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Poll until one message is echoed through `url`."""
    from websockets.sync.client import connect

    deadline = time.monotonic() + timeout
    last = None
    probe = make_msg(99999, 0)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with connect(
                url,
                additional_headers=headers,
                open_timeout=2,
                close_timeout=1,
                compression=None,
                proxy=None,
            ) as ws:
                ws.send(probe)
                if ws.recv(timeout=2) == probe:
                    return
                last = "bad echo"
        except Exception as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last}")


def upgrade_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of an upgrade request to `url`: 101, or the refusal's."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, additional_headers=headers, open_timeout=5, compression=None, proxy=None):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def run_load(
    url: str,
    args: argparse.Namespace,
    tmp: Path,
    name: str,
    watch: dict[str, int],
    authorization: str | None = None,
    *,
    warmup: float | None = None,
    lat_count: int | None = None,
    duration: float | None = None,
) -> dict[str, Any]:
    """Run the load client in its own process (stopped by PID), metering `watch`
    ({name: pid of a process started here})."""
    warmup = args.warmup if warmup is None else warmup
    lat_count = args.lat_count if lat_count is None else lat_count
    duration = args.duration if duration is None else duration
    out_path = tmp / f"load-{name}.json"
    out_path.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "bench.ws",
        "--load",
        url,
        "--load-out",
        str(out_path),
        "--client",
        args.client,
        "--loop",
        args.loop,
        "--connections",
        str(args.connections),
        "--warmup",
        str(warmup),
        "--lat-count",
        str(lat_count),
        "--lat-seconds",
        str(args.lat_seconds),
        "--duration",
        str(duration),
        "--max-msgs",
        str(args.max_msgs),
        "--grace",
        str(args.grace),
        "--c1-affinity",
        args.c1_affinity,
    ]
    for k, pid in watch.items():
        argv += ["--watch", f"{k}={pid}"]
    env = python_env(**({AUTH_ENV: authorization} if authorization else {}))
    budget = warmup + args.lat_seconds + duration + 3 * (args.grace + 15) + 10
    proc = spawn(argv, tmp / f"client-{name}.log", env=env)
    try:
        proc.wait(budget)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"load client still running after {budget:.0f}s") from None
    finally:
        stop_child(proc)
    if proc.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"load client failed with {proc.returncode} (see client-{name}.log)")
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result
