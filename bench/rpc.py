"""RPC benchmark: Switchboard, its peers and the raw pipelined-list floor, in one run.

    python -m bench.rpc [--quick] [--json PATH] [--loop uvloop|asyncio] ...

One private redis-server (`EmbeddedRedis`) is started. Then, one system at a
time, its echo worker is started in its OWN process and driven from this
process by an asyncio client:

  switchboard    `Service("bench")` with `async def echo(x: dict[str, Any])`,
                 called with `RpcClient.call("bench.echo", payload)`.
  asyncredisrpc  PyPI `asyncredisrpc` (22.11): its own `AsyncServer` with an
                 `echo(x)` task, called with its own `AsyncClient.call("echo", x)`.
  faststream     FastStream's `RedisBroker`: `subscriber(list=...)` returning
                 the value, called with `broker.request(payload, list=...)`
                 (the reply comes back over pub/sub). A benchmark-only
                 dependency (bench/requirements.txt): when it is not
                 installed, this peer is skipped and the output says so.
  floor          the peers' `raw-pipe`: LPUSH+BRPOP written in one send per call
                 on a private connection; the worker drains up to 256 requests
                 per wake-up and pipelines the replies. The physical floor for
                 list-based RPC in Python on this box.

Opt-in (`--systems ...,faststream-w64`): FastStream with `max_workers=64`.

For each: a warm-up, then `--repeats` runs of `--count` calls (each run also
capped at `--max-seconds`) at 1 caller and at `--concurrency` (64) callers.
Throughput is the median run; latency percentiles pool the runs' samples.
The CPU time that client, worker and redis-server spent per call, the Redis
commands per call, and the CPU the rest of the box used meanwhile (a warning
above 10 %: the figures are then disturbed) are measured over the same runs.

The floor, the asyncredisrpc and FastStream peers and the load driver are
copied from the peers' harness (`/work/shared/bench/peers/rpc_bench.py`,
outside this repository, so a clean clone can run this file): the same
payload, the same count/time bounds, the same per-call timeout and echo check,
so the figures compare with the peers'. Every peer's ratio to Switchboard is
printed.

Every process started here is stopped by its PID on exit, Ctrl-C or SIGTERM;
the workers also exit by themselves if this process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis

from common.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
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
W = max(len(s) for s in SYSTEMS)  # width of the name column


# --------------------------------------------------------------------------
# Processes: only PIDs started here are ever signalled.
# --------------------------------------------------------------------------
_CHILDREN: list[subprocess.Popen[bytes]] = []


def spawn_worker(system: str, redis_url: str, loop: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["REDIS_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "bench.rpc", "--serve", system, "--redis-url", redis_url]
    argv += ["--loop", loop]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal Ctrl-C reaches us, and we stop it
        )
    _CHILDREN.append(proc)
    return proc


def stop_child(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM (a Switchboard worker then shuts down gracefully), SIGKILL after `grace`."""
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
        except ProcessLookupError:
            pass
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)


def stop_all_children() -> None:
    """Stop every child; a second Ctrl-C or SIGTERM cannot interrupt it."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for proc in reversed(list(_CHILDREN)):
            stop_child(proc, grace=3.0)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` blocks that stop children


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def set_loop(kind: str) -> str:
    """Install the event loop policy; returns the loop actually used."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return kind


