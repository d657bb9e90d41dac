"""Where a proxy's CPU goes per request: the gateway's normal path next to nginx's.

    python -m bench.profile [--targets nginx,switchboard] [--seconds 5] [--no-install]

The throughput goal of issue 4 (0.5x nginx through the normal path) is a question of
CPU per request: both proxies run one process on one core. This splits that CPU into
what compiling more of the gateway could shrink and what it cannot. Per target, on the
peers' nginx echo backend (as `bench.proxy`):

1. a discarded warm-up, then `wrk -t1 -c64` for `--seconds`, metering the proxy's CPU
   per request (`bench.wrk.metered_wrk`, as `bench.proxy` does);
2. a second wrk run of the same length, with the proxy process sampled by
   `perf record -e cpu-clock --call-graph dwarf` (a software clock, so it works in VMs
   without hardware counters; the samples give only shares, so perf's own cost does
   not enter the figures of step 1).

Each sample is put in one part (`classify`):

- kernel, by the system call it came in by: writes, reads, or the rest (epoll,
  timers, interrupts). A loopback write includes the delivery to the receiving
  socket and waking its process; the share of samples in that wake-up is shown too;
- user space, interpreted Python: the innermost frame of the program's own code is
  CPython's eval loop (the gateway's modules that are not compiled, Sanic, asyncio);
- user space, the rest: compiled code (the mypyc hot path, uvloop, httptools, nginx)
  and the C runtime it calls.

The parts are printed as shares and in µs per request (share x step 1's CPU per
request), with the ceiling: the gateway's CPU per request if its interpreted Python
cost nothing, as a ratio to nginx's. When both proxies run one core flat out, as at
c64 here, the ratio of CPU per request is the ratio of throughput.

Needs `perf` (Debian's linux-perf, apt-get installed when running as root unless
`--no-install`) and a kernel that lets it sample the process (perf_event_paranoid <= 1,
or root). Without it, nothing is printed but the reason. Not a test: figures are
written to bench/README.md by hand, with the date.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.harness import (
    comma_list,
    embedded_redis,
    free_port,
    install_signal_handlers,
    interrupted,
    stop_all_children,
    stop_child,
)
from bench.proxy_gateway import Gateway, c_unavailable
from bench.proxy_nginx import start_nginx_backend, start_nginx_proxy
from bench.proxy_targets import PATH, PYTHON_PATH_TARGETS, body_ok, wait_http
from bench.proxy_tools import find_tools
from bench.wrk import metered_wrk, run_wrk

TARGETS = ("nginx", "switchboard", "switchboard-py")  # the last: SWITCHBOARD_C=0
DEFAULT_TARGETS = ("nginx", "switchboard")
CONNECTIONS = 64
WARMUP_SECONDS = 2

# The parts of `classify`, in the order printed.
KERNEL_WRITES = "kernel: writes"
KERNEL_READS = "kernel: reads"
KERNEL_OTHER = "kernel: epoll, timers, the rest"
INTERPRETED = "user: interpreted Python"
NATIVE = "user: compiled code and the C runtime"
PARTS = (KERNEL_WRITES, KERNEL_READS, KERNEL_OTHER, INTERPRETED, NATIVE)
# Not a part: the samples (of any kernel part) spent waking the process that reads
# the socket written to (loopback delivers in the writer's system call).
WAKING = "of the kernel: waking the receiver"

_WRITE_CALLS = ("ksys_write", "do_writev", "__sys_sendto", "__sys_sendmsg")
_READ_CALLS = ("ksys_read", "__sys_recvfrom", "__sys_recvmsg", "do_readv")
_WAKE = ("sock_def_readable",)
_EVAL = "_PyEval_EvalFrameDefault"
# Frames of compiled code that count as "the program's own" for `classify`: mypyc's
# functions and Cython's (uvloop, httptools). The first one met from the leaf up, or
# the eval loop, says whose the sample is.
_COMPILED_PREFIXES = ("CPyDef_", "CPyPy_", "__pyx_")


@dataclass(frozen=True, slots=True)
class Frame:
    symbol: str
    kernel: bool


Sample = list[Frame]  # leaf first


def parse_perf_script(lines: Iterable[str]) -> Iterator[Sample]:
    """The call stacks of `perf script`'s default output: a header line per sample,
    then one indented line per frame (`addr symbol+off (dso)`), then a blank line."""
    stack: Sample | None = None
    for line in lines:
        if not line.strip():
            if stack:
                yield stack
            stack = None
        elif not line[0].isspace():
            stack = []  # the sample's header: comm pid time: period event:
        elif stack is not None:
            _, _, rest = line.strip().partition(" ")
            symbol, _, dso = rest.rpartition(" (")
            symbol = symbol.split("+0x", 1)[0]
            stack.append(Frame(symbol, dso.startswith("[kernel")))
    if stack:
        yield stack


def classify(sample: Sample) -> str:
    """The part (`PARTS`) a sample belongs to (module docstring)."""
    if sample[0].kernel:
        symbols = {f.symbol for f in sample if f.kernel}
        if symbols.intersection(_WRITE_CALLS):
            return KERNEL_WRITES
        if symbols.intersection(_READ_CALLS):
            return KERNEL_READS
        return KERNEL_OTHER
    for frame in sample:
        if frame.symbol == _EVAL:
            return INTERPRETED
        if frame.symbol.startswith(_COMPILED_PREFIXES):
            return NATIVE
    return NATIVE  # nginx, libc, or a stack cut short before any frame of ours


def waking(sample: Sample) -> bool:
    """Whether a kernel sample is in waking the reader of a socket written to."""
    return sample[0].kernel and any(f.symbol in _WAKE for f in sample)


def shares(samples: Iterable[Sample]) -> dict[str, float]:
    """Each part's share of the samples (0-1), and `WAKING`'s."""
    parts: Counter[str] = Counter()
    woken = total = 0
    for sample in samples:
        total += 1
        parts[classify(sample)] += 1
        woken += waking(sample)
    if not total:
        return {}
    return {**{p: parts[p] / total for p in PARTS}, WAKING: woken / total}


# --------------------------------------------------------------------------
# Running the targets
# --------------------------------------------------------------------------
def _worker_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    """The processes serving requests: nginx's workers (its master only supervises),
    or the process itself."""
    children = psutil.Process(proc.pid).children()
    return [c.pid for c in children] or [proc.pid]


def perf_samples(perf: str, pids: list[int], seconds: int, out: Path) -> list[Sample]:
    """`seconds` of cpu-clock samples of `pids`, with DWARF call stacks."""
    data = out.with_suffix(".data")
    record = [perf, "record", "-q", "-e", "cpu-clock", "-F", "999", "--call-graph",
              "dwarf,16384", "-o", str(data), "-p", ",".join(map(str, pids)),
              "--", "sleep", str(seconds)]  # fmt: skip
    subprocess.run(record, check=True, capture_output=True, timeout=seconds + 60)
    with open(out, "w") as text:
        subprocess.run([perf, "script", "-i", str(data)], check=True, stdout=text,
                       stderr=subprocess.DEVNULL, timeout=900)  # fmt: skip
    with open(out) as text:
        return list(parse_perf_script(text))


def profile_target(
    name: str, url: str, headers: dict[str, str], proc: subprocess.Popen[bytes],
    backend: subprocess.Popen[bytes], tools: dict[str, str], seconds: int, tmp: Path,
) -> dict[str, Any]:  # fmt: skip
    """Step 1 (CPU per request) and step 2 (the samples' shares) of one target."""
    wrk = tools["wrk"]
    if not body_ok(wait_http(url, 20, proc, headers)):
        raise RuntimeError(f"{url} answered a body other than the backend's")
    print(f"[profile] {name}: metering {url}", flush=True)
    run_wrk(wrk, url, CONNECTIONS, WARMUP_SECONDS, headers)
    metered = metered_wrk(wrk, url, CONNECTIONS, seconds, proc.pid, backend.pid, headers=headers)
    print(f"[profile] {name}: sampling for {seconds} s", flush=True)
    load = threading.Thread(target=run_wrk, args=(wrk, url, CONNECTIONS, seconds + 2, headers))
    load.start()
    try:
        time.sleep(1)  # into the run
        samples = perf_samples(tools["perf"], _worker_pids(proc), seconds, tmp / f"{name}.txt")
    finally:
        load.join()
    return {
        "rps": metered["rps"],
        "us_per_req": metered["cpu"]["proxy_us_per_req"],
        "cores": metered["cpu"]["proxy_cores"],
        "samples": len(samples),
        "shares": shares(samples),
    }


def run(targets: list[str], tools: dict[str, str], seconds: int, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    bport = free_port()
    backend = start_nginx_backend(tools["nginx"], tmp, bport)
    wait_http(f"http://127.0.0.1:{bport}{PATH}", 20, backend)
    with contextlib.ExitStack() as stack:
        try:
            for name in targets:
                if name == "nginx":
                    port = free_port()
                    proc = start_nginx_proxy(tools["nginx"], tmp, port, bport)
                    url, headers = f"http://127.0.0.1:{port}{PATH}", dict[str, str]()
                else:
                    python_only = name in PYTHON_PATH_TARGETS
                    why = c_unavailable() if python_only else None
                    if why:  # (the others are still profiled)
                        print(f"[profile] NOT MEASURED: {name}: {why}", flush=True)
                        continue
                    redis_url, redis_pid = embedded_redis(stack)
                    gateway = Gateway(tmp, redis_url, redis_pid, f"127.0.0.1:{bport}", 20,
                                      python_only=python_only)  # fmt: skip
                    stack.callback(gateway.stop)
                    proc = gateway.start()
                    url, headers = gateway.target(name)
                    gateway.check(name, url, headers)
                try:
                    results[name] = profile_target(name, url, headers, proc, backend, tools,
                                                   seconds, tmp)  # fmt: skip
                finally:
                    if name == "nginx":
                        stop_child(proc)
        finally:
            stop_all_children()
    return results


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------
def ceiling(results: dict[str, Any]) -> tuple[float, float] | None:
    """The gateway's CPU per request without its interpreted Python, and nginx's CPU
    per request over it (the throughput ratio it would allow); None without both."""
    sb, ngx = results.get("switchboard"), results.get("nginx")
    if not (sb and ngx and sb["us_per_req"] and ngx["us_per_req"] and sb["shares"]):
        return None
    floor = sb["us_per_req"] * (1 - sb["shares"][INTERPRETED])
    return floor, ngx["us_per_req"] / floor


def print_report(results: dict[str, Any]) -> None:
    names = list(results)
    print()
    print(f"{'part':40}" + "".join(f"{n:>24}" for n in names))
    print("-" * (40 + 24 * len(names)))
    for part in (*PARTS, WAKING):
        row = f"{part:40}"
        for n in names:
            r = results[n]
            share = r["shares"].get(part, 0.0)
            row += f"{100 * share:>9.1f}% {share * r['us_per_req']:>8.1f} µs   "
        print(row)
    print(f"{'CPU per request (step 1)':40}"
          + "".join(f"{results[n]['us_per_req']:>19.1f} µs  " for n in names))  # fmt: skip
    print(f"{'req/s c64 (step 1)':40}" + "".join(f"{results[n]['rps']:>22.0f}  " for n in names))
    print(f"{'samples':40}" + "".join(f"{results[n]['samples']:>22}  " for n in names))
    found = ceiling(results)
    if found:
        floor, ratio = found
        sb, ngx = results["switchboard"]["us_per_req"], results["nginx"]["us_per_req"]
        print(f"\nx nginx by CPU per request: now {ngx / sb:.2f}x; with no interpreted Python "
              f"{floor:.1f} µs a request, {ratio:.2f}x (goal 0.5x)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description="Where a proxy's CPU goes per request."
    )
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="comma list from " + ", ".join(TARGETS))  # fmt: skip
    parser.add_argument("--seconds", type=int, default=5, help="of each wrk run (default 5)")
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="never apt-get a missing tool")  # fmt: skip
    args = parser.parse_args(argv)
    targets = comma_list(parser, args.targets, TARGETS, "targets")
    found = find_tools(["wrk", "nginx", "perf"], args.install, "profile")
    missing = [tool for tool, path in found.items() if not path]
    if missing:
        print(f"[profile] NOT MEASURED: {', '.join(missing)} not installed")
        return 2
    tools = {tool: path for tool, path in found.items() if path}
    install_signal_handlers()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
            results = run(targets, tools, args.seconds, Path(tmp))
    except KeyboardInterrupt:
        return interrupted("profile")
    except subprocess.CalledProcessError as e:
        stderr = e.stderr.decode(errors="replace")[-300:] if isinstance(e.stderr, bytes) else ""
        print(f"[profile] perf failed ({e.returncode}): {stderr}")
        return 1
    print_report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
