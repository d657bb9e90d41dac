"""The wrk driver of `bench.proxy`: run wrk, parse its output, meter the CPU around it.

`run_wrk` and `_ms` are copied from the peers' proxy_bench.py (plus `-H` for
the request headers a target needs, its credential); `metered_wrk` adds the CPU
time of the proxy, the backend, the gateway's redis-server and wrk over the
run, and the share of the box the rest used; `measure` is the peers' warm-up,
c64 run and c1 run.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import resource
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import psutil

from bench.harness import box_busy, other_busy_pct

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(tok: str) -> float | None:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", tok.strip())
    return round(float(m.group(1)) * _UNIT[m.group(2)], 4) if m else None


Headers = Mapping[str, str]


def _header_args(headers: Headers, *, shown: bool) -> list[str]:
    """wrk's `-H 'Name: value'` per header; `shown=False` hides the values, so the
    JSON (which may be shared) never holds a credential, even a throwaway one."""
    out: list[str] = []
    for name, value in headers.items():
        out += ["-H", f"{name}: {value if shown else '<redacted>'}"]
    return out


def run_wrk(
    wrk: str, url: str, conns: int, seconds: int, headers: Headers | None = None
) -> dict[str, Any]:
    head = headers or {}
    argv = [wrk, "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    p = subprocess.run(
        [*argv, *_header_args(head, shown=True), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    out = p.stdout
    cmd = [*argv[1:], *_header_args(head, shown=False), url]
    res: dict[str, Any] = {"cmd": " ".join(cmd), "rc": p.returncode}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    lat: dict[str, float | None] = {}
    for q in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        lat[f"p{q}"] = _ms(m.group(1)) if m else None
    m = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    if m:
        lat["avg"], lat["max"] = _ms(m.group(1)), _ms(m.group(3))
    res["lat_ms"] = lat
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    res["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
        if m
        else {}
    )
    if not res["rps"]:
        res["raw"] = (out + p.stderr)[-800:]
    return res


def _tree_cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _tree(pid: int | None) -> list[psutil.Process]:
    """The process and its children (nginx's master and worker)."""
    if pid is None:
        return []
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def _wrk_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once subprocess.run reaped it
    return r.ru_utime + r.ru_stime


def metered_wrk(
    wrk: str,
    url: str,
    conns: int,
    seconds: int,
    proxy_pid: int | None,
    backend_pid: int,
    *,
    headers: Headers | None = None,
    redis_pid: int | None = None,
) -> dict[str, Any]:
    """One wrk run, with the CPU seconds of the proxy, the backend, the redis-server
    (the gateway's: rate limits run a script there) and wrk over it."""
    proxy, backend, redis = _tree(proxy_pid), _tree(backend_pid), _tree(redis_pid)

    def sample() -> tuple[float, ...]:
        return (_tree_cpu(proxy), _tree_cpu(backend), _tree_cpu(redis), _wrk_cpu(), box_busy(),
                time.monotonic())  # fmt: skip

    before = sample()
    res = run_wrk(wrk, url, conns, seconds, headers)
    d = [a - b for a, b in zip(sample(), before, strict=True)]
    n = max(res["requests"], 1)
    wall = d[5]
    # The redis-server counts as ours: otherwise its work for the gateway would
    # show up as the rest of the box being busy.
    ours = d[0] + d[1] + d[2] + d[3]
    res["cpu"] = {
        "proxy_us_per_req": round(d[0] / n * 1e6, 1) if proxy_pid else None,
        "proxy_cores": round(d[0] / wall, 2) if proxy_pid and wall > 0 else None,
        "backend_us_per_req": round(d[1] / n * 1e6, 1),
        "redis_us_per_req": round(d[2] / n * 1e6, 1) if redis_pid else None,
        "wrk_us_per_req": round(d[3] / n * 1e6, 1),
        "other_busy_pct": other_busy_pct(d[4], ours, wall),
    }
    return res


def measure(
    wrk: str,
    url: str,
    args: argparse.Namespace,
    proxy_pid: int | None,
    backend_pid: int,
    *,
    headers: Headers | None = None,
    redis_pid: int | None = None,
) -> dict[str, Any]:
    """The peers' `measure`: warm-up (discarded), the c64 run, the c1 run."""
    run_wrk(wrk, url, args.connections, args.warmup, headers)
    loaded = metered_wrk(wrk, url, args.connections, args.duration, proxy_pid, backend_pid,
                         headers=headers, redis_pid=redis_pid)  # fmt: skip
    c1 = metered_wrk(wrk, url, 1, args.c1_duration, proxy_pid, backend_pid,
                     headers=headers, redis_pid=redis_pid)  # fmt: skip
    return {"loaded": loaded, "c1": c1}
