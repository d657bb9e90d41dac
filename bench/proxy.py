"""Proxy benchmark: the gateway's `/svc/<service>/<path>` against its peers, in one run.

    python -m bench.proxy [--quick] [--json PATH] [--targets ...] [--no-install] ...

One fast echo backend (nginx `return 200` with a 105-byte JSON body, the
peers' backend; a small Python server when nginx is missing) sits behind
each target:

  direct         wrk -> backend, no proxy: the floor
  nginx          nginx, 1 worker, proxy_pass to an upstream with keepalive 64
  switchboard    `python -m webapi` (1 process) as deployed, with the backend
                 registered by `POST /heartbeat` as service `echo`, reached at
                 /svc/echo/api/echo with an API key: the gateway's normal path, with
                 the hot path's C modules (`common.compiled.C_MODULES`) when the
                 compiled build is used (the report says which hot path ran)
  switchboard-py  the switchboard target on a second gateway process started with
                 SWITCHBOARD_C=0: the compiled Python path alone, for comparison
                 (not measured when switchboard runs no C module either)
  switchboard-open  the same gateway process, /open/api/echo: a public route of
                 the live policy (no credential, no rate limit): auth off
  switchboard-auth  the same gateway process, /svc/echo/api/echo with a JWT and
                 a rate limit that never refuses (GCRA in Redis): auth on
  haproxy        haproxy, 1 thread, http-reuse always
  aiohttp        aiohttp.web dispatcher with one shared ClientSession
  sanic-aiohttp  Sanic (1 process) with one shared aiohttp ClientSession

The peers' method (`/work/shared/bench/peers/proxy_bench.py`): per target a
discarded warm-up, `wrk -t1 -c64 -d10s --latency` and `wrk -t1 -c1 -d3s
--latency`. The nginx and haproxy configs, the Python peers and the wrk driver
are copied from that file (outside this repository, so a clean clone can run
this one). Printed: req/s at c64, p50/p99, the ratio to nginx, the p50 added at
1 connection over direct, the CPU each proxy spent per request, each system's
ratio to Switchboard, the issue's goals (met / not met), and issue 6's ratio
switchboard-auth / switchboard-open (goal >= 0.85).

Missing tools (wrk, nginx, haproxy) are apt-get installed when running as
root, and aiohttp is pip-installed from its pinned line in
bench/requirements.txt, unless `--no-install`. Whatever is still missing is
reported as NOT MEASURED, never given figures. Every process started here is
stopped by its PID on exit, Ctrl-C or SIGTERM.
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
    stop_all_children,
    stop_child,
    write_json,
)
from bench.proxy_gateway import Gateway, c_unavailable
from bench.proxy_nginx import start_haproxy, start_nginx_backend, start_nginx_proxy
from bench.proxy_peers import LEAN_CREDENTIAL, SERVERS, serve, start_python
from bench.proxy_report import derive, goals, print_report
from bench.proxy_targets import (
    BODY,
    DESCRIPTIONS,
    GATEWAY_TARGETS,
    PATH,
    PYTHON_PATH_TARGETS,
    PYTHON_PEERS,
    SERVICE,
    TARGETS,
    body_ok,
    wait_http,
)
from bench.proxy_tools import APT_PACKAGE, ensure_aiohttp, prepare_tools, tool_versions
from bench.wrk import measure


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------
def start_backend(
    args: argparse.Namespace, tools: dict[str, str | None], tmp: Path
) -> tuple[str, subprocess.Popen[bytes], int]:
    port = free_port()
    nginx = tools.get("nginx")
    if args.backend in ("auto", "nginx") and nginx:
        kind, proc = "nginx", start_nginx_backend(nginx, tmp, port)
    elif args.backend == "nginx":
        raise SystemExit("--backend nginx: nginx is not installed")
    else:
        kind, proc = "python", start_python("backend", tmp, port, "", args.loop)
    if not body_ok(wait_http(f"http://127.0.0.1:{port}{PATH}", args.ready_timeout, proc)):
        raise RuntimeError("the backend answered an unexpected body")
    return kind, proc, port


def bench_target(
    name: str,
    args: argparse.Namespace,
    tools: dict[str, str | None],
    tmp: Path,
    backend: tuple[subprocess.Popen[bytes], int],
    gateway: Gateway | None,
) -> dict[str, Any]:
    """Start `name` (a switchboard target: use the shared gateway), check it answers
    the backend's body, measure it, stop it (never the shared gateway)."""
    bproc, bport = backend
    backend_url = f"http://127.0.0.1:{bport}"
    out: dict[str, Any] = {"target": name, "desc": DESCRIPTIONS[name]}
    proc: subprocess.Popen[bytes] | None = None  # the proxy, metered
    owned = True  # stopped here; the shared gateway is not
    headers: dict[str, str] = {}
    redis_pid: int | None = None
    log = tmp / f"{name}.log"
    failures = 0
    try:
        if name == "direct":
            url = backend_url + PATH
        elif name in GATEWAY_TARGETS:
            assert gateway is not None
            owned, log = False, tmp / gateway.log
            proc = gateway.start()
            failures = gateway.heartbeat.failures if gateway.heartbeat else 0
            redis_pid = gateway.redis_pid
            url, headers = gateway.target(name)
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}{PATH}"
            if name == "nginx":
                proc = start_nginx_proxy(tools["nginx"] or "nginx", tmp, port, bport)
            elif name == "haproxy":
                proc = start_haproxy(tools["haproxy"] or "haproxy", tmp, port, bport)
            else:
                proc = start_python(name, tmp, port, backend_url, args.loop)
            if name == "python-lean":  # the gateway's request: its path and a credential
                url = f"http://127.0.0.1:{port}/svc/{SERVICE}{PATH}"
                headers = {"Authorization": LEAN_CREDENTIAL}
        out["url"] = url
        out["body_ok"] = body_ok(wait_http(url, args.ready_timeout, proc, headers))
        if not out["body_ok"]:
            raise RuntimeError(f"{url} answered a body other than the backend's")
        if gateway is not None and name in GATEWAY_TARGETS:
            # Once it answers (the backend's registration may take a moment to show).
            out["checks"] = gateway.check(name, url, headers)
        if not tools.get("wrk"):
            out["not_measured"] = "wrk is not installed (apt-get install wrk)"
            return out
        print(f"[proxy] {name}: measuring {url}", flush=True)
        pid = proc.pid if proc else None
        out.update(measure(tools["wrk"] or "wrk", url, args, pid, bproc.pid,
                           headers=headers, redis_pid=redis_pid))  # fmt: skip
        for phase in ("loaded", "c1"):
            if not out[phase]["rps"]:
                raise RuntimeError(f"wrk measured nothing ({phase}): {out[phase].get('raw')}")
        for p, what in ((proc, "the proxy"), (bproc, "the backend")):
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{what} exited with {p.returncode} during the run")
        if gateway is not None and gateway.heartbeat is not None and name in GATEWAY_TARGETS:
            out["heartbeat_failures"] = gateway.heartbeat.failures - failures
    except Exception as e:
        record_error(out, e, log, "log_tail")
    finally:
        if proc is not None and owned:
            stop_child(proc)
    return out


