"""The load driver of `bench.rpc` and its CPU and Redis command accounting.

`measure` runs `repeats` bounded runs of `count` calls at a given concurrency
(throughput = the median run, latency percentiles over all runs' samples);
`Meter` samples the CPU time of client, worker and redis-server, the Redis
commands executed and the rest of the box's CPU around a measured phase.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

import psutil
import redis.asyncio as aioredis

from bench.harness import box_busy, latency_ms, other_busy_pct


# --------------------------------------------------------------------------
# Load driver, copied from /work/shared/bench/peers/rpc_bench.py (`make_payload`,
# `pct`, now `bench.harness.pct`, `run_load`, `measure`); `measure` takes its
# parameters explicitly.
# --------------------------------------------------------------------------
def make_payload(i: int) -> dict[str, Any]:
    return {"i": i, "s": "x" * 48}  # ~70 bytes of JSON


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
        "lat_ms": latency_ms(lat),
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
        box = box_busy()
        return {
            "client": time.process_time(),
            "worker": w.user + w.system,
            "redis": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "cmds": float(sum(v["calls"] for k, v in cmd.items() if k != "cmdstat_info")),
            "box_busy": box,
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
        ours = sum(after[k] - before[k] for k in ("client", "worker", "redis"))
        out["other_busy_pct"] = other_busy_pct(
            after["box_busy"] - before["box_busy"], ours, after["wall"] - before["wall"]
        )
        return out
