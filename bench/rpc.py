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
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.harness import (
    OTHER_BUSY_WARN,
    apply_defaults,
    comma_list,
    digest,
    install_signal_handlers,
    interrupted,
    new_parser,
    package_versions,
    print_error,
    record_error,
    report_failed,
    run_header,
    set_loop,
    stop_all_children,
    stop_child,
    write_json,
)
from bench.rpc_load import Meter, make_payload, measure, run_load, wait_ready
from bench.rpc_report import busiest_other, goal, print_report, ratios
from bench.rpc_systems import (
    DEFAULT_SYSTEMS,
    DESCRIPTIONS,
    SYSTEMS,
    make_client,
    serve,
    spawn_worker,
    unavailable,
)
from common.embedded_redis import EmbeddedRedis

VERSIONS = ("redis", "hiredis", "msgpack", "uvloop", "asyncredisrpc", "faststream", "fast-depends")


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
        record_error(out, e, log_path, "worker_log_tail")
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
            print_error("rpc", res, "worker_log_tail")
        else:
            a, b = res["c1"], res[f"c{conc}"]
            print(
                f"[rpc]   c1 {a['calls_per_s']}/s p50 {a['lat_ms']['p50']}ms "
                f"p99 {a['lat_ms']['p99']}ms | c{conc} {b['calls_per_s']}/s ({res['wall_s']}s)",
                flush=True,
            )
    return {"redis_server": server_version, "systems": results, "not_measured": not_measured}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = new_parser(
        "python -m bench.rpc",
        "RPC benchmark: Switchboard vs asyncredisrpc, FastStream and the raw floor.",
        "a short run (a few seconds)",
    )
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
    apply_defaults(
        args,
        {"count": 300, "repeats": 1, "max_seconds": 1.0, "warmup": 50}
        if args.quick
        else {"count": 5000, "repeats": 3, "max_seconds": 4.0, "warmup": 200},
    )
    args.systems = comma_list(ap, args.systems, SYSTEMS, "systems")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.redis_url, args.loop)
        return 0

    install_signal_handlers()
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
            return interrupted("rpc")

    doc: dict[str, Any] = {
        **run_header("rpc"),
        "redis_server": run["redis_server"],
        "loop": args.loop,
        "common_sha256": digest("common"),
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
        "versions": package_versions(VERSIONS),
        "systems": run["systems"],
        "ratios": ratios(run["systems"], args.concurrency),
        "not_measured": run["not_measured"],
        "wall_s": round(time.monotonic() - started, 1),
    }
    doc["goal"] = goal(doc["ratios"], args.concurrency)
    if doc["goal"]:
        doc["goal"]["disturbed"] = busiest_other(doc, ("switchboard", "floor")) > OTHER_BUSY_WARN
    print_report(doc)
    print(f"[rpc] total {doc['wall_s']}s; common/ digest {doc['common_sha256']}")
    write_json("rpc", args.json, doc)
    failed = [
        name
        for name, r in run["systems"].items()
        if "error" in r or any(r[k]["errors"] for k in ("c1", f"c{args.concurrency}"))
    ]
    return report_failed("rpc", failed)


if __name__ == "__main__":
    sys.exit(main())
