"""The wrk driver of `bench.proxy`: run wrk, parse its output, meter the CPU around it.

`run_wrk` and `_ms` are copied from the peers' proxy_bench.py; `metered_wrk`
adds the CPU time of the proxy, the backend and wrk over the run, and the share
of the box the rest used; `measure` is the peers' warm-up, c64 run and c1 run.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import resource
import subprocess
import time
from typing import Any

import psutil

from bench.harness import box_busy, other_busy_pct

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(tok: str) -> float | None:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", tok.strip())
    return round(float(m.group(1)) * _UNIT[m.group(2)], 4) if m else None


def run_wrk(wrk: str, url: str, conns: int, seconds: int) -> dict[str, Any]:
    argv = [wrk, "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s", url]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    out = p.stdout
    res: dict[str, Any] = {"cmd": " ".join(argv[1:]), "rc": p.returncode}
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
    wrk: str, url: str, conns: int, seconds: int, proxy_pid: int | None, backend_pid: int
) -> dict[str, Any]:
    """One wrk run, with the CPU seconds of the proxy, the backend and wrk over it."""
    proxy, backend = _tree(proxy_pid), _tree(backend_pid)
    before = (_tree_cpu(proxy), _tree_cpu(backend), _wrk_cpu(), box_busy(), time.monotonic())
    res = run_wrk(wrk, url, conns, seconds)
    after = (_tree_cpu(proxy), _tree_cpu(backend), _wrk_cpu(), box_busy(), time.monotonic())
    d = [a - b for a, b in zip(after, before, strict=True)]
    n = max(res["requests"], 1)
    wall = d[4]
    ours = d[0] + d[1] + d[2]
    res["cpu"] = {
        "proxy_us_per_req": round(d[0] / n * 1e6, 1) if proxy_pid else None,
        "proxy_cores": round(d[0] / wall, 2) if proxy_pid and wall > 0 else None,
        "backend_us_per_req": round(d[1] / n * 1e6, 1),
        "wrk_us_per_req": round(d[2] / n * 1e6, 1),
        "other_busy_pct": other_busy_pct(d[3], ours, wall),
    }
    return res


def measure(
    wrk: str, url: str, args: argparse.Namespace, proxy_pid: int | None, backend_pid: int
) -> dict[str, Any]:
    """The peers' `measure`: warm-up (discarded), the c64 run, the c1 run."""
    run_wrk(wrk, url, args.connections, args.warmup)
    loaded = metered_wrk(wrk, url, args.connections, args.duration, proxy_pid, backend_pid)
    c1 = metered_wrk(wrk, url, 1, args.c1_duration, proxy_pid, backend_pid)
    return {"loaded": loaded, "c1": c1}
