"""The tools `bench.proxy` (and `bench.ws`, `bench.profile`) need: wrk, nginx, haproxy,
perf and aiohttp.

Each is found on PATH (or /usr/sbin), apt-get installed when running as root,
or, for aiohttp, pip-installed from its pinned line in bench/requirements.txt,
unless `--no-install`. What is still missing is reported, never measured.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

from bench.harness import ROOT

REQUIREMENTS = ROOT / "bench" / "requirements.txt"
APT_PACKAGE = {"wrk": "wrk", "nginx": "nginx", "haproxy": "haproxy", "perf": "linux-perf"}


def which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    sbin = f"/usr/sbin/{tool}"
    return sbin if os.access(sbin, os.X_OK) else None


def _run_quiet(argv: list[str], timeout: float) -> tuple[bool, str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{type(e).__name__}: {e}"
    return p.returncode == 0, (p.stdout + p.stderr)[-500:]


def apt_install(tools: list[str], tag: str = "proxy") -> None:
    """apt-get the missing tools (as root only); failures leave them missing.
    `tag` names the benchmark in what is printed (bench.ws uses this too)."""
    if not tools:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"[{tag}] missing {', '.join(tools)}: not root or no apt-get, not installing")
        return
    pkgs = [APT_PACKAGE[t] for t in tools]
    print(f"[{tag}] apt-get install {' '.join(pkgs)} ...", flush=True)
    _run_quiet(["apt-get", "update", "-qq"], 300)
    base = ["apt-get", "install", "-y", "-qq", "--no-install-recommends"]
    ok, out = _run_quiet(base + pkgs, 600)
    if not ok:  # one unavailable package must not block the others
        for pkg in pkgs:
            ok, out = _run_quiet([*base, pkg], 300)
            if not ok:
                print(f"[{tag}] apt-get install {pkg} failed: {out.strip()[-200:]}")


def aiohttp_pin() -> str | None:
    """The `aiohttp==X` line of bench/requirements.txt."""
    try:
        lines = REQUIREMENTS.read_text().splitlines()
    except OSError:
        return None
    return next((ln.split("#")[0].strip() for ln in lines if ln.startswith("aiohttp")), None)


def ensure_aiohttp(install: bool, tag: str = "proxy") -> str | None:
    """None when aiohttp is importable (after a pinned pip install if allowed), else why not."""
    if importlib.util.find_spec("aiohttp") is not None:
        return None
    pin = aiohttp_pin()
    if install and pin:
        print(f"[{tag}] pip install {pin} ...", flush=True)
        argv = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", pin]
        ok, out = _run_quiet(argv, 300)
        importlib.invalidate_caches()
        if ok and importlib.util.find_spec("aiohttp") is not None:
            return None
        return f"pip install {pin} failed: {out.strip()[-200:]}"
    how = f"pip install {pin}" if pin else "pip install aiohttp"
    return f"aiohttp is not importable ({how}, or make bench-{tag})"


def find_tools(tools: list[str], install: bool, tag: str = "proxy") -> dict[str, str | None]:
    """The path of each of `tools`, in that order (None = missing), the missing ones
    apt-get installed first if `install` (`apt_install`, which `tag` prints for)."""
    missing = [t for t in tools if not which(t)]
    if install:
        apt_install(missing, tag)
    return {t: which(t) for t in tools}


def prepare_tools(targets: list[str], backend: str, install: bool) -> dict[str, str | None]:
    """Each tool `bench.proxy` needs, and its path (None = missing after any install)."""
    needed = {"wrk"}
    if backend in ("auto", "nginx") or "nginx" in targets:
        needed.add("nginx")
    if "haproxy" in targets:
        needed.add("haproxy")
    return find_tools(sorted(needed), install)


def tool_versions(tools: dict[str, str | None]) -> dict[str, str | None]:
    """The first line of `TOOL -v` of each of nginx, haproxy and wrk (None = missing)."""
    out: dict[str, str | None] = {}
    for tool in ("nginx", "haproxy", "wrk"):
        path = tools.get(tool)
        out[tool] = None
        if path:
            try:
                p = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=5)
                out[tool] = (p.stdout + p.stderr).strip().splitlines()[0][:80]
            except (OSError, subprocess.SubprocessError, IndexError):
                pass
    return out
