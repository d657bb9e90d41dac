"""The compiled hot path's build and its use (`common.compile`, `common.compiled`),
on a package of its own compiled by mypyc into a temporary checkout."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.compile import build, compiler, up_to_date
from common.compiled import COMPILED_MODULES, MANIFEST, ROOT, build_state, source_path

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler")

_SOURCE = "def twice(x: int) -> int:\n    return 2 * x\n"
# Written after the build: the package's `__init__` is not compiled, only its module.
_INIT = (
    "from pathlib import Path\n"
    "from common.compiled import prefer_compiled\n"
    "prefer_compiled(__name__, __path__, Path(__file__).parent.parent / '.compiled')\n"
)
_PROBE = "import toyhot.fast as f; print(f.__file__); print(f.twice(21))"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    (root / "toyhot").mkdir()
    (root / "toyhot" / "__init__.py").write_text("")
    (root / "toyhot" / "fast.py").write_text(_SOURCE)
    build(("toyhot.fast",), root, root / ".compiled")
    (root / "toyhot" / "__init__.py").write_text(_INIT)
    return root


def _import(root: Path, **env: str) -> tuple[str, str, str]:
    """The module's file and answer, and stderr, in a fresh interpreter."""
    path = os.pathsep.join((str(root), str(ROOT)))
    env = {**os.environ, "PYTHONPATH": path, **env}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          env=env, check=True, timeout=60)  # fmt: skip
    module_file, answer = done.stdout.split()
    return module_file, answer, done.stderr


def test_a_fresh_build_is_imported_in_place_of_the_source(checkout: Path) -> None:
    module_file, answer, _ = _import(checkout)
    assert module_file.startswith(str(checkout / ".compiled" / "toyhot"))
    assert module_file.endswith(".so")
    assert answer == "42"
    manifest = json.loads((checkout / ".compiled" / MANIFEST).read_text())
    assert list(manifest["sources"]) == ["toyhot.fast"]


def test_switchboard_compiled_0_runs_the_source(checkout: Path) -> None:
    module_file, answer, _ = _import(checkout, SWITCHBOARD_COMPILED="0")
    assert module_file == str(checkout / "toyhot" / "fast.py")
    assert answer == "42"


def test_a_source_edited_since_the_build_runs_as_source_and_is_warned_of(
    checkout: Path,
) -> None:
    source = checkout / "toyhot" / "fast.py"
    source.write_text(_SOURCE.replace("2 * x", "x + x"))
    try:
        module_file, answer, stderr = _import(checkout)
        assert module_file == str(source)
        assert answer == "42"
        assert "compiled hot path not used: stale" in stderr
        assert not build_state(checkout / ".compiled").used
        assert not up_to_date(("toyhot.fast",), checkout / ".compiled")  # make compile builds
    finally:
        source.write_text(_SOURCE)
    assert build_state(checkout / ".compiled").used


def test_a_build_is_up_to_date_whether_or_not_it_is_used(
    checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `make compile` under SWITCHBOARD_COMPILED=0 must not rebuild a build that matches.
    monkeypatch.setenv("SWITCHBOARD_COMPILED", "0")
    assert not build_state(checkout / ".compiled").used
    assert up_to_date(("toyhot.fast",), checkout / ".compiled")
    assert not up_to_date((), checkout / ".compiled")  # a build of another list


def test_no_build_runs_the_source_quietly(tmp_path: Path) -> None:
    (tmp_path / "toyhot").mkdir()
    (tmp_path / "toyhot" / "__init__.py").write_text(_INIT)
    (tmp_path / "toyhot" / "fast.py").write_text(_SOURCE)
    module_file, answer, stderr = _import(tmp_path)
    assert module_file == str(tmp_path / "toyhot" / "fast.py")
    assert (answer, stderr) == ("42", "")
    assert build_state(tmp_path / ".compiled").reason == "not built (make compile)"


def test_no_compiled_coroutine_awaits_in_a_finally() -> None:
    """mypyc compiles a `finally` that holds an `await` so that, left without an
    exception, it re-raises whatever `sys.exc_info()` holds, which a compiled coroutine
    leaves set to the last exception it handled: the fast path's coroutine raised
    another request's cut answer after writing a whole one (`FastPathProtocol._answer`,
    tests/webapi/test_cuts_logged.py)."""
    found = []
    for module in COMPILED_MODULES:
        path = source_path(module, ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Try | ast.TryStar):
                awaits = [n for part in node.finalbody for n in ast.walk(part)
                          if isinstance(n, ast.Await | ast.AsyncFor | ast.AsyncWith)]  # fmt: skip
                found += [f"{module}:{n.lineno}" for n in awaits]
    assert found == []
