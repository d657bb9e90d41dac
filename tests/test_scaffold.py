"""`python -m common.scaffold`: run on a copy of the repo, then run what it generated.

The copy holds the library, the test helpers, the deploy files and the files the
scaffold edits, so the generated service is checked the way the real repo is:
by the deploy-file checks, by ruff, and by running its own end-to-end test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(240)

NAME = "demo1"
COPIED = [
    "common",
    "microservices",
    "webapi",
    "websocket",
    "docker-compose.yml",
    "Procfile",
    "pyproject.toml",
    "requirements-dev.txt",
    "tests/__init__.py",
    "tests/helpers.py",
    "tests/conftest.py",
    "tests/microservices/__init__.py",
    "tests/test_deploy_files.py",
]
GENERATED = [
    f"microservices/{NAME}/__init__.py",
    f"microservices/{NAME}/__main__.py",
    f"microservices/{NAME}/service.py",
    f"microservices/{NAME}/Dockerfile",
    f"microservices/{NAME}/requirements.txt",
    f"microservices/{NAME}/README.md",
    f"tests/microservices/test_{NAME}.py",
]
EDITED = ["docker-compose.yml", "Procfile", "requirements-dev.txt"]


def run(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python *args` in `root`, with only `root` on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=str(root), TEST_LOG_DIR=str(root / ".logs"))
    env.pop("REDIS_URL", None)
    return subprocess.run(
        [sys.executable, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def scaffold(root: Path, name: str) -> subprocess.CompletedProcess[str]:
    return run(root, "-m", "common.scaffold", name, "--root", str(root))


def snapshot(root: Path) -> dict[str, str]:
    return {rel: (root / rel).read_text() for rel in EDITED}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache")
    for rel in COPIED:
        source, target = ROOT / rel, root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            shutil.copy2(source, target)
    return root


@pytest.fixture(scope="module")
def repo(pristine: Path) -> Path:
    """The copy after `python -m common.scaffold demo1` (run once for the module)."""
    before = snapshot(pristine)
    result = scaffold(pristine, NAME)
    assert result.returncode == 0, result.stderr
    assert snapshot(pristine) != before
    return pristine


def test_creates_the_service_files(repo: Path) -> None:
    for rel in GENERATED:
        assert (repo / rel).is_file(), f"{rel} was not created"
    assert f'Service("{NAME}")' in (repo / f"microservices/{NAME}/service.py").read_text()
    assert "{{" not in "".join((repo / rel).read_text() for rel in GENERATED)


def test_appends_a_compose_entry(repo: Path) -> None:
    original = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose = yaml.safe_load((repo / "docker-compose.yml").read_text())
    entry = compose["services"].pop(NAME)
    assert compose == original, "the other entries and keys must stay as they were"
    assert entry["build"] == {"context": ".", "dockerfile": f"microservices/{NAME}/Dockerfile"}
    assert entry["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert entry["depends_on"] == {"redis": {"condition": "service_healthy"}}


def test_registers_in_procfile_and_dev_requirements(repo: Path) -> None:
    procfile = (repo / "Procfile").read_text().splitlines()
    assert procfile[-1] == f"{NAME}: python -m microservices.{NAME}"
    assert procfile[:-1] == (ROOT / "Procfile").read_text().splitlines()
    dev = (repo / "requirements-dev.txt").read_text().splitlines()
    assert f"-r microservices/{NAME}/requirements.txt" in dev


def test_the_same_name_twice_fails_and_changes_nothing(repo: Path) -> None:
    before = snapshot(repo)
    result = scaffold(repo, NAME)
    assert result.returncode != 0
    assert f"microservices/{NAME} already exists" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(repo) == before


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Bad-Name", "lowercase Python identifier"),
        ("common", "reserved"),
        ("redis", "reserved"),
        ("admin", "reserved"),  # the admin API's scope: only admins could call it
        ("auth", "reserved"),
        ("iptv", "already exists"),
        ("x", "2 to 32 characters"),
        ("a" * 33, "2 to 32 characters"),
        ("1abc", "lowercase Python identifier"),
        ("nlp_", "lowercase Python identifier"),
        ("class", "Python keyword"),
    ],
)
def test_bad_names_fail_with_a_clear_message(repo: Path, name: str, reason: str) -> None:
    before = snapshot(repo)
    result = scaffold(repo, name)
    assert result.returncode != 0
    assert reason in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert snapshot(repo) == before
    assert not (repo / "tests" / "microservices" / f"test_{name}.py").exists()


def test_an_unappendable_compose_file_fails_and_changes_nothing(pristine: Path) -> None:
    root = pristine.parent / "unappendable"
    shutil.copytree(pristine, root)
    compose = root / "docker-compose.yml"
    compose.write_text(compose.read_text() + "x-trailer:\n  note: services is no longer last\n")
    before = snapshot(root)
    result = scaffold(root, "other")
    assert result.returncode != 0
    assert "must be its last top-level key" in result.stderr
    assert snapshot(root) == before
    assert not (root / "microservices" / "other").exists()


def test_generated_code_is_ruff_clean(repo: Path) -> None:
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed next to this interpreter")
    files = [rel for rel in GENERATED if rel.endswith(".py")]
    for command in (["check"], ["format", "--check", "--diff"]):
        result = subprocess.run(
            [str(ruff), *command, *files], cwd=repo, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_generated_service_passes_the_deploy_checks(repo: Path) -> None:
    result = run(repo, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_deploy_files.py")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_generated_test_passes_against_a_real_worker(repo: Path) -> None:
    test_file = f"tests/microservices/test_{NAME}.py"
    result = run(repo, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, timeout=180)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout
