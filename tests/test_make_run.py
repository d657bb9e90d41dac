"""`make run` as a newcomer runs it: everything up on an embedded Redis, and Ctrl-C
(SIGINT to the foreground group) or SIGTERM to `make` leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from common import constants
from common.embedded_redis import EmbeddedRedis
from tests.helpers import ROOT, free_port, wait_for

pytestmark = pytest.mark.timeout(180)


@dataclass
class MakeRun:
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


def _ready(base_url: str) -> bool:
    body = httpx.get(f"{base_url}/health", timeout=2).json()
    return all(body["services"].get(s, {}).get("live", 0) >= 1 for s in ("iptv", "auth"))


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[MakeRun]:
    yield from _started(["make", "--no-print-directory", "run"], tmp_path)


@pytest.fixture
def devrun(tmp_path: Path) -> Iterator[MakeRun]:
    """What `make run` execs once the venv is installed, without make."""
    yield from _started([sys.executable, "-m", "common.devrun"], tmp_path)


def _started(command: list[str], tmp_path: Path) -> Iterator[MakeRun]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        WEBAPI_PORT=str(port), WEBSOCKET_PORT=str(free_port()), RUN_DIR=str(tmp_path / "run")
    )
    log = tmp_path / "make-run.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group, as in a terminal
        )
    run = MakeRun(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_for(lambda: _ready(run.base_url), timeout=90, interval=0.25)
        yield run
    except AssertionError:
        print(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        if process.poll() is None:
            _stop_everything(run)


def _stop_everything(run: MakeRun) -> None:
    """After a failed test: Ctrl-C as a user would, then SIGKILL whatever is left, by PID
    (honcho's children have sessions of their own: killing the group would orphan them)."""
    left = run.descendants()
    os.killpg(run.process.pid, signal.SIGINT)
    try:
        run.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(run.process.pid, signal.SIGKILL)
        run.process.wait()
    _gone, alive = psutil.wait_procs(left, timeout=10)
    for proc in alive:
        proc.kill()


def _assert_all_gone(run: MakeRun, pids: list[psutil.Process]) -> None:
    assert run.process.wait(timeout=60) is not None
    _gone, alive = psutil.wait_procs(pids, timeout=30)
    assert not alive, f"left behind: {[p.info for p in alive]}"
    assert "[make run] stopped" in run.log.read_text(errors="replace")


def _serves_channels(run: MakeRun) -> None:
    """As the README goes: nothing without credentials; register, log in, browse."""
    channels = f"{run.base_url}/api/v1/channels"
    assert httpx.get(channels, timeout=10).status_code == 401
    user = {"username": "newcomer", "password": "correct horse battery"}
    assert httpx.post(f"{run.base_url}/api/v1/auth/register", json=user).status_code == 201
    login = httpx.post(f"{run.base_url}/api/v1/auth/login", json=user, timeout=10).json()
    token = {"Authorization": f"Bearer {login['access_token']}"}
    body = httpx.get(channels, headers=token, timeout=10).json()
    assert body["total"] >= 200 and len(body["items"]) > 0


def _command(args: list[str], run_dir: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """An operator command as the README has the newcomer run it next to `make run`: in
    another shell, where REDIS_URL was never set."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, input=stdin, text=True,
                          env={**env, "RUN_DIR": str(run_dir)}, capture_output=True,
                          timeout=60)  # fmt: skip


def _admin_commands_find_its_redis(run: MakeRun, run_dir: Path) -> None:
    """`create-admin` (README's next step), the policy and dead-letter commands reach
    `make run`'s embedded Redis without REDIS_URL, through the URL file it writes."""
    password = "a long admin passphrase"
    created = _command(["microservices.auth.admin", "create-admin", "--username", "root",
                        "--password-stdin"], run_dir, password + "\n")  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "REDIS_URL is not set: using the Redis of `make run`" in created.stderr
    login = httpx.post(f"{run.base_url}/api/v1/auth/login", timeout=10,
                       json={"username": "root", "password": password})  # fmt: skip
    assert login.status_code == 200, login.text
    policy = _command(["common.policy", "get"], run_dir)
    assert policy.returncode == 0 and json.loads(policy.stdout)["limits"], policy.stderr
    letters = _command(["common.deadletters", "list", "iptv"], run_dir)
    assert letters.returncode == 0, letters.stderr


def test_ctrl_c_stops_everything(make_run: MakeRun, tmp_path: Path) -> None:
    _serves_channels(make_run)
    _admin_commands_find_its_redis(make_run, tmp_path / "run")
    pids = make_run.descendants()
    names = " ".join(" ".join(p.cmdline()) for p in pids)
    for expected in ("redis-server", "common.procrun", "webapi", "websocket", "microservices.iptv"):
        assert expected in names
    os.killpg(make_run.process.pid, signal.SIGINT)
    _assert_all_gone(make_run, pids)
    assert not (tmp_path / "run" / "redis-url").exists()  # removed on the way out
    after = _command(["common.policy", "get"], tmp_path / "run")
    assert after.returncode == 1
    assert after.stderr.startswith("error: REDIS_URL is not set, and no `make run` is running")


def test_sigterm_to_make_stops_everything(make_run: MakeRun) -> None:
    pids = make_run.descendants()
    make_run.process.send_signal(signal.SIGTERM)
    _assert_all_gone(make_run, pids)


def test_ctrl_c_stops_the_services_while_redis_still_runs(devrun: MakeRun, tmp_path: Path) -> None:
    """Redis is not in the terminal's group: the Ctrl-C reaches it after the services
    stopped, which is why they could deregister (their records are gone from its AOF)."""
    os.killpg(devrun.process.pid, signal.SIGINT)
    assert devrun.process.wait(timeout=60) == 0
    with (
        EmbeddedRedis(appendonly=True, data_dir=tmp_path / "run" / "redis") as server,
        redis.Redis.from_url(server.url) as client,
    ):
        left = {s: client.hkeys(constants.instance_record_key(s)) for s in ("iptv", "auth")}
    assert left == {"iptv": [], "auth": []}