# --------------------------------------------------------------------------
# Worker side (a child process: `python -m bench.rpc --serve SYSTEM ...`)
# --------------------------------------------------------------------------
def _exit_with_parent() -> None:
    """Exit if the benchmark process dies without stopping us (e.g. SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(system: str, redis_url: str, loop: str) -> None:
    _exit_with_parent()
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

    from asyncredisrpc.server import AsyncServer

    u = urlparse(url)
    srv = AsyncServer(ARR_QUEUE, host=u.hostname or "127.0.0.1", port=u.port or 6379)

    @srv.task
    async def echo(x: Any) -> Any:
        return x

    await srv.async_run()


class ArrClient:
    def __init__(self, url: str) -> None:
        from urllib.parse import urlparse

        from asyncredisrpc.client import AsyncClient

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

    broker = RedisBroker(url, logger=None, max_connections=512)
    kw = {"max_workers": max_workers} if max_workers > 1 else {}

    @broker.subscriber(list=FS_LIST, **kw)
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

        self.broker = RedisBroker(url, logger=None, max_connections=512)

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


# --------------------------------------------------------------------------
# Load driver, copied from /work/shared/bench/peers/rpc_bench.py (`make_payload`,
# `pct`, `run_load`, `measure`); `measure` takes its parameters explicitly.
# --------------------------------------------------------------------------
def make_payload(i: int) -> dict[str, Any]:
    return {"i": i, "s": "x" * 48}  # ~70 bytes of JSON


def pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, round(q / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


async def run_load(
    client: Any, concurrency: int, count: int, max_seconds: float, call_timeout: float
) -> dict[str, Any]:
    lat_ns: list[int] = []
    issued = 0
    errors = 0
    first_error: str | None = None
    t0 = time.perf_counter()
    deadline = t0 + max_seconds
    pc = time.perf_counter_ns

    async def worker() -> None:
        nonlocal issued, errors, first_error
        while issued < count and time.perf_counter() < deadline:
            issued += 1
            payload = make_payload(issued)
            t = pc()
            try:
                async with asyncio.timeout(call_timeout):
                    res = await client.call(payload)
                if res != payload:
                    raise ValueError(f"bad echo: {res!r}")
            except Exception as e:
                errors += 1
                if first_error is None:
                    first_error = f"{type(e).__name__}: {e}"[:200]
                if errors > max(50, count // 10):
                    return
                continue
            lat_ns.append(pc() - t)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {
        "ok": len(lat_ns),
        "errors": errors,
        "first_error": first_error,
        "elapsed_s": round(elapsed, 3),
        "calls_per_s": round(len(lat_ns) / elapsed, 1) if elapsed > 0 else 0.0,
        "hit_time_cap": len(lat_ns) + errors < count,
        "_lat_ns": lat_ns,
    }


async def measure(
    client: Any,
    concurrency: int,
    *,
    count: int,
    repeats: int,
    max_seconds: float,
    call_timeout: float,
) -> dict[str, Any]:
    """`repeats` bounded runs; throughput = median run, latency percentiles
    over the samples of all runs pooled."""
    runs = []
    for _ in range(repeats):
        runs.append(await run_load(client, concurrency, count, max_seconds, call_timeout))
        if runs[-1]["errors"] > max(50, count // 10):
            break
    lat = sorted(x / 1e6 for r in runs for x in r.pop("_lat_ns"))  # ms
    tps = sorted(r["calls_per_s"] for r in runs)
    return {
        "concurrency": concurrency,
        "calls_per_s": tps[len(tps) // 2],
        "calls_per_s_runs": [r["calls_per_s"] for r in runs],
        "ok": sum(r["ok"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "first_error": next((r["first_error"] for r in runs if r["first_error"]), None),
        "hit_time_cap": any(r["hit_time_cap"] for r in runs),
        "lat_ms": {
            "p50": _r(pct(lat, 50)),
            "p90": _r(pct(lat, 90)),
            "p99": _r(pct(lat, 99)),
            "max": _r(lat[-1] if lat else None),
        },
    }


async def wait_ready(client: Any, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker process exited with {proc.returncode}")
        try:
            async with asyncio.timeout(1.0):
                if await client.call(make_payload(0)) == make_payload(0):
                    return
        except Exception as e:
            last = e
        await asyncio.sleep(0.05)
    raise RuntimeError(f"worker not ready after {timeout}s: {last!r}")


# --------------------------------------------------------------------------
# CPU and Redis command accounting over a measured phase.
# --------------------------------------------------------------------------
class Meter:
    """CPU seconds (user+sys) of this process, the worker and redis-server, and
    the number of commands redis-server executed (INFO commandstats, which also
    counts the commands a Lua script runs)."""

    def __init__(self, stats: aioredis.Redis, worker_pid: int) -> None:
        self.stats = stats
        self.worker = psutil.Process(worker_pid)

    async def sample(self) -> dict[str, float]:
        cpu = await self.stats.info("cpu")
        cmd = await self.stats.info("commandstats")
        w = self.worker.cpu_times()
        box = psutil.cpu_times()
        return {
            "client": time.process_time(),
            "worker": w.user + w.system,
            "redis": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "cmds": float(sum(v["calls"] for k, v in cmd.items() if k != "cmdstat_info")),
            "box_busy": box.user + box.nice + box.system + box.irq + box.softirq + box.steal,
            "wall": time.monotonic(),
        }

    @staticmethod
    def per_call(before: dict[str, float], after: dict[str, float], calls: int) -> dict[str, Any]:
        n = max(calls, 1)
        out: dict[str, Any] = {
            f"{k}_us": round((after[k] - before[k]) / n * 1e6, 1) for k in ("client", "worker")
        }
        out["redis_us"] = round((after["redis"] - before["redis"]) / n * 1e6, 1)
        out["total_us"] = round(out["client_us"] + out["worker_us"] + out["redis_us"], 1)
        out["redis_cmds"] = round((after["cmds"] - before["cmds"]) / n, 2)
        # The rest of the box's busy time (other sessions, kernel threads), as a share
        # of all CPUs: above ~10 % the figures are disturbed.
        # CPU times tick at 10 ms, so a phase shorter than a second says nothing.
        wall = after["wall"] - before["wall"]
        out["other_busy_pct"] = None
        if wall >= 1.0:
            ours = sum(after[k] - before[k] for k in ("client", "worker", "redis"))
            other = (after["box_busy"] - before["box_busy"] - ours) / ((os.cpu_count() or 1) * wall)
            out["other_busy_pct"] = round(max(other, 0.0) * 100, 1)
        return out


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------
async def bench_system(system: str, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    conc = args.concurrency
    log_path = Path(args.log_dir) / f"{system}.log"
    out: dict[str, Any] = {"system": system, "desc": DESCRIPTIONS[system]}
    proc = spawn_worker(system, redis_url, args.loop, log_path)
    stats = aioredis.Redis.from_url(redis_url)
    client = None
    params = {
        "count": args.count,
        "repeats": args.repeats,
        "max_seconds": args.max_seconds,
        "call_timeout": args.call_timeout,
    }
    try:
        client = await make_client(system, redis_url, args.call_timeout)
        await wait_ready(client, proc, args.ready_timeout)
        warmup_cap = min(args.max_seconds, 2.0)
        await run_load(client, 1, args.warmup, warmup_cap, args.call_timeout)
        await run_load(client, conc, args.warmup * 2, warmup_cap, args.call_timeout)
        meter = Meter(stats, proc.pid)
        for key, c in (("c1", 1), (f"c{conc}", conc)):
            before = await meter.sample()
            res = await measure(client, c, **params)
            res["cpu_per_call"] = Meter.per_call(
                before, await meter.sample(), res["ok"] + res["errors"]
            )
            out[key] = res
            if proc.poll() is not None:
                raise RuntimeError(f"worker process exited with {proc.returncode}")
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:300]
        tail = log_tail(log_path)
        if tail:
            out["worker_log_tail"] = tail
    finally:
        if client is not None:
            try:
                async with asyncio.timeout(5):
                    await client.aclose()
            except Exception:
                pass
        t = time.monotonic()
        stop_child(proc)
        out["worker_stop_s"] = round(time.monotonic() - t, 2)
        try:
            async with asyncio.timeout(5):
                await stats.flushall()  # the next system starts from an empty Redis
        except Exception:
            pass
        await stats.aclose()
    return out


async def run_all(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    probe = aioredis.Redis.from_url(redis_url)
    server_version = (await probe.info("server"))["redis_version"]
    await probe.aclose()
    print(f"[rpc] redis-server {server_version} at {redis_url}, loop {args.loop}", flush=True)
    results: dict[str, Any] = {}
    not_measured: dict[str, str] = {}
    conc = args.concurrency
    for system in args.systems:
        t = time.monotonic()
        print(f"[rpc] {system} ...", flush=True)
        why = unavailable(system)
        if why:
            not_measured[system] = why
            print(f"[rpc]   NOT MEASURED: {why}", flush=True)
            continue
        res = await bench_system(system, redis_url, args)
        res["wall_s"] = round(time.monotonic() - t, 1)
        results[system] = res
        if "error" in res:
            print(f"[rpc]   ERROR: {res['error']}", flush=True)
            if res.get("worker_log_tail"):
                print(res["worker_log_tail"], flush=True)
        else:
            a, b = res["c1"], res[f"c{conc}"]
            print(
                f"[rpc]   c1 {a['calls_per_s']}/s p50 {a['lat_ms']['p50']}ms "
                f"p99 {a['lat_ms']['p99']}ms | c{conc} {b['calls_per_s']}/s ({res['wall_s']}s)",
                flush=True,
            )
    return {"redis_server": server_version, "systems": results, "not_measured": not_measured}


def ratios(results: dict[str, Any], conc: int) -> dict[str, float]:
    """Each peer against Switchboard: throughput as peer/switchboard (above 1 =
    the peer is faster), latency at 1 caller as switchboard/peer (above 1 =
    Switchboard is slower)."""
    sb = results.get("switchboard")
    if not sb or "error" in sb:
        return {}
    out: dict[str, float] = {}
    for peer, r in results.items():
        if peer == "switchboard" or "error" in r:
            continue
        for key in ("c1", f"c{conc}"):
            if sb[key]["calls_per_s"]:
                out[f"{peer}/switchboard throughput {key}"] = round(
                    r[key]["calls_per_s"] / sb[key]["calls_per_s"], 2
                )
        for q in ("p50", "p99"):
            if r["c1"]["lat_ms"][q] and sb["c1"]["lat_ms"][q]:
                out[f"switchboard/{peer} latency {q} c1"] = round(
                    sb["c1"]["lat_ms"][q] / r["c1"]["lat_ms"][q], 2
                )
    return out


# Issue 3's goal, with redelivery and deduplication on (Switchboard's defaults):
# at c64 at least the floor's throughput, at c1 a p50 within 1.2x of the floor's.
GOAL_C64_THROUGHPUT = 1.0  # switchboard / floor, at least
GOAL_C1_P50 = 1.2  # switchboard / floor, at most


def goal(ratio: dict[str, float], conc: int) -> dict[str, Any]:
    thr = ratio.get(f"floor/switchboard throughput c{conc}")
    p50 = ratio.get("switchboard/floor latency p50 c1")
    if thr is None or p50 is None or not thr:
        return {}
    sb_over_floor = round(1 / thr, 2)
    return {
        "disturbed": False,  # set by main() from the other % of these two systems
        f"switchboard/floor throughput c{conc}": sb_over_floor,
        f"c{conc} throughput met": sb_over_floor >= GOAL_C64_THROUGHPUT,
        "switchboard/floor latency p50 c1": p50,
        "c1 p50 met": p50 <= GOAL_C1_P50,
    }


def spread(m: dict[str, Any]) -> str:
    runs = m.get("calls_per_s_runs") or []
    if len(runs) < 2 or not m["calls_per_s"]:
        return "-"
    return f"{(max(runs) - min(runs)) / 2 / m['calls_per_s'] * 100:.0f}"


def print_report(doc: dict[str, Any]) -> None:
    conc = doc["params"]["concurrency"]
    results = doc["systems"]
    skipped = doc["not_measured"]
    cN = f"c{conc}"
    hdr = (
        f"{'system':<{W}} {'c1 calls/s':>11} {'±%':>4} {'p50 ms':>7} {'p99 ms':>7}"
        f" {cN + ' calls/s':>12} {'±%':>4} {'p50 ms':>7} {'p99 ms':>7} {'err':>4}"
    )
    print()
    print(hdr)
    print("-" * len(hdr))
    for name in doc["params"]["systems"]:
        if name in skipped:
            print(f"{name:<{W}} NOT MEASURED (see the end of the output)")
            continue
        r = results[name]
        if "error" in r:
            print(f"{name:<{W}} ERROR {r['error']}")
            continue
        a, b = r["c1"], r[cN]

        def cap(m: dict[str, Any]) -> str:
            return "*" if m["hit_time_cap"] else ""

        print(
            f"{name:<{W}} {a['calls_per_s']:>10}{cap(a):1} {spread(a):>4} {a['lat_ms']['p50']:>7}"
            f" {a['lat_ms']['p99']:>7} {b['calls_per_s']:>11}{cap(b):1} {spread(b):>4}"
            f" {b['lat_ms']['p50']:>7} {b['lat_ms']['p99']:>7} {a['errors'] + b['errors']:>4}"
        )
    print(
        "(calls/s = median of the repeats; ±% = (max-min)/2/median; latencies pooled over the\n"
        " repeats; * = a run was stopped by --max-seconds before --count)"
    )
    print()
    hdr2 = (
        f"{'system':<{W}} {'phase':>5} {'client µs':>10} {'worker µs':>10} {'redis µs':>9}"
        f" {'total µs':>9} {'redis cmds':>10} {'other %':>8}"
    )
    print("CPU time (user+sys) and Redis commands per call; other % = the rest of the box:")
    busiest = 0.0
    print(hdr2)
    print("-" * len(hdr2))
    for name, r in results.items():
        if "error" in r:
            continue
        for key in ("c1", cN):
            c = r[key]["cpu_per_call"]
            print(
                f"{name:<{W}} {key:>5} {c['client_us']:>10} {c['worker_us']:>10}"
                f" {c['redis_us']:>9} {c['total_us']:>9} {c['redis_cmds']:>10}"
                f" {'-' if c['other_busy_pct'] is None else c['other_busy_pct']:>8}"
            )
            busiest = max(busiest, c["other_busy_pct"] or 0.0)
    if busiest > 10:
        print(f"WARNING: other processes used up to {busiest}% of the CPUs during a phase;")
        print("         the figures are disturbed, run again on a quiet machine.")
    ratio = doc["ratios"]
    peers = [n for n in results if n != "switchboard" and f"{n}/switchboard throughput c1" in ratio]
    if peers:
        print()
        print("Each peer against switchboard (same run): throughput = peer / switchboard")
        print("(above 1: the peer is faster); latency = switchboard / peer (above 1: switchboard")
        print("is slower):")
        hdr3 = f"{'peer':<{W}} {'c1 calls/s':>11} {cN + ' calls/s':>12} {'c1 p50':>7} {'c1 p99':>7}"
        print(hdr3)
        print("-" * len(hdr3))

        def x(key: str) -> str:
            return f"{ratio[key]:.2f}x" if key in ratio else "-"

        for n in peers:
            print(
                f"{n:<{W}} {x(f'{n}/switchboard throughput c1'):>11}"
                f" {x(f'{n}/switchboard throughput {cN}'):>12}"
                f" {x(f'switchboard/{n} latency p50 c1'):>7}"
                f" {x(f'switchboard/{n} latency p99 c1'):>7}"
            )
    g = doc["goal"]
    if g:
        print()
        thr_met = "met" if g[f"{cN} throughput met"] else "NOT met"
        p50_met = "met" if g["c1 p50 met"] else "NOT met"
        print(
            "Issue 3's goal (redelivery and deduplication on): "
            f"switchboard/floor {cN} throughput {g[f'switchboard/floor throughput {cN}']:.2f}x"
            f" (goal >= {GOAL_C64_THROUGHPUT}x: {thr_met}),"
            f" c1 p50 {g['switchboard/floor latency p50 c1']:.2f}x"
            f" (goal <= {GOAL_C1_P50}x: {p50_met})"
        )
        if g["disturbed"]:
            print("  (not conclusive: the box was busy while switchboard or the floor ran)")
    for name, why in skipped.items():
        print(f"NOT MEASURED: {name}: {why}")


def busiest_other(doc: dict[str, Any], systems: tuple[str, ...]) -> float:
    """The highest `other %` over the phases of `systems` (0 when not measured)."""
    out = 0.0
    for name in systems:
        r = doc["systems"].get(name) or {}
        for key, m in r.items():
            if key.startswith("c") and isinstance(m, dict) and "cpu_per_call" in m:
                out = max(out, m["cpu_per_call"]["other_busy_pct"] or 0.0)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.rpc",
        description="RPC benchmark: Switchboard vs asyncredisrpc, FastStream and the raw floor.",
    )
    ap.add_argument("--quick", action="store_true", help="a short run (a few seconds)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma list from {', '.join(SYSTEMS)} (default: all but faststream-w64)",
    )
    ap.add_argument("--count", type=int, help="calls per run (default 5000; quick 300)")
    ap.add_argument("--repeats", type=int, help="runs per measurement (default 3; quick 1)")
    ap.add_argument("--max-seconds", type=float, help="time cap per run (default 4; quick 1)")
    ap.add_argument("--warmup", type=int, help="warm-up calls at 1 caller (default 200; quick 50)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--call-timeout", type=float, default=5.0)
    ap.add_argument("--ready-timeout", type=float, default=20.0)
    ap.add_argument(
        "--loop",
        default="uvloop",
        choices=["uvloop", "asyncio"],
        help="event loop of the client and the workers (default uvloop, as the peers' harness)",
    )
    ap.add_argument("--log-dir", help="worker logs (default: a temporary directory)")
    ap.add_argument("--serve", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    defaults = (
        {"count": 300, "repeats": 1, "max_seconds": 1.0, "warmup": 50}
        if args.quick
        else {"count": 5000, "repeats": 3, "max_seconds": 4.0, "warmup": 200}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}; known: {list(SYSTEMS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.redis_url, args.loop)
        return 0

    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    args.loop = set_loop(args.loop)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as tmp:
        if args.log_dir is None:
            args.log_dir = tmp
        os.makedirs(args.log_dir, exist_ok=True)
        try:
            with EmbeddedRedis() as server:
                try:
                    run = asyncio.run(run_all(args, server.url))
                finally:
                    stop_all_children()  # before the redis-server goes away
        except KeyboardInterrupt:
            print("\n[rpc] interrupted; every process started was stopped", flush=True)
            return 130

    doc: dict[str, Any] = {
        "bench": "rpc",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "redis_server": run["redis_server"],
        "loop": args.loop,
        "common_sha256": common_digest(),
        "params": {
            "quick": args.quick,
            "systems": args.systems,
            "count": args.count,
            "repeats": args.repeats,
            "max_seconds": args.max_seconds,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "call_timeout": args.call_timeout,
            "payload_bytes": len(json.dumps(make_payload(1))),
        },
        "versions": versions(),
        "systems": run["systems"],
        "ratios": ratios(run["systems"], args.concurrency),
        "not_measured": run["not_measured"],
        "wall_s": round(time.monotonic() - started, 1),
    }
    doc["goal"] = goal(doc["ratios"], args.concurrency)
    if doc["goal"]:
        doc["goal"]["disturbed"] = busiest_other(doc, ("switchboard", "floor")) > 10
    print_report(doc)
    print(f"[rpc] total {doc['wall_s']}s; common/ digest {doc['common_sha256']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"[rpc] wrote {args.json}")
    failed = [
        name
        for name, r in run["systems"].items()
        if "error" in r or any(r[k]["errors"] for k in ("c1", f"c{args.concurrency}"))
    ]
    if failed:
        print(f"[rpc] FAILED: {', '.join(failed)} (errors above)", file=sys.stderr)
        return 1
    return 0


def common_digest() -> str:
    """A digest of `common/` (what the figures measured), for comparing runs across edits."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "common").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for pkg in (
        "redis",
        "hiredis",
        "msgpack",
        "uvloop",
        "asyncredisrpc",
        "faststream",
        "fast-depends",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
