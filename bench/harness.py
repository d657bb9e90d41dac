"""What the benchmarks share: child processes, CPU sampling, run info and output.

Used by `bench.rpc`, `bench.proxy` and `bench.ws`:

- processes: `spawn` starts a child in its own session and remembers it; `embedded_redis`
  a private redis-server;
  `stop_child` / `stop_all_children` stop only those PIDs (SIGTERM, then
  SIGKILL); `install_signal_handlers` turns SIGTERM and SIGHUP into SystemExit
  so the `finally` blocks that stop children run; `exit_with_parent` makes a
  worker exit when the benchmark process disappears; `start_server` starts a
  `--serve KIND` child, `serve_child` is its body.
- credentials: `issue_token` (a JWT signed with the service's keyring).
- CPU: `box_busy` (busy CPU seconds of the whole box) and `other_busy_pct`
  (the share of all CPUs the rest of the box used over a phase).
- latency: `pct` and `latency_ms` (a run's p50, p90, p99 and max).
- command line: `new_parser`, `add_server_options`, `apply_defaults`, `comma_list`.
- run info: `run_header`, `machine_info`, `package_versions`, `digest`.
- output: `print_header`, `warn_disturbed`, `vs_switchboard_rows`, `print_not_measured`,
  `write_json`, `interrupted`, `report_failed`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
OTHER_BUSY_WARN = 10.0  # % of the box used by others above which figures are disturbed


# --------------------------------------------------------------------------
# Processes: only PIDs started here are ever signalled.
# --------------------------------------------------------------------------
_CHILDREN: list[subprocess.Popen[bytes]] = []


def python_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository root first on PYTHONPATH."""
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def spawn(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None, *, append: bool = True
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session, output to `log_path` (appended, or truncated)."""
    with open(log_path, "ab" if append else "wb") as log:
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
    """SIGTERM (a Switchboard worker, nginx, haproxy and Sanic then stop), SIGKILL
    after `grace`."""
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


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP exit through the `finally` blocks, as Ctrl-C does."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)


def exit_with_parent() -> None:
    """Exit if the benchmark process dies without stopping us (e.g. SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def set_loop(kind: str, *, fallback: bool = True) -> str:
    """Install the event loop policy; returns the loop actually used. Without
    uvloop installed: plain asyncio when `fallback`, else ImportError."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            if not fallback:
                raise
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return kind


def serve_child(
    servers: Mapping[str, Callable[[int, str], None]], kind: str, port: int, url: str, loop: str
) -> None:
    """The body of a `--serve KIND` child: run server `kind` on `port` (`url`: what it
    forwards to), exiting with the benchmark process."""
    exit_with_parent()
    set_loop(loop, fallback=False)  # --loop uvloop without uvloop: ImportError
    servers[kind](port, url)


def start_server(
    bench: str, kind: str, tmp: Path, port: int, url_option: str, url: str, loop: str
) -> subprocess.Popen[bytes]:
    """Start `python -m BENCH --serve KIND` (see `serve_child`), logging to tmp/KIND.log."""
    argv = [sys.executable, "-m", bench, "--serve", kind, "--port", str(port)]
    argv += [url_option, url, "--loop", loop]
    return spawn(argv, tmp / f"{kind}.log", env=python_env())


# Far longer than any run: a token expiring mid-run would turn into 401s (proxy)
# or closed connections (ws).
JWT_TTL = 86_400


def issue_token(signing: Any, user: str, roles: list[str]) -> str:
    """A JWT for `user` with scope `*`, signed with `signing` (a `tokens.SigningKey`
    of the keyring the service verifies against), as the auth service issues one."""
    import uuid

    from common import tokens

    return tokens.issue(
        signing,
        subject=user,
        name=user,
        roles=roles,
        scopes=["*"],
        session_id=uuid.uuid4().hex,
        ttl=JWT_TTL,
    )


async def signing_key(redis_url: str) -> Any:
    """The current `tokens.SigningKey` of the keyring in that Redis, the one the
    services verify against (the keyring creates the first key if there is none)."""
    import redis.asyncio as aioredis

    from common import tokens

    client = aioredis.Redis.from_url(redis_url)
    try:
        return await tokens.Keyring(client).current()
    finally:
        await client.aclose()


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def record_error(out: dict[str, Any], e: Exception, log: Path, key: str) -> None:
    """Put `e` and the tail of `log` (under `key`, when there is one) into `out`."""
    out["error"] = f"{type(e).__name__}: {e}"[:300]
    tail = log_tail(log)
    if tail:
        out[key] = tail


def print_error(tag: str, res: dict[str, Any], key: str) -> None:
    print(f"[{tag}]   ERROR: {res['error']}", flush=True)
    if res.get(key):
        print(res[key], flush=True)


def embedded_redis(stack: contextlib.ExitStack) -> tuple[str, int | None]:
    """A private redis-server (`EmbeddedRedis`) stopped when `stack` closes: its URL and
    its pid (metered with the gateway or the WebSocket service; None if unknown)."""
    from common.embedded_redis import EmbeddedRedis  # (only the runs that need one)

    redis = stack.enter_context(EmbeddedRedis())
    return redis.url, redis.process.pid if redis.process else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------
# CPU: the box's busy time, and the share the rest of the box used.
# --------------------------------------------------------------------------
def box_busy() -> float:
    """Busy CPU seconds (user, nice, system, irq, softirq, steal) of all CPUs."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)


def other_busy_pct(box_delta: float, ours: float, wall: float) -> float | None:
    """The rest of the box's busy time (other sessions, kernel threads) over a phase
    of `wall` seconds, as a % of all CPUs: above OTHER_BUSY_WARN the figures are
    disturbed. CPU times tick at 10 ms, so a phase shorter than a second says
    nothing (None)."""
    if wall < 1.0:
        return None
    other = (box_delta - ours) / ((os.cpu_count() or 1) * wall)
    return round(max(other, 0.0) * 100, 1)


# --------------------------------------------------------------------------
# Latency: the peers' percentile (nearest rank on sorted values).
# --------------------------------------------------------------------------
def pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, round(q / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def latency_ms(lat: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max of `lat` (sorted, in ms), rounded to the microsecond."""
    return {
        "p50": _r(pct(lat, 50)),
        "p90": _r(pct(lat, 90)),
        "p99": _r(pct(lat, 99)),
        "max": _r(lat[-1] if lat else None),
    }


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------
def new_parser(prog: str, description: str, quick_help: str) -> argparse.ArgumentParser:
    """A benchmark's parser, with the options every benchmark has: --quick, --json."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return ap


def add_server_options(
    ap: argparse.ArgumentParser, servers: list[str], *, loop_help: str, log_dir_help: str
) -> None:
    """The options of a benchmark that installs tools and starts servers: --no-install,
    --loop, --ready-timeout, --log-dir, and the hidden --serve KIND --port N of a child."""
    ap.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help="never apt-get or pip install a missing tool; report it as not measured",
    )
    ap.add_argument(
        "--loop",
        default="uvloop",
        choices=["uvloop", "asyncio"],
        help=loop_help,
    )
    ap.add_argument("--ready-timeout", type=float, default=20.0)
    ap.add_argument("--log-dir", help=log_dir_help)
    ap.add_argument("--serve", choices=servers, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)


def apply_defaults(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Set each option of `defaults` that was not given (None)."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def comma_list(
    ap: argparse.ArgumentParser, value: str, known: tuple[str, ...], what: str
) -> list[str]:
    """The names of a comma list; an unknown one is a usage error."""
    names = [n for n in value.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown {what} {unknown}; known: {list(known)}")
    return names


# --------------------------------------------------------------------------
# Run info.
# --------------------------------------------------------------------------
def run_header(bench: str) -> dict[str, Any]:
    """The first keys of a benchmark's JSON: which one, when, on what machine."""
    return {
        "bench": bench,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
    }


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def package_versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def digest(*packages: str) -> str:
    """A digest of the packages measured, for tying a result to the code."""
    h = hashlib.sha256()
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------
def print_header(hdr: str) -> None:
    """A table's header line and its rule."""
    print(hdr)
    print("-" * len(hdr))


def warn_disturbed(busiest: float, during: str) -> None:
    """The warning printed when others used more than OTHER_BUSY_WARN % of the box."""
    if busiest > OTHER_BUSY_WARN:
        print(f"WARNING: other processes used up to {busiest}% of the CPUs during a {during};")
        print("         the figures are disturbed, run again on a quiet machine.")


def vs_switchboard_rows(
    targets: list[str], measured: Mapping[str, Any]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of a table against switchboard: (name, derived figures) of each
    measured target but switchboard, in `targets` order."""
    for name in targets:
        if name != "switchboard" and name in measured:
            yield name, measured[name]["derived"]


def print_not_measured(skipped: dict[str, str]) -> None:
    for name, why in skipped.items():
        print(f"NOT MEASURED: {name}: {why}")


def write_json(tag: str, path: str | None, doc: dict[str, Any]) -> None:
    """Write `doc` to `path` (when given) as indented JSON."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"[{tag}] wrote {path}")


def interrupted(tag: str) -> int:
    """Said on Ctrl-C, once every child is stopped; the exit status."""
    print(f"\n[{tag}] interrupted; every process started was stopped", flush=True)
    return 130


def report_failed(tag: str, failed: list[str]) -> int:
    """The exit status: 1, said on stderr, when any system failed."""
    if failed:
        print(f"[{tag}] FAILED: {', '.join(failed)} (errors above)", file=sys.stderr)
        return 1
    return 0


def fmt(x: float | None, n: int = 3) -> str:
    """`x` with `n` decimals, or "-" when it was not measured."""
    return "-" if x is None else f"{x:.{n}f}"


def verdict(ok: bool | None) -> str:
    return "not checked" if ok is None else ("met" if ok else "NOT met")


def print_goal_rows(rows: list[tuple[str, str, bool | None]], disturbed: bool | None) -> None:
    """One aligned line per (goal, measured value, met?), and the busy-box caveat."""
    width = max(len(label) for label, _, _ in rows)
    for label, value, ok in rows:
        print(f"  {label:<{width}} {value:>9}  {verdict(ok)}")
    if disturbed:
        print("  (not conclusive: the box was busy while these systems ran)")
