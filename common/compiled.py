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

Hand-written C (`C_MODULES`: the request cycle's mechanical parts, issue 4) is built
with the same build, into the same directory, and fingerprinted the same way. Each C
module does what a Python function of the hot path does, which stays the reference,
the fallback and the tests' oracle; the hot path calls the C when the build is used,
unless `SWITCHBOARD_C=0` (`c_module`). On by default, as aiohttp's, yarl's and
multidict's C speedups are (`AIOHTTP_NO_EXTENSIONS` turns those off): with the policy
compiled too, the compiled Python alone brings the normal path to 0.46-0.53x nginx,
the C to 0.60-0.74x (bench/README.md, 2026-11-23), and issue 4 asks for 0.5x.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / ".compiled"
MANIFEST = "manifest.json"
# The request path of the gateway's fast path (`webapi.fastpath` documents it), with
# the policy it asks per request: the balancing and health bookkeeping, the registry
# view, the credential caches and scopes, the access checks, the upstream pool. The
# `common` ones are shared with the websocket service and the RPC workers, which use
# the same build (each package holding some calls `prefer_compiled`).
COMPILED_MODULES = (
    "common.apikey_cache",
    "common.balancing._base",
    "common.balancing._budget",
    "common.balancing._hashing",
    "common.balancing._health",
    "common.balancing._load",
    "common.balancing._rotation",
    "common.balancing.policy",
    "common.balancing.tries",
    "common.credentials",
    "common.http_head",
    "common.principal",
    "common.proxy_paths",
    "common.registry_view",
    "common.request_ids",
    "common.revocation",
    "common.scopes",
    "webapi.access",
    "webapi.fastpath.admission",
    "webapi.fastpath.direct",
    "webapi.fastpath.head",
    "webapi.fastpath.protocol",
    "webapi.fastpath.request",
    "webapi.fastpath.response",
    "webapi.fastpath.splicing",
    "webapi.passthrough_routes",
    "webapi.proxy.attempts",
    "webapi.proxy.connection",
    "webapi.proxy.deadlines",
    "webapi.proxy.forward",
    "webapi.proxy.replay",
    "webapi.proxy.upstream",
)
# Hand-written C extension modules, each from `<module path>.c` (module docstring).
C_MODULES: tuple[str, ...] = (
    "webapi.fastpath._cheads",
    "webapi.fastpath._creq",
    "webapi.proxy._cresp",
)

log = logging.getLogger("switchboard.compiled")
_c_in_use: list[str] = []  # the C modules `c_module` returned, in order


@dataclass(frozen=True)
class BuildState:
    """Whether the compiled build is used, and if not, why."""

    used: bool
    reason: str  # "compiled", or why the sources run


def source_path(module: str, root: Path = ROOT) -> Path:
    """The source file of `module` under `root`."""
    return root.joinpath(*module.split(".")).with_suffix(".py")


def c_source_path(module: str, root: Path = ROOT) -> Path:
    """The C source of the hand-written module `module` under `root`."""
    return root.joinpath(*module.split(".")).with_suffix(".c")


def fingerprint(
    modules: tuple[str, ...], root: Path = ROOT, c_modules: tuple[str, ...] = ()
) -> dict[str, object]:
    """What a build is valid for: the interpreter's ABI and each source's SHA-256."""
    sources = {m: _sha256(source_path(m, root)) for m in modules}
    built: dict[str, object] = {"abi": sys.implementation.cache_tag, "sources": sources}
    if c_modules:
        built["c_sources"] = {m: _sha256(c_source_path(m, root)) for m in c_modules}
    return built


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_state(build: Path = BUILD_DIR) -> BuildState:
    """Whether the build under `build` may be used: it matches every source it was built
    from (found under `build`'s parent) and this interpreter. A fresh read."""
    if os.environ.get("SWITCHBOARD_COMPILED", "1") == "0":
        return BuildState(False, "SWITCHBOARD_COMPILED=0")
    try:
        built = json.loads((build / MANIFEST).read_text())
        current = fingerprint(
            tuple(built["sources"]), build.parent, tuple(built.get("c_sources", ()))
        )
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


def c_turned_off() -> bool:
    """Whether this process's environment turns the C modules off (`SWITCHBOARD_C=0`)."""
    return os.environ.get("SWITCHBOARD_C", "1") == "0"


def c_module(name: str, build: Path = BUILD_DIR) -> ModuleType | None:
    """The hand-written C module `name` when the hot path runs compiled, unless
    `SWITCHBOARD_C=0`; else None (the caller runs its Python). Called at import time by
    the module that uses it, after its package's `prefer_compiled`."""
    if c_turned_off() or not _state(build).used:
        return None
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # a build made before the module was added to C_MODULES
        log.warning("C module %s not used: %s", name, exc)
        return None
    if name not in _c_in_use:
        _c_in_use.append(name)
    return module


def c_modules_in_use() -> tuple[str, ...]:
    """The hand-written C modules this process's hot path calls (`GET /admin/proxy/stats`)."""
    return tuple(_c_in_use)


E = TypeVar("E", bound=BaseException)


def caused(exc: E, cause: BaseException | None) -> E:
    """`exc` with `cause` as its `__cause__`: `raise caused(exc, cause)` in a compiled
    module for `raise exc from cause`, which mypyc (2.4.1) compiles as `raise exc`, the
    `from` dropped (`tests/common/test_compiled.py` checks the sources). Setting
    `__cause__` also sets `__suppress_context__`, as `raise ... from` does."""
    exc.__cause__ = cause
    return exc


def hot_path_state() -> BuildState:
    """How the hot path runs in this process (`GET /admin/proxy/stats`: `hot_path`)."""
    return _state(BUILD_DIR)
