"""WebSocket relay benchmark: the websocket service's `/ws/proxy/` against its peers, in one run.

    python -m bench.ws [--quick] [--json PATH] [--targets ...] [--no-install] ...

One echo upstream (`/ws/echo`, 1 process, uvloop; `--upstream auto` runs a
2 s trial of an aiohttp.web and a `websockets` echo server and keeps the one
that spends less CPU per echo) sits behind each target, restarted for each:

  direct         client -> upstream, no relay: the floor
  nginx          nginx, 1 worker, the WebSocket proxy_pass: the reference
  switchboard    `python -m websocket` (1 process) on a private redis-server,
                 the upstream registered by heartbeat as service `echo` (kind
                 `ws`), reached at /ws/proxy/echo/ws/echo with a JWT sent as
                 `Authorization: Bearer` on the upgrade
  aiohttp-relay  aiohttp.web dispatcher, like the original one: one upstream
                 ws_connect per client on one shared ClientSession, two pumps
  sanic-relay    a plain Sanic relay (1 process, `websockets` client upstream)

The peers' method (`/work/shared/bench/peers/ws_bench.py`, whose code this
copies: it lives outside this repository and a clean clone must run this
one). Per target, from one load process (aiohttp client, uvloop): a discarded
1 s warm-up at 32 connections; 32 connections of strict ping-pong of a
100-byte text for 8 s (msg/s, and the CPU each process spent per round trip);
then 1 connection, 5000 messages or 3 s, with client, relay and upstream
pinned to one CPU (p50/p99 round trip). Every echo is checked.

Memory: a fresh websocket process, 5000 idle connections to `/ws` (each with
its own JWT, verified at the upgrade), the growth of its VmRSS per connection;
the same for the peers' plain Sanic endpoint (`sanic-relay` /ws/idle).

Printed: the tables, each system against Switchboard, and issue 5's goals
(relay CPU per round trip <= 1.5x nginx's; added c1 p50 <= aiohttp-relay's;
under 20 KB per idle authenticated connection), met or NOT met.

nginx is apt-get installed when missing and running as root, aiohttp
pip-installed from its pinned line in bench/requirements.txt, unless
`--no-install`; what is still missing is reported NOT MEASURED. Every process
started here is stopped by its PID on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    add_server_options,
    apply_defaults,
    comma_list,
    digest,
    embedded_redis,
    exit_with_parent,
    free_port,
    install_signal_handlers,
    interrupted,
    log_tail,
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
from bench.proxy_tools import ensure_aiohttp, find_tools, tool_versions
from bench.ws_load import MSG_BYTES, load_main, run_load, wait_ws
from bench.ws_memory import raise_nofile, run_memory
from bench.ws_report import derive, goals, print_report
from bench.ws_switchboard import Switchboard, bench_switchboard
from bench.ws_targets import (
    DESCRIPTIONS,
    SERVERS,
    TARGETS,
    UPSTREAMS,
    WS_PATH,
    pick_upstream,
    serve,
    start_nginx_relay,
    start_python,
    start_upstream,
)

MEMORY = ("switchboard", "sanic-relay")


def bench_target(
    name: str,
    args: argparse.Namespace,
    upstream: tuple[subprocess.Popen[bytes], int],
    nginx: str | None,
    sb: Switchboard | None,
) -> dict[str, Any]:
    """Start `name`, check it echoes, measure it, stop it."""
    uproc, uport = upstream
    upstream_url = f"ws://127.0.0.1:{uport}{WS_PATH}"
    out: dict[str, Any] = {"target": name, "desc": DESCRIPTIONS[name]}
    tmp: Path = args.tmp
    log = tmp / ("switchboard.log" if name == "switchboard" else f"{name}.log")
    proc: subprocess.Popen[bytes] | None = None
    try:
        if name == "switchboard":
            assert sb is not None
            bench_switchboard(args, sb, uproc.pid, out)
            return out
        if name == "direct":
            url = upstream_url
        else:
            port = free_port()
            url = f"ws://127.0.0.1:{port}{WS_PATH}"
            if name == "nginx":
                proc = start_nginx_relay(nginx or "nginx", tmp, port, uport)
            else:
                proc = start_python(name, tmp, port, upstream_url, args.loop)
        out["url"] = url
        wait_ws(url, args.ready_timeout, proc)
        print(f"[ws] {name}: measuring {url}", flush=True)
        watch = {"upstream": uproc.pid}
        if proc is not None:
            watch["relay"] = proc.pid
        out.update(run_load(url, args, tmp, name, watch))
        for p, what in ((proc, "the relay"), (uproc, "the upstream")):
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{what} exited with {p.returncode} during the run")
    except Exception as e:
        record_error(out, e, log, "log_tail")
    finally:
        if proc is not None:
            stop_child(proc)
    return out


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------
def unavailable(name: str, nginx: str | None, aiohttp_missing: str | None) -> str | None:
    """Why `name` cannot be measured here, or None."""
    if name == "nginx" and not nginx:
        return "nginx is not installed (apt-get install nginx)"
    if name == "aiohttp-relay" and aiohttp_missing:
        return aiohttp_missing
    return None


def measure_target(
    name: str,
    args: argparse.Namespace,
    upstream: tuple[str, int],
    nginx: str | None,
    sb: Switchboard | None,
) -> dict[str, Any]:
    """`bench_target` on a fresh upstream (no state or CPU placement carried over
    from the previous target), with its progress line."""
    kind, uport = upstream
    t = time.monotonic()
    uproc = None
    try:
        uproc = start_upstream(kind, uport, args, args.tmp)
        r = bench_target(name, args, (uproc, uport), nginx, sb)
    except Exception as e:
        r = {"target": name, "desc": DESCRIPTIONS[name]}
        record_error(r, e, args.tmp / f"{UPSTREAMS[kind]}.log", "log_tail")
    finally:
        if uproc is not None:
            stop_child(uproc)
    r["wall_s"] = round(time.monotonic() - t, 1)
    if "error" in r:
        print_error("ws", r, "log_tail")
    else:
        L, C = r["loaded"], r["c1"]
        errors = sum(r[k]["errors"] for k in ("warmup", "loaded", "c1"))
        print(
            f"[ws]   c{args.connections} {L['msgs_per_s']:.0f} msg/s | c1 p50 "
            f"{C['lat_ms']['p50']} ms p99 {C['lat_ms']['p99']} ms | errors "
            f"{errors} ({r['wall_s']} s)",
            flush=True,
        )
    return r


def run_all(
    args: argparse.Namespace, nginx: str | None, aiohttp_missing: str | None
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    not_measured: dict[str, str] = {}
    sb: Switchboard | None = None
    with contextlib.ExitStack() as stack:
        try:
            kind, trial = pick_upstream(args, args.tmp)
            uport = free_port()  # the same port for every target: the registry names it
            upstream_url = f"ws://127.0.0.1:{uport}{WS_PATH}"
            print(
                f"[ws] upstream: {kind} echo at {upstream_url}, restarted for each target",
                flush=True,
            )
            if "switchboard" in args.targets or "switchboard" in args.memory:
                redis_url, redis_pid = embedded_redis(stack)
                sb = Switchboard(args.tmp, redis_url, redis_pid, f"127.0.0.1:{uport}")
            for name in args.targets:
                why = unavailable(name, nginx, aiohttp_missing)
                if why:
                    not_measured[name] = why
                    print(f"[ws] {name}: NOT MEASURED: {why}", flush=True)
                else:
                    results[name] = measure_target(name, args, (kind, uport), nginx, sb)
            memory = run_memory(args, sb, upstream_url)
        finally:
            if sb is not None:
                sb.stop()
            stop_all_children()  # before the redis-server goes away
    return {
        "upstream": {"kind": kind, "trial": trial, "path": WS_PATH},
        "targets": results,
        "not_measured": not_measured,
        "memory": memory,
    }


def versions(nginx: str | None) -> dict[str, str | None]:
    packages = ("sanic", "websockets", "aiohttp", "uvloop", "redis", "pyjwt")
    return package_versions(packages) | {"nginx": tool_versions({"nginx": nginx})["nginx"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = new_parser(
        "python -m bench.ws",
        "WebSocket relay benchmark: the websocket service's /ws/proxy/ vs nginx and "
        "Python relays, and the memory of idle authenticated connections.",
        "a short smoke run (about 20 s)",
    )
    ap.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma list from {', '.join(TARGETS)}"
    )
    ap.add_argument(
        "--memory",
        default=",".join(MEMORY),
        help=f"idle-connection tests, comma list from {', '.join(MEMORY)} ('' = none)",
    )
    ap.add_argument(
        "--upstream",
        default="auto",
        choices=["auto", *UPSTREAMS],
        help="the echo upstream; auto = trial both, keep the cheaper per echo",
    )
    ap.add_argument(
        "--client",
        default="aiohttp",
        choices=["aiohttp", "websockets"],
        help="client library of the load process and the idle connections",
    )
    ap.add_argument("--connections", type=int, default=32, help="connections of the throughput run")
    ap.add_argument(
        "--duration", type=float, help="seconds of the throughput run (default 8; quick 1)"
    )
    ap.add_argument(
        "--warmup", type=float, help="seconds of discarded warm-up (default 1; quick 0.5)"
    )
    ap.add_argument(
        "--lat-count", type=int, help="messages of the c1 run (default 5000; quick 500)"
    )
    ap.add_argument("--lat-seconds", type=float, help="time cap of the c1 run (default 3; quick 1)")
    ap.add_argument(
        "--c1-affinity",
        default="one-cpu",
        choices=["one-cpu", "free"],
        help="c1 run: client, relay and upstream pinned to one CPU (default), or free",
    )
    ap.add_argument(
        "--max-msgs", type=int, default=5_000_000, help="message cap of the throughput run"
    )
    ap.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds to wait for outstanding echoes after a run's deadline",
    )
    ap.add_argument(
        "--trial-seconds",
        type=float,
        help="each upstream trial of --upstream auto (default 2; quick 0: no trial)",
    )
    ap.add_argument(
        "--idle-conns",
        type=int,
        help="idle connections per memory test (default 5000; quick 200; 0 = skip)",
    )
    ap.add_argument("--idle-open-concurrency", type=int, default=200)
    ap.add_argument(
        "--settle", type=float, help="pause before each RSS reading (default 1; quick 0.5)"
    )
    add_server_options(
        ap,
        list(SERVERS),
        loop_help="event loop of the client and the Python peers (Sanic: uvloop if installed)",
        log_dir_help="nginx config and logs of every process (default: a temporary directory)",
    )
    ap.add_argument("--upstream-url", default="", help=argparse.SUPPRESS)
    ap.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--load-out", help=argparse.SUPPRESS)
    ap.add_argument("--watch", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    apply_defaults(
        args,
        {
            "duration": 1,
            "warmup": 0.5,
            "lat_count": 500,
            "lat_seconds": 1,
            "trial_seconds": 0,
            "idle_conns": 200,
            "settle": 0.5,
        }
        if args.quick
        else {
            "duration": 8,
            "warmup": 1,
            "lat_count": 5000,
            "lat_seconds": 3,
            "trial_seconds": 2,
            "idle_conns": 5000,
            "settle": 1.0,
        },
    )
    args.targets = comma_list(ap, args.targets, TARGETS, "targets")
    args.memory = comma_list(ap, args.memory, MEMORY, "memory tests")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.upstream_url, args.loop)
        return 0
    if args.load:
        exit_with_parent()  # a load client left behind would disturb whatever runs next
        args.loop = set_loop(args.loop)
        load_main(args)
        return 0

    install_signal_handlers()
    started = time.monotonic()
    args.loop = set_loop(args.loop)  # for the idle connections, held in this process
    nginx = find_tools(["nginx"], args.install, "ws")["nginx"] if "nginx" in args.targets else None
    aiohttp_missing = ensure_aiohttp(args.install, tag="ws")
    args.aiohttp = aiohttp_missing is None
    if not args.aiohttp:
        print(f"[ws] {aiohttp_missing}", flush=True)
        if args.client == "aiohttp":
            # The peers' client; the `websockets` one costs more CPU per message.
            print("[ws] NOTE: client falls back to websockets; compare only within this run")
            args.client = "websockets"
        if args.upstream == "aiohttp":
            raise SystemExit("--upstream aiohttp: aiohttp is not installed")
    nofile = raise_nofile(args.idle_conns + 1024)
    if args.idle_conns and nofile["after"][0] < args.idle_conns + 256:
        args.idle_conns = max(0, nofile["after"][0] - 256)
        print(
            f"[ws] open-files limit {nofile['after'][0]}: idle connections cut to "
            f"{args.idle_conns}",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-ws-") as tmpdir:
        args.tmp = Path(args.log_dir or tmpdir)
        args.tmp.mkdir(parents=True, exist_ok=True)
        try:
            run = run_all(args, nginx, aiohttp_missing)
        except KeyboardInterrupt:
            return interrupted("ws")
        except RuntimeError as e:  # the upstream did not start: nothing can be measured
            print(f"[ws] ERROR: {e}", file=sys.stderr)
            print(
                log_tail(args.tmp / "upstream-aiohttp.log")
                or log_tail(args.tmp / "upstream-websockets.log")
            )
            return 1

    derive(run["targets"])
    doc: dict[str, Any] = {
        **run_header("ws"),
        "upstream": run["upstream"],
        "code_sha256": digest("websocket", "common"),
        "client": {
            "lib": args.client,
            "loop": args.loop,
            "processes": 1,
            "note": "one load process; compression off; keep-alive pings off",
        },
        "params": {
            "quick": args.quick,
            "targets": args.targets,
            "memory": args.memory,
            "msg_bytes": MSG_BYTES,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "lat_count": args.lat_count,
            "lat_seconds": args.lat_seconds,
            "c1_affinity": args.c1_affinity,
            "max_msgs": args.max_msgs,
            "grace_s": args.grace,
            "idle_conns": args.idle_conns,
            "client": args.client,
            "loop": args.loop,
        },
        "nofile_limit": nofile,
        "versions": versions(nginx),
        "targets": run["targets"],
        "not_measured": run["not_measured"],
        "memory": run["memory"],
        "wall_s": round(time.monotonic() - started, 1),
    }
    doc["goals"] = goals(run["targets"], run["memory"])
    print_report(doc)
    print(f"[ws] total {doc['wall_s']} s; websocket+common digest {doc['code_sha256']}")
    write_json("ws", args.json, doc)
    failed = [
        n
        for n, r in run["targets"].items()
        if "error" in r or any(r[k]["errors"] for k in ("warmup", "loaded", "c1"))
    ]
    failed += [
        f"memory {n}" for n, m in run["memory"].items() if "error" in m or not m.get("opened")
    ]
    return report_failed("ws", failed)


if __name__ == "__main__":
    sys.exit(main())
