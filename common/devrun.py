"""`make run`: everything on one laptop, started and stopped as one.

1. Start an embedded Redis (AOF on, data under `.run/redis`) unless `REDIS_URL` is set,
   and write its URL to `.run/redis-url` (removed on exit) for the operator commands
   run in another shell, which have no REDIS_URL (`common.dev_redis.cli_redis_url`).
2. Start every process of the `Procfile` with honcho (a well-kept Procfile runner,
   given SHUTDOWN_GRACE to stop them: `common.procrun`), with the venv's `bin/`
   first on PATH and the repo root on PYTHONPATH.
3. Print the URLs once the gateway answers `/health`.
4. On SIGINT (Ctrl-C) or SIGTERM, or when `make` itself dies, stop honcho (which
   stops its children), then Redis. Nothing is left behind. Neither honcho nor
   Redis is in the terminal's process group, so Ctrl-C reaches them through this
   process only, in that order: the services still have Redis while they drain,
   hand back their calls and deregister.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

from common.dev_redis import remove_dev_redis_url, write_dev_redis_url
from common.embedded_redis import EmbeddedRedis
from common.procrun import kill_wait
from common.settings import REPO_ROOT, exit_on_config_error, get_settings, run_path

ROOT = REPO_ROOT


def _print(message: str) -> None:
    print(f"[make run] {message}", flush=True)


def _wait_healthy(url: str, runner: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and runner.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def main() -> int:
    settings = get_settings()
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")

    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    # Before Redis starts: from then on, a Ctrl-C must reach the `finally` below.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    parent = os.getppid()
    redis_server: EmbeddedRedis | None = None
    runner: subprocess.Popen[bytes] | None = None
    try:
        if not settings.redis_url:
            data_dir = run_path(settings, "redis")
            data_dir.mkdir(parents=True, exist_ok=True)
            redis_server = EmbeddedRedis(appendonly=True, data_dir=data_dir).start()
            env["REDIS_URL"] = redis_server.url
            _print(f"embedded redis {redis_server.url} ({redis_server.binary})")
            try:
                written = write_dev_redis_url(settings, redis_server.url)
                _print(f"its URL is in {written}: the admin commands read it when "
                       "REDIS_URL is not set")  # fmt: skip
            except OSError as exc:  # a read-only checkout: everything else still works
                _print(f"could not write its URL for the admin commands ({exc}): "
                       f"export REDIS_URL={redis_server.url} in their shell")  # fmt: skip
        else:
            _print("using REDIS_URL from the environment")
        if stopping:
            return 0
        procfile = str(ROOT / "Procfile")
        runner = subprocess.Popen(
            [sys.executable, "-m", "common.procrun", "start", "-f", procfile, "-d", str(ROOT)],
            env=env,
            cwd=ROOT,
            start_new_session=True,  # Ctrl-C reaches honcho through us, once, in order
        )
        health = f"http://127.0.0.1:{settings.webapi_port}/health"
        if _wait_healthy(health, runner):
            _print(f"gateway    http://127.0.0.1:{settings.webapi_port}")
            _print("           try /health and /api/v1/channels")
            _print(f"websocket  ws://127.0.0.1:{settings.websocket_port}/ws")
            _print("Ctrl-C stops everything")
        while not stopping and runner.poll() is None:
            if os.getppid() != parent:  # make was killed: do not outlive it
                break
            time.sleep(0.2)
    finally:
        if runner is not None and runner.poll() is None:
            runner.send_signal(signal.SIGTERM)
            try:  # the runner's own deadline, and then some (`common.procrun`)
                runner.wait(timeout=kill_wait() + 5)
            except subprocess.TimeoutExpired:
                os.killpg(runner.pid, signal.SIGKILL)
                runner.wait()
        if redis_server is not None:
            remove_dev_redis_url(settings)  # before Redis stops: no command may reach for it
            redis_server.stop(keep_data=True)
        _print("stopped")
    return 0 if stopping or runner is None else (runner.returncode or 0)


if __name__ == "__main__":
    with exit_on_config_error("make run"):
        sys.exit(main())
