"""Build the gateway's compiled hot path: `python -m common.compile` (`make compile`).

mypyc compiles `common.compiled.COMPILED_MODULES` into `.compiled/` (see
`common.compiled` for why and how the build is used). Nothing is done when the build
already matches the sources. Without a C compiler it says so and leaves the hot path
interpreted (exit 0); a compiler that fails is an error (exit 1), so CI, which has one,
never tests a build it did not make.

The build goes to a directory of its own and replaces the old one only once whole,
its manifest (the sources' SHA-256, taken before compiling) written last: a process
starting meanwhile sees the old build or the new one, and a source edited during the
build makes the new one stale, never wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common.compiled import (
    BUILD_DIR,
    C_MODULES,
    COMPILED_MODULES,
    MANIFEST,
    ROOT,
    c_source_path,
    fingerprint,
    source_path,
)

# The name of mypyc's shared library of the build (`build`'s `group`).
GROUP = "switchboard_hot"
# Run in a child: setuptools and mypyc keep process-wide state (logging, argv, cwd).
_SETUP = """
import json, sys
from mypyc.build import mypycify
from setuptools import Extension, setup
paths, c_modules = json.loads(sys.argv[1]), json.loads(sys.argv[4])
lib, temp, group = sys.argv[2], sys.argv[3], sys.argv[5]
hand_written = [Extension(name, [source], extra_compile_args=["-O2", "-Wall", "-Wextra"])
                for name, source in c_modules]
setup(
    name="switchboard-hot-path", packages=[], py_modules=[],
    ext_modules=mypycify(paths, group_name=group, target_dir=temp + "/c")
                + hand_written,
    script_args=["-q", "build_ext", "--build-lib", lib, "--build-temp", temp],
)
"""


def compiler() -> str | None:
    """The C compiler setuptools would use (`CC`, else `cc`), when there is one."""
    return shutil.which(os.environ.get("CC", "cc").split()[0])


def up_to_date(
    modules: tuple[str, ...] = COMPILED_MODULES,
    out: Path = BUILD_DIR,
    c_modules: tuple[str, ...] = C_MODULES,
) -> bool:
    """Whether the build in `out` is of exactly `modules` and `c_modules` as their sources
    are now (whether or not this process would use it: `SWITCHBOARD_COMPILED`)."""
    try:
        built = json.loads((out / MANIFEST).read_text())
        # (OSError too: a listed source that is gone; `build` then says which.)
        return bool(built == fingerprint(modules, out.parent, c_modules))
    except (OSError, ValueError):
        return False


def build(
    modules: tuple[str, ...] = COMPILED_MODULES,
    root: Path = ROOT,
    out: Path = BUILD_DIR,
    c_modules: tuple[str, ...] = C_MODULES,
    group: str = GROUP,
) -> None:
    """Compile `modules` with mypyc and the hand-written `c_modules` (found under `root`)
    into `out`, replacing what was there. `group` names the build's shared library (a
    top-level module once the build is used): two builds used in one process need two
    names (the tests' toy build, whose package imports `common`, which uses this one).

    Raises `subprocess.CalledProcessError` when mypyc or the compiler fails (their
    output went to this process's stderr)."""
    # Before compiling: an edit meanwhile makes the build stale.
    manifest = fingerprint(modules, root, c_modules)
    paths = [str(source_path(m, Path())) for m in modules]  # relative to `root`, the cwd
    c_sources = [(m, str(c_source_path(m, Path()))) for m in c_modules]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".compiling-", dir=out.parent) as work:
        stage, temp = Path(work) / "build", Path(work) / "temp"
        env = {**os.environ, "PYTHONPATH": str(root)}
        subprocess.run(
            [sys.executable, "-c", _SETUP, json.dumps(paths), str(stage), str(temp),
             json.dumps(c_sources), group],
            cwd=root, env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        old = Path(work) / "old"
        if out.exists():
            out.rename(old)
        stage.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.compile", description=__doc__)
    parser.add_argument("--clean", action="store_true", help="remove the build and stop")
    args = parser.parse_args(argv)
    if args.clean:
        shutil.rmtree(BUILD_DIR, ignore_errors=True)
        return 0
    if up_to_date():
        print("compiled hot path: up to date")
        return 0
    if compiler() is None:
        print("compiled hot path: no C compiler (cc); the gateway runs its Python interpreted")
        return 0
    print(f"compiled hot path: compiling {len(COMPILED_MODULES)} modules with mypyc"
          f" and {len(C_MODULES)} C modules ...")  # fmt: skip
    try:
        build()
    except subprocess.CalledProcessError as exc:
        print(f"compiled hot path: the build failed ({exc})", file=sys.stderr)
        return 1
    print(f"compiled hot path: built into {BUILD_DIR.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
