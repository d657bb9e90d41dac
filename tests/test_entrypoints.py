"""Each image's CMD and HEALTHCHECK, run outside Docker exactly as written in its Dockerfile.

Docker cannot run on our machines, so this is how the images' entrypoints are
exercised: the Dockerfile's ENV is applied (PYTHONPATH pointing at the repo root,
which is what `/app` is inside the image; loopback instead of 0.0.0.0; free ports),
its CMD is started, its HEALTHCHECK command must then pass, and SIGTERM must stop
the process cleanly (exit 0).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, ServiceProcess, free_port, wait_for

pytestmark = pytest.mark.timeout(120)

DOCKERFILES = sorted(p for p in ROOT.glob("**/Dockerfile") if ".venv" not in p.parts)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    joined: list[str] = []
    current = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        joined.append(current + stripped)
        current = ""
    out = []
    for line in joined:
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _command(arguments: str) -> list[str]:
    """Exec form (JSON array) as is; shell form through `sh -c`, as Docker does."""
    if arguments.startswith("["):
        return list(json.loads(arguments))
    return ["/bin/sh", "-c", arguments]


def _image_spec(dockerfile: Path) -> tuple[dict[str, str], list[str], list[str]]:
    env: dict[str, str] = {}
    cmd: list[str] = []
    healthcheck: list[str] = []
    for keyword, rest in _instructions(dockerfile):
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
        elif keyword == "CMD":
            cmd = _command(rest)
        elif keyword == "HEALTHCHECK":
            check = re.sub(r"^(--\S+\s+)*", "", rest)
            assert check.startswith("CMD "), f"{dockerfile}: HEALTHCHECK without CMD"
            healthcheck = _command(check[4:].strip())
    return env, cmd, healthcheck


def _localise(command: list[str]) -> list[str]:
    return [sys.executable if part == "python" else part for part in command]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_cmd_starts_and_healthcheck_passes(dockerfile: Path, redis_url: str) -> None:
    image_env, cmd, healthcheck = _image_spec(dockerfile)
    assert cmd and healthcheck
    assert image_env.get("PYTHONPATH") == "/app"  # the repo root inside the image
    env = dict(image_env)
    env.update(PYTHONPATH=str(ROOT), REDIS_URL=redis_url, BIND_HOST="127.0.0.1")
    for port_var in ("WEBAPI_PORT", "WEBSOCKET_PORT"):
        if port_var in env:
            env[port_var] = str(free_port())
    proc = ServiceProcess(_localise(cmd), env=env, name=f"image-{dockerfile.parent.name}").start()
    # Inside the image `python` is the image's interpreter; here, the venv's.
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    check_env = {**os.environ, **env, "PATH": path}
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    _localise(healthcheck), env=check_env, cwd=ROOT, capture_output=True, timeout=20
                ).returncode
                == 0
            ),
            timeout=60,
            interval=0.5,
        )
    except AssertionError:
        print(proc.log_tail())
        raise
    finally:
        code = proc.stop(signal.SIGTERM)
    assert code == 0, proc.log_tail()
    # And once it is gone, the same check must fail: it really tests the service.
    after = subprocess.run(
        _localise(healthcheck), env=check_env, cwd=ROOT, capture_output=True, timeout=20
    )
    assert after.returncode != 0


@pytest.mark.parametrize(("module", "port_var"), [("webapi", "WEBAPI_PORT"),
                                                  ("websocket", "WEBSOCKET_PORT")])  # fmt: skip
def test_a_port_already_taken_is_one_line_naming_it(module: str, port_var: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run(["-m", module], {"REDIS_URL": "redis://127.0.0.1:1/0", port_var: str(port)})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{module}: cannot listen on BIND_HOST='127.0.0.1', {port_var}={port}: "
        "Address already in use"
    ]


SECRET = "Sup3rS3cretPart"
# A password with an unencoded '/': redis-py's own error would quote part of it.
LEAKY_URL = f"redis://:{SECRET}/tail@127.0.0.1:6379/0"
SHORT_SECRET = "short-jwt-secret"  # under 32 bytes: refused at settings load
SERVICES = ("webapi", "websocket", "microservices.iptv", "microservices.auth")


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("AUTH_")}
    return subprocess.run(
        [sys.executable, *args],
        env={**base, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        *((["-m", s], {"REDIS_URL": LEAKY_URL}, "REDIS_URL") for s in SERVICES),
        *((["-m", s], {}, "REDIS_URL") for s in SERVICES),
        (["-m", "webapi"], {"REDIS_URL": "redis://127.0.0.1:1/0", "WEBAPI_PORT": "abc"},
         "WEBAPI_PORT"),
        (["-m", "websocket"], {"REDIS_URL": "redis://127.0.0.1:1/0", "LOG_LEVEL": "verbose"},
         "LOG_LEVEL"),
        *((["-m", s], {"REDIS_URL": "redis://127.0.0.1:1/0", "BIND_HOST": host}, "BIND_HOST")
          for s in ("webapi", "websocket") for host in ("10.0.0.300", "no.such.host.invalid",
                                                        "192.0.2.1")),
        (["-m", "microservices.iptv"],
         {"REDIS_URL": "redis://127.0.0.1:1/0", "HEARTBEAT_INTERVAL": "nan"},
         "HEARTBEAT_INTERVAL"),
        (["-m", "microservices.auth"], {"REDIS_URL": "redis://127.0.0.1:1/0", "JWT_TTL": "-1"},
         "JWT_TTL"),
        (["-m", "microservices.auth"],
         {"REDIS_URL": "redis://127.0.0.1:1/0", "AUTH_ADMIN_PASSWORD": SECRET},
         "AUTH_ADMIN_USERNAME"),
        *((["-m", s], {"REDIS_URL": "redis://127.0.0.1:1/0", "JWT_SECRET": SHORT_SECRET},
           "JWT_SECRET") for s in SERVICES),
        (["-m", "microservices.auth.admin", "rotate-signing-key"], {"REDIS_URL": LEAKY_URL},
         "REDIS_URL"),
        (["-m", "common.policy", "get"], {"REDIS_URL": LEAKY_URL}, "REDIS_URL"),
        (["-m", "common.deadletters", "list", "iptv"], {"REDIS_URL": LEAKY_URL}, "REDIS_URL"),
        (["-m", "common.devrun"], {"REDIS_URL": LEAKY_URL}, "REDIS_URL"),
    ],
)  # fmt: skip
def test_a_configuration_error_is_one_line_naming_the_variable(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = _run(args, env)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert SECRET not in result.stderr and SHORT_SECRET not in result.stderr


def test_create_admin_without_a_terminal_asks_for_password_stdin(redis_url: str) -> None:
    result = _run(
        ["-m", "microservices.auth.admin", "create-admin", "--username", "root"],
        {"REDIS_URL": redis_url},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: no terminal to prompt for the password: use --password-stdin"
    ]