def unavailable(name: str, tools: dict[str, str | None], aiohttp_missing: str | None) -> str | None:
    """Why `name` cannot be measured here, or None."""
    if name in PYTHON_PATH_TARGETS:
        return c_unavailable()
    if name in ("nginx", "haproxy") and not tools.get(name):
        return f"{name} is not installed (apt-get install {APT_PACKAGE[name]})"
    if name in PYTHON_PEERS and aiohttp_missing:
        return aiohttp_missing
    return None


def run_all(args: argparse.Namespace, tools: dict[str, str | None], tmp: Path) -> dict[str, Any]:
    aiohttp_missing = (
        ensure_aiohttp(args.install) if any(t in PYTHON_PEERS for t in args.targets) else None
    )
    results: dict[str, Any] = {}
    not_measured: dict[str, str] = {}
    # The gateway process of each kind (False: as deployed, True: the Python path alone).
    gateways: dict[bool, Gateway] = {}
    with contextlib.ExitStack() as stack:
        try:
            kind, bproc, bport = start_backend(args, tools, tmp)
            print(f"[proxy] backend: {kind} at http://127.0.0.1:{bport}{PATH}", flush=True)
            if kind != "nginx":
                print("[proxy] NOTE: not the peers' nginx backend; compare only within this run")
            if any(t in GATEWAY_TARGETS for t in args.targets):
                redis_url, redis_pid = embedded_redis(stack)
                for python_only in (False, True):
                    gateways[python_only] = Gateway(tmp, redis_url, redis_pid,
                                                    f"127.0.0.1:{bport}", args.ready_timeout,
                                                    python_only=python_only)  # fmt: skip
            for i, name in enumerate(args.targets):
                why = unavailable(name, tools, aiohttp_missing)
                if why:
                    not_measured[name] = why
                    print(f"[proxy] {name}: NOT MEASURED: {why}", flush=True)
                    continue
                t = time.monotonic()
                gateway = gateways.get(name in PYTHON_PATH_TARGETS)
                r = bench_target(name, args, tools, tmp, (bproc, bport), gateway)
                r["wall_s"] = round(time.monotonic() - t, 1)
                later = args.targets[i + 1 :]
                if gateway is not None and not any(
                    t in GATEWAY_TARGETS and (t in PYTHON_PATH_TARGETS) == gateway.python_only
                    for t in later
                ):
                    gateway.stop()  # its last target is done: it must not load the next ones
                if "not_measured" in r:
                    not_measured[name] = r["not_measured"]
                    print(f"[proxy] {name}: body ok; NOT MEASURED: {r['not_measured']}")
                elif "error" in r:
                    print_error("proxy", r, "log_tail")
                else:
                    L, C = r["loaded"], r["c1"]
                    print(
                        f"[proxy]   {L['rps']:.0f} req/s p50 {L['lat_ms']['p50']}ms p99 "
                        f"{L['lat_ms']['p99']}ms | c1 p50 {C['lat_ms']['p50']}ms ({r['wall_s']}s)",
                        flush=True,
                    )
                results[name] = r
        finally:
            for gateway in gateways.values():
                gateway.stop()
            stop_all_children()  # before the redis-server goes away
    return {"backend": kind, "targets": results, "not_measured": not_measured}


