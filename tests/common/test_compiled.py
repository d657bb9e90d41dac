"""The compiled hot path's build and its use (`common.compile`, `common.compiled`),
on a package of its own compiled by mypyc into a temporary checkout."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from common.compile import build, compiler, up_to_date
from common.compiled import COMPILED_MODULES, MANIFEST, ROOT, build_state, caused, source_path

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler")

_SOURCE = "def twice(x: int) -> int:\n    return 2 * x\n"
# Written after the build: the package's `__init__` is not compiled, only its module.
_INIT = (
    "from pathlib import Path\n"
    "from common.compiled import prefer_compiled\n"
    "prefer_compiled(__name__, __path__, Path(__file__).parent.parent / '.compiled')\n"
)
_PROBE = "import toyhot.fast as f; print(f.__file__); print(f.twice(21))"
# A hand-written C module (`common.compiled.C_MODULES`), used through `c_module`.
_C_SOURCE = """
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static PyObject *thrice(PyObject *self, PyObject *arg) {
    (void)self;
    long x = PyLong_AsLong(arg);
    if (x == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLong(3 * x);
}
static PyMethodDef methods[] = {{"thrice", thrice, METH_O, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cthrice", NULL, -1, methods};
PyMODINIT_FUNC PyInit__cthrice(void) { return PyModule_Create(&module); }
"""
_C_PROBE = (
    "from pathlib import Path; import toyhot; from common.compiled import c_module; "
    "m = c_module('toyhot._cthrice', Path(toyhot.__file__).parent.parent / '.compiled'); "
    "print(m and m.__file__); print(m and m.thrice(14))"
)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    (root / "toyhot").mkdir()
    (root / "toyhot" / "__init__.py").write_text("")
    (root / "toyhot" / "fast.py").write_text(_SOURCE)
    (root / "toyhot" / "_cthrice.c").write_text(_C_SOURCE)
    # A group of its own: `common`, which the toy package imports, uses the checkout's build.
    build(("toyhot.fast",), root, root / ".compiled", ("toyhot._cthrice",), group="toyhot_hot")
    (root / "toyhot" / "__init__.py").write_text(_INIT)
    return root


def _import(root: Path, probe: str = _PROBE, **env: str) -> tuple[str, str, str]:
    """The module's file and answer, and stderr, in a fresh interpreter."""
    path = os.pathsep.join((str(root), str(ROOT)))
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env = {**inherited, "PYTHONPATH": path, **env}  # (the suite may run with SWITCHBOARD_C=0)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
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
    assert list(manifest["c_sources"]) == ["toyhot._cthrice"]


def test_a_c_module_is_used_with_the_build_unless_switchboard_c_0(checkout: Path) -> None:
    for env in ({}, {"SWITCHBOARD_C": "1"}):  # on by default
        module_file, answer, _ = _import(checkout, _C_PROBE, **env)
        assert module_file.startswith(str(checkout / ".compiled" / "toyhot" / "_cthrice"))
        assert answer == "42"
    assert _import(checkout, _C_PROBE, SWITCHBOARD_C="0")[:2] == ("None", "None")
    off = _import(checkout, _C_PROBE, SWITCHBOARD_C="1", SWITCHBOARD_COMPILED="0")
    assert off[:2] == ("None", "None")


def test_a_c_source_edited_since_the_build_makes_it_stale(checkout: Path) -> None:
    source = checkout / "toyhot" / "_cthrice.c"
    source.write_text(_C_SOURCE.replace("3 * x", "x + x + x"))
    try:
        assert not build_state(checkout / ".compiled").used
        assert not up_to_date(("toyhot.fast",), checkout / ".compiled", ("toyhot._cthrice",))
        assert _import(checkout, _C_PROBE, SWITCHBOARD_C="1")[:2] == ("None", "None")
    finally:
        source.write_text(_C_SOURCE)
    assert up_to_date(("toyhot.fast",), checkout / ".compiled", ("toyhot._cthrice",))


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
        assert not up_to_date(("toyhot.fast",), checkout / ".compiled", ("toyhot._cthrice",))
    finally:
        source.write_text(_SOURCE)
    assert build_state(checkout / ".compiled").used


def test_a_build_is_up_to_date_whether_or_not_it_is_used(
    checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `make compile` under SWITCHBOARD_COMPILED=0 must not rebuild a build that matches.
    monkeypatch.setenv("SWITCHBOARD_COMPILED", "0")
    assert not build_state(checkout / ".compiled").used
    assert up_to_date(("toyhot.fast",), checkout / ".compiled", ("toyhot._cthrice",))
    assert not up_to_date(("toyhot.fast",), checkout / ".compiled", ())  # another list
    assert not up_to_date((), checkout / ".compiled", ("toyhot._cthrice",))
    # A listed source that is gone: not up to date (the build then says what is missing).
    assert not up_to_date(("toyhot.fast",), checkout / ".compiled", ("toyhot._gone",))
    assert not up_to_date(("toyhot.gone",), checkout / ".compiled", ("toyhot._cthrice",))


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


def test_no_compiled_module_raises_from() -> None:
    """mypyc compiles `raise exc from cause` as `raise exc`: the cause is lost, and
    `from None` no longer hides the context (an upstream's refused connect lost its
    `ConnectionRefusedError`: tests/webapi/test_upstream_errors.py). Compiled modules
    write `raise caused(exc, cause)` (`common.compiled.caused`)."""
    found = []
    for module in COMPILED_MODULES:
        tree = ast.parse(source_path(module, ROOT).read_text())
        found += [f"{module}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Raise) and node.cause is not None]  # fmt: skip
    assert found == []


def test_caused_is_raise_from() -> None:
    def raised(make: Callable[[], None]) -> BaseException:
        with pytest.raises(KeyError) as info:
            make()
        return info.value

    def original(cause: BaseException | None) -> None:
        try:
            raise ValueError("first")
        except ValueError:
            raise KeyError("second") from cause

    def through_caused(cause: BaseException | None) -> None:
        try:
            raise ValueError("first")
        except ValueError:
            raise caused(KeyError("second"), cause)  # noqa: B904

    for cause in (OSError("why"), None):
        expected, got = raised(partial(original, cause)), raised(partial(through_caused, cause))
        assert got.__cause__ is expected.__cause__ is cause
        assert got.__suppress_context__ is expected.__suppress_context__ is True
        assert type(got.__context__) is type(expected.__context__) is ValueError
