"""Upstream client benchmark: the proxy's `UpstreamPool` against `httpx.AsyncClient`.

    python -m bench.upstream_client [--seconds 3] [--loop uvloop|asyncio] [--quick]

One upstream HTTP/1.1 server is started in its own process (uvloop, httptools,
keep-alive, a fixed ~100-byte JSON body: the backend of the peers' proxy
benchmark). Then, in this process, each client sends GET requests to it for
`--seconds` at 1 caller and at `--concurrency` (64) callers, reading each body
whole:

  pool   one `UpstreamPool` (`request()`, `read()`, `aclose()`)
  httpx  one `httpx.AsyncClient` with 64 keep-alive connections (its best case;
         the default limits keep only 20)

Printed: requests/s, latency percentiles, this process's CPU time per request,
and pool/httpx ratios. Note: httpcore 1.0 tries `import sniffio` several times
per request; where sniffio is not installed (as in this venv) each failed import
searches sys.path, about 30 % of httpx's CPU time per request here. That is
httpx as the gateway would run it, so it is measured as is.

The server process is stopped by its PID on exit, and exits by itself if this
process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httptools
import httpx

from bench.harness import free_port
from webapi.proxy import UpstreamPool

ROOT = Path(__file__).resolve().parent.parent
BODY = (
    b'{"ok":true,"service":"backend","node":1,'
    b'"data":"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRS"}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
HEADERS = [("User-Agent", "bench"), ("Accept", "*/*"), ("X-Forwarded-For", "127.0.0.1")]


# The upstream server (its own process).


class _Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(RESPONSE)


async def serve(port: int, parent: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", port, backlog=4096)
    orphaned = asyncio.Event()

    def watch_parent() -> None:  # exit with the benchmark, even if it was killed
        if os.getppid() != parent:
            orphaned.set()
        else:
            loop.call_later(1.0, watch_parent)

    watch_parent()
    await orphaned.wait()
    server.close()


def start_upstream(port: int, loop: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "bench.upstream_client", "--serve", str(port)]
    argv += ["--parent", str(os.getpid()), "--loop", loop]
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"upstream exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"upstream not listening on {port} after {timeout}s")


# The load.

Call = Callable[[], Awaitable[bytes]]


async def run(call: Call, concurrency: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal errors
        clock = time.perf_counter
        while (start := clock()) < stop_at:
            try:
                body = await call()
                if body != BODY:
                    errors += 1
            except Exception:
                errors += 1
            latencies.append(clock() - start)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    latencies.sort()
    count = len(latencies)
    return {
        "rps": count / wall,
        "p50_ms": latencies[count // 2] * 1e3,
        "p99_ms": latencies[min(count - 1, int(count * 0.99))] * 1e3,
        "cpu_us": cpu / count * 1e6,
        "count": count,
        "errors": errors,
    }


async def bench(args: argparse.Namespace, port: int) -> dict[str, dict[int, dict[str, Any]]]:
    address = f"127.0.0.1:{port}"
    url = f"http://{address}/api/echo"
    pool = UpstreamPool()
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=64)
    client = httpx.AsyncClient(limits=limits, timeout=10)

    async def pool_call() -> bytes:
        resp = await pool.request(address, "GET", "/api/echo", HEADERS, timeout=10)
        try:
            return await resp.read()
        finally:
            await resp.aclose()

    async def httpx_call() -> bytes:
        resp = await client.get(url, headers=HEADERS)
        return resp.content

    calls: dict[str, Call] = {"pool": pool_call, "httpx": httpx_call}
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in calls}
    try:
        for concurrency in (1, args.concurrency):
            # Alternate the clients, best of --repeats, so drift hits both alike.
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in calls}
            for call in calls.values():
                await run(call, concurrency, args.warmup)
            for _ in range(args.repeats):
                for name, call in calls.items():
                    runs[name].append(await run(call, concurrency, args.seconds))
            for name in calls:
                best = max(runs[name], key=lambda r: r["rps"])
                best["spread_pct"] = _spread(runs[name])
                results[name][concurrency] = best
                print(
                    f"  {name:<6} c{concurrency:<3} {best['rps']:>9.0f} rps  "
                    f"p50 {best['p50_ms']:.3f} ms  p99 {best['p99_ms']:.3f} ms  "
                    f"cpu {best['cpu_us']:.1f} µs/req  errors {best['errors']}",
                    flush=True,
                )
    finally:
        await pool.close()
        await client.aclose()
    return results


def _spread(runs: list[dict[str, Any]]) -> float:
    values = [r["rps"] for r in runs]
    return 100 * (max(values) - min(values)) / statistics.mean(values) if len(values) > 1 else 0.0


def report(results: dict[str, dict[int, dict[str, Any]]], concurrency: int) -> None:
    head = f"{'client':<7}" + "".join(
        f"{f'c{c} rps':>10} {'±%':>4} {'p50 ms':>7} {'p99 ms':>7} {'cpu µs':>7}"
        for c in (1, concurrency)
    )
    print()
    print(head)
    print("-" * len(head))
    for name, by_c in results.items():
        cells = "".join(
            f"{r['rps']:>10.0f} {r['spread_pct']:>4.0f} {r['p50_ms']:>7.3f} "
            f"{r['p99_ms']:>7.3f} {r['cpu_us']:>7.1f}"
            for r in (by_c[1], by_c[concurrency])
        )
        print(f"{name:<7}{cells}")
    print()
    for c in (1, concurrency):
        pool, other = results["pool"][c], results["httpx"][c]
        print(
            f"pool/httpx at c{c}: throughput {pool['rps'] / other['rps']:.2f}x, "
            f"client CPU per request {other['cpu_us'] / pool['cpu_us']:.2f}x less"
        )
    print("(cpu µs = this process's CPU time per request: the client's cost)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="each measured run (default 3)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per client and level")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per client")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--quick", action="store_true", help="0.5 s runs, one repeat")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats, args.warmup = 0.5, 1, 0.2
    return args


def _run(coro: Awaitable[Any], loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        _run(serve(args.serve, args.parent), args.loop)
        return 0
    port = free_port()
    proc = start_upstream(port, args.loop)
    try:
        wait_listening(port, proc)
        print(
            f"upstream: 127.0.0.1:{port} (own process, {args.loop}); client loop {args.loop}; "
            f"{args.repeats} x {args.seconds:g} s per client and level, best run shown",
            flush=True,
        )
        results = _run(bench(args, port), args.loop)
    finally:
        stop(proc)
    report(results, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
