"""Where `make run`'s embedded Redis is found by the commands run in another shell.

`make run` starts a Redis on a free port and gives `REDIS_URL` to its own children
only; an operator command (`microservices.auth.admin`, `common.policy`,
`common.deadletters`) run in another terminal has none. So `make run` writes the
URL and its pid under `RUN_DIR` (`write_dev_redis_url`), and those commands read it
when `REDIS_URL` is unset (`cli_redis_url`), as long as that `make run` is alive.
The services themselves never read it: they need `REDIS_URL`, so a test or a second
checkout cannot reach a running `make run`'s Redis by accident.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.redis_url import check_redis_url, redacted_url
from common.settings import REPO_ROOT, Settings, run_path

__all__ = ["cli_redis_url", "remove_dev_redis_url", "write_dev_redis_url"]

# Where `make run` says which Redis it started, for the commands run in another shell.
_DEV_REDIS_FILE = "redis-url"


def write_dev_redis_url(settings: Settings, url: str) -> Path:
    """Record `make run`'s embedded Redis (`url`, this process's pid) for `cli_redis_url`;
    the file written (readable by its owner only). Remove it with `remove_dev_redis_url`."""
    path = run_path(settings, _DEV_REDIS_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump({"url": url, "pid": os.getpid()}, file)
    temporary.replace(path)  # whole or not at all, for a command reading it meanwhile
    return path


def remove_dev_redis_url(settings: Settings) -> None:
    """Remove the file `write_dev_redis_url` wrote, if it is still this process's."""
    path = run_path(settings, _DEV_REDIS_FILE)
    if _read_dev_redis(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def cli_redis_url(settings: Settings, program: str) -> str:
    """The Redis of an operator command (`microservices.auth.admin`, `common.policy`,
    `common.deadletters`): `REDIS_URL`, else the embedded Redis of the `make run` running
    in this checkout (the newcomer's case: `make run` in one terminal, the command in
    another, where `REDIS_URL` was never set), said on stderr. `ConfigError` when neither
    is there, or when the `make run` that wrote the file is gone."""
    if settings.redis_url:
        return settings.redis_url
    path = run_path(settings, _DEV_REDIS_FILE)
    found = _read_dev_redis(path)
    url, pid = found.get("url"), found.get("pid")
    if not isinstance(url, str) or not url:
        raise ConfigError(
            f"REDIS_URL is not set, and no `make run` is running in this checkout (it "
            f"writes the URL of its Redis to {_shown(path)}): start `make run` first, "
            "or export REDIS_URL=redis://host:6379/0"
        )
    if not isinstance(pid, int) or pid <= 0 or not _alive(pid):
        raise ConfigError(
            f"REDIS_URL is not set, and the `make run` that wrote {_shown(path)} is not "
            "running any more: start `make run` again, or export REDIS_URL"
        )
    check_redis_url(url)
    print(f"{program}: REDIS_URL is not set: using the Redis of `make run`, "
          f"{redacted_url(url)} (from {_shown(path)})", file=sys.stderr)  # fmt: skip
    return url


def _read_dev_redis(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, unreadable, not JSON (UnicodeDecodeError too)
        return {}
    return data if isinstance(data, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it (`.run/redis-url`)."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