def versions(tools: dict[str, str | None]) -> dict[str, str | None]:
    return package_versions(("sanic", "uvloop", "httptools", "aiohttp")) | tool_versions(tools)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = new_parser(
        "python -m bench.proxy",
        "Proxy benchmark: the gateway vs nginx, HAProxy and Python proxies.",
        "a short smoke run (about 30 s)",
    )
    ap.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma list from {', '.join(TARGETS)}"
    )
    ap.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "nginx", "python"],
        help="the echo backend: nginx (the peers'), python (ours), auto = nginx when installed",
    )
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--duration", type=int, help="seconds of the loaded run (default 10; quick 1)")
    ap.add_argument("--warmup", type=int, help="seconds of discarded warm-up (default 2; quick 1)")
    ap.add_argument("--c1-duration", type=int, help="seconds of the c1 run (default 3; quick 1)")
    add_server_options(
        ap,
        list(SERVERS),
        loop_help="event loop of the aiohttp peer and our backend (Sanic always uses uvloop)",
        log_dir_help="configs and logs of every server (default: a temporary directory)",
    )
    ap.add_argument("--backend-url", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    apply_defaults(
        args,
        {"duration": 1, "warmup": 1, "c1_duration": 1}
        if args.quick
        else {"duration": 10, "warmup": 2, "c1_duration": 3},
    )
    args.targets = comma_list(ap, args.targets, TARGETS, "targets")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.backend_url, args.loop)
        return 0

    install_signal_handlers()
    started = time.monotonic()
    tools = prepare_tools(args.targets, args.backend, args.install)
    for tool, path in tools.items():
        if not path:
            print(f"[proxy] {tool} is not installed", flush=True)
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-proxy-") as tmpdir:
        tmp = Path(args.log_dir or tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            run = run_all(args, tools, tmp)
        except KeyboardInterrupt:
            return interrupted("proxy")
        except RuntimeError as e:  # the backend did not start: nothing can be measured
            print(f"[proxy] ERROR: {e}", file=sys.stderr)
            print(log_tail(tmp / "nginx-backend.log") or log_tail(tmp / "backend.log"))
            return 1

    derive(run["targets"])
    doc: dict[str, Any] = {
        **run_header("proxy"),
        "backend": {"kind": run["backend"], "body_bytes": len(BODY), "path": PATH},
        "code_sha256": digest("webapi", "common"),
        "params": {
            "quick": args.quick,
            "targets": args.targets,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "c1_duration_s": args.c1_duration,
            "wrk_threads": 1,
            "loop": args.loop,
        },
        "versions": versions(tools),
        "targets": run["targets"],
        "not_measured": run["not_measured"],
        "wall_s": round(time.monotonic() - started, 1),
    }
    doc["goals"] = goals(run["targets"])
    print_report(doc)
    print(f"[proxy] total {doc['wall_s']}s; webapi+common digest {doc['code_sha256']}")
    write_json("proxy", args.json, doc)
    failed = []
    for name, r in run["targets"].items():
        runs = [r[k] for k in ("loaded", "c1") if k in r]
        if "error" in r or any(x["non_2xx"] or sum(x["socket_errors"].values()) for x in runs):
            failed.append(name)
    return report_failed("proxy", failed)


if __name__ == "__main__":
    sys.exit(main())
