"""The gateway's hot path, compiled by mypyc when a build of it exists (`make compile`).

Why: the gateway's fast path spends most of its time per request in its own Python
(framing, admission, building the two heads, the upstream connection's callbacks).
mypyc compiles those typed modules as they are into C extensions; bench/README.md
("The compiled hot path") has the measured difference. The modules stay the plain,
typed Python everyone reads and edits: without a build, the same code runs
interpreted, and it is the same behaviour (the suite runs on the compiled build).

How: `python -m common.compile` builds `COMPILED_MODULES` into `.compiled/` and
writes a manifest of their sources' SHA-256 there last. Each package holding some of
them calls `prefer_compiled(__name__, __path__)` in its `__init__`: when the build
matches every source, the package's directory in the build goes first in its
`__path__`, so its extension modules are imported in place of the sources. A build
that no longer matches (a source edited since) is never used: a warning says so and
the sources run. `SWITCHBOARD_COMPILED=0` runs the sources regardless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / ".compiled"
MANIFEST = "manifest.json"
# The request path of the gateway's fast path; `webapi.fastpath` documents it.
COMPILED_MODULES = (
    "webapi.fastpath.admission",
    "webapi.fastpath.direct",
    "webapi.fastpath.head",
    "webapi.fastpath.protocol",
    "webapi.fastpath.request",
    "webapi.fastpath.response",
    "webapi.fastpath.splicing",
    "webapi.proxy.connection",
)

log = logging.getLogger("switchboard.compiled")


@dataclass(frozen=True)
class BuildState:
    """Whether the compiled build is used, and if not, why."""

    used: bool
    reason: str  # "compiled", or why the sources run


def source_path(module: str, root: Path = ROOT) -> Path:
    """The source file of `module` under `root`."""
    return root.joinpath(*module.split(".")).with_suffix(".py")


def fingerprint(modules: tuple[str, ...], root: Path = ROOT) -> dict[str, object]:
    """What a build is valid for: the interpreter's ABI and each source's SHA-256."""
    sources = {m: hashlib.sha256(source_path(m, root).read_bytes()).hexdigest() for m in modules}
    return {"abi": sys.implementation.cache_tag, "sources": sources}


def build_state(build: Path = BUILD_DIR) -> BuildState:
    """Whether the build under `build` may be used: it matches every source it was built
    from (found under `build`'s parent) and this interpreter. A fresh read."""
    if os.environ.get("SWITCHBOARD_COMPILED", "1") == "0":
        return BuildState(False, "SWITCHBOARD_COMPILED=0")
    try:
        built = json.loads((build / MANIFEST).read_text())
        current = fingerprint(tuple(built["sources"]), build.parent)
    except FileNotFoundError:
        return BuildState(False, "not built (make compile)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return BuildState(False, f"unreadable build manifest: {exc!r}")
    if built != current:
        return BuildState(False, "stale: the sources changed since the build (make compile)")
    return BuildState(True, "compiled")


@cache
def _state(build: Path) -> BuildState:
    state = build_state(build)
    if state.reason.startswith("stale"):
        log.warning("compiled hot path not used: %s", state.reason)
    return state


def prefer_compiled(package: str, path: list[str], build: Path = BUILD_DIR) -> bool:
    """Put `package`'s compiled modules ahead of its sources when the build is fresh.

    Called from the package's `__init__` with its `__name__` and `__path__`, before it
    imports any of its compiled submodules."""
    if not _state(build).used:
        return False
    compiled_dir = str(build.joinpath(*package.split(".")))
    if compiled_dir not in path:
        path.insert(0, compiled_dir)
    # mypyc's shared library of the build is a top-level module of the build directory
    # (appended: the checkout's own packages come first).
    if str(build) not in sys.path:
        sys.path.append(str(build))
    return True


def hot_path_state() -> BuildState:
    """How the hot path runs in this process (`GET /admin/proxy/stats`: `hot_path`)."""
    return _state(BUILD_DIR)
