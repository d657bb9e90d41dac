"""Static checks of the deploy files: Dockerfiles, docker-compose.yml, Procfile, requirements.

No Docker engine is needed. The Procfile is the list of services; each must have a
compose service of the same name built from `<its folder>/Dockerfile`, and each
Dockerfile must lay the repo out under a PYTHONPATH directory exactly as in the
checkout, so the Procfile command works unchanged inside the image.
`docker compose config` runs too where the compose plugin is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(60)

COMPOSE = ROOT / "docker-compose.yml"
INFRA = {"redis"}  # compose services that are stock images, not built from this repo
REDIS_URL = "redis://redis:6379/0"
PUBLISHED = {"webapi": ["8000:8000"], "websocket": ["8001:8001"]}
GATEWAY_DEPENDENCIES = {"webapi": {"redis", "auth", "iptv"}, "websocket": {"redis", "auth", "iptv"}}
SECRET_KEY = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|API_?KEY|PRIVATE|CREDENTIAL", re.I)
# `${VAR}`, `${VAR:-}` or `${VAR:?message}`: taken from the environment, no literal value.
FROM_ENVIRONMENT = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?-|:?\?[^}]*)?\}")
URL_WITH_PASSWORD = re.compile(r"://[^/@\s]*:[^/@\s]+@")
PINNED = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,\s-]+\])?==[A-Za-z0-9.+!_-]+(\s*;.+)?"
)


# --- Procfile and compose -------------------------------------------------------------


def read_procfile() -> dict[str, str]:
    processes: dict[str, str] = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, command = line.partition(":")
        assert sep, f"Procfile line is not `name: command`: {line!r}"
        assert name.strip() not in processes, f"Procfile names {name!r} twice"
        processes[name.strip()] = command.strip()
    return processes


PROCFILE = read_procfile()


def service_folder(name: str) -> str:
    """`python -m microservices.auth` -> `microservices/auth`."""
    argv = shlex.split(PROCFILE[name])
    assert argv[:2] == ["python", "-m"] and len(argv) == 3, (
        f"Procfile command of {name} is not `python -m <package>`: {PROCFILE[name]!r}"
    )
    return argv[2].replace(".", "/")


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def app_services() -> dict[str, dict[str, Any]]:
    return {k: v for k, v in load_compose()["services"].items() if k not in INFRA}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


# --- Dockerfile parsing ---------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    workdir: PurePosixPath  # the WORKDIR in effect when the instruction runs


@dataclass
class Copy:
    index: int  # position among the instructions
    sources: list[str]  # normalized paths relative to the build context (the repo root)
    dest: str
    workdir: PurePosixPath

    def landing(self, source: str) -> PurePosixPath:
        """Where `source` ends up in the image (a directory's contents land in dest)."""
        dest = self.workdir / self.dest
        if (ROOT / source).is_dir() or not (self.dest.endswith("/") or len(self.sources) > 1):
            return dest
        return dest / PurePosixPath(source).name


class Dockerfile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.instructions: list[Instruction] = []
        workdir = PurePosixPath("/")
        pending = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue  # blank lines and comments, also inside a continuation
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            keyword, _, args = (pending + line).partition(" ")
            pending = ""
            keyword, args = keyword.upper(), args.strip()
            if keyword == "WORKDIR":
                workdir = workdir / args
            self.instructions.append(Instruction(keyword, args, workdir))

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            tokens = shlex.split(instruction.args)
            if all("=" in t for t in tokens):
                values.update(t.partition("=")[::2] for t in tokens)
            else:  # legacy `ENV KEY value with spaces`
                values[tokens[0]] = " ".join(tokens[1:])
        return values

    def copies(self) -> list[Copy]:
        copies = []
        for index, instruction in enumerate(self.instructions):
            if instruction.keyword not in ("COPY", "ADD"):
                continue
            args = instruction.args
            flags = [t for t in shlex.split(args) if t.startswith("--")]
            if any(f.startswith("--from") for f in flags):
                continue  # from another stage or image, not from the build context
            paths = (
                json.loads(args[args.index("[") :])
                if "[" in args
                else [t for t in shlex.split(args) if not t.startswith("--")]
            )
            assert len(paths) >= 2, f"{self.path}: {instruction.keyword} {args}"
            sources = [normalize(s) for s in paths[:-1]]
            copies.append(Copy(index, sources, paths[-1], instruction.workdir))
        return copies

    def python_path(self) -> list[PurePosixPath]:
        raw = self.env().get("PYTHONPATH", "")
        return [PurePosixPath(p) for p in raw.split(":") if p and not p.startswith("$")]


def normalize(source: str) -> str:
    path = os.path.normpath(source)
    assert not path.startswith(".."), f"COPY source outside the build context: {source}"
    return "" if path == "." else path


def covered(path: str, sources: list[str]) -> bool:
    return any(path == s or path.startswith(s + "/") for s in sources)


# --- Per-service checks ---------------------------------------------------------------


@pytest.fixture(params=sorted(PROCFILE))
def svc(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def dockerfile_of(name: str) -> Dockerfile:
    path = ROOT / service_folder(name) / "Dockerfile"
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    return Dockerfile(path)


def test_procfile_and_compose_name_the_same_services() -> None:
    services = set(app_services())
    assert services == set(PROCFILE), (
        f"only in compose: {sorted(services - set(PROCFILE))}, "
        f"only in Procfile: {sorted(set(PROCFILE) - services)}"
    )


def test_every_service_folder_is_in_the_procfile() -> None:
    modules = {shlex.split(cmd)[-1] for cmd in PROCFILE.values()}
    folders = [d for d in (ROOT / "microservices").iterdir() if (d / "__main__.py").is_file()]
    missing = [d.name for d in folders if f"microservices.{d.name}" not in modules]
    assert not missing, f"service folders without a Procfile line: {missing}"


def test_compose_builds_from_the_repo_root_with_the_service_dockerfile(svc: str) -> None:
    build = app_services()[svc].get("build")
    assert isinstance(build, dict), f"{svc}: `build:` must be {{context, dockerfile}}"
    assert build.get("context") in (".", "./"), f"{svc}: build context must be the repo root"
    assert build.get("dockerfile") == f"{service_folder(svc)}/Dockerfile"


def test_compose_service_wiring(svc: str) -> None:
    service = app_services()[svc]
    assert environment(service).get("REDIS_URL") == REDIS_URL
    assert "LOG_LEVEL" in environment(service)
    assert service.get("restart") == "unless-stopped"
    assert service.get("ports", []) == PUBLISHED.get(svc, []), f"{svc}: published ports"


def test_dockerfile_base_and_environment(svc: str) -> None:
    dockerfile = dockerfile_of(svc)
    base = dockerfile.all("FROM")  # (`FROM <image> AS <stage>`: later stages build on it)
    image = base[0].args.split()[0] if base else ""
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:\w+)?", image)
    env = dockerfile.env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    if svc in PUBLISHED:
        assert env.get("BIND_HOST") == "0.0.0.0", f"{svc} would listen on loopback only"


def test_dockerfile_copies_only_common_and_its_own_folder(svc: str) -> None:
    dockerfile = dockerfile_of(svc)
    folder = service_folder(svc)
    allowed = ["common", folder]
    if folder.startswith("microservices/"):
        allowed.append("microservices/__init__.py")
    sources = [s for c in dockerfile.copies() for s in c.sources]
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile.path}: COPY source {source} is missing"
        assert covered(source, allowed), (
            f"{dockerfile.path}: copies {source!r} (allowed: {allowed})"
        )
    for needed in allowed:
        assert needed in sources, f"{dockerfile.path}: does not copy all of {needed}"


def test_dockerfile_lays_the_repo_out_under_pythonpath(svc: str) -> None:
    dockerfile = dockerfile_of(svc)
    python_path = dockerfile.python_path()
    assert python_path, f"{dockerfile.path}: no PYTHONPATH"
    for copy in dockerfile.copies():
        for source in copy.sources:
            landing = copy.landing(source)
            assert any(landing == base / source for base in python_path), (
                f"{dockerfile.path}: {source} lands at {landing}, not under PYTHONPATH "
                f"{[str(p) for p in python_path]} as in the repo"
            )


def test_dockerfile_installs_pinned_requirements_without_cache(svc: str) -> None:
    dockerfile = dockerfile_of(svc)
    folder = service_folder(svc)
    installs = [
        (i, instruction)
        for i, instruction in enumerate(dockerfile.instructions)
        if instruction.keyword == "RUN" and "pip install" in instruction.args
    ]
    assert installs, f"{dockerfile.path}: no `RUN pip install`"
    no_cache_env = dockerfile.env().get("PIP_NO_CACHE_DIR", "").lower() in ("1", "true", "on")
    for requirements in ("common/requirements.txt", f"{folder}/requirements.txt"):
        runs = [(i, r) for i, r in installs if f"-r {requirements}" in r.args]
        assert runs, f"{dockerfile.path}: does not install {requirements}"
        index, run = runs[0]
        assert "--no-cache-dir" in run.args or no_cache_env, f"{dockerfile.path}: pip cache kept"
        copied_before = [s for c in dockerfile.copies() if c.index < index for s in c.sources]
        assert covered(requirements, copied_before), (
            f"{dockerfile.path}: installs {requirements} before copying it"
        )


def test_dockerfile_runs_as_non_root_with_a_healthcheck(svc: str) -> None:
    dockerfile = dockerfile_of(svc)
    user = dockerfile.last("USER")
    assert user is not None, f"{dockerfile.path}: runs as root (no USER)"
    assert user.args.split(":")[0] not in ("root", "0"), f"{dockerfile.path}: USER {user.args}"

    check = dockerfile.last("HEALTHCHECK")
    assert check is not None and check.args.upper() != "NONE", f"{dockerfile.path}: HEALTHCHECK"
    assert "common.healthcheck" in check.args
    if svc in PUBLISHED:
        args = re.sub(
            r"\$\{?(\w+)\}?", lambda m: dockerfile.env().get(m.group(1), m.group(0)), check.args
        )
        port = re.search(r"http://127\.0\.0\.1:(\d+)/health", args)
        assert port, f"{dockerfile.path}: HEALTHCHECK does not GET /health: {check.args}"
        published = [p.split(":")[-1] for p in PUBLISHED[svc]]
        assert port.group(1) in published, f"{dockerfile.path}: health port {port.group(1)}"
    else:
        assert re.search(rf"--service\W+{svc}\b", check.args), f"{dockerfile.path}: {check.args}"


def test_dockerfile_cmd_is_the_procfile_command(svc: str) -> None:
    dockerfile = dockerfile_of(svc)
    assert not dockerfile.all("ENTRYPOINT"), f"{dockerfile.path}: ENTRYPOINT would wrap CMD"
    cmd = dockerfile.last("CMD")
    assert cmd is not None and cmd.args.startswith("["), f"{dockerfile.path}: CMD not exec form"
    assert json.loads(cmd.args) == shlex.split(PROCFILE[svc])


# --- Compose as a whole ---------------------------------------------------------------


def test_services_is_the_last_top_level_key() -> None:
    # `make new-service` appends its entry at the end of the file.
    assert list(load_compose())[-1] == "services"


def test_redis_persists_with_aof_on_a_named_volume() -> None:
    compose = load_compose()
    redis = compose["services"]["redis"]
    assert str(redis.get("image", "")).startswith("redis:")
    command = redis.get("command", "")
    argv = command if isinstance(command, list) else shlex.split(command)
    assert "--appendonly" in argv and argv[argv.index("--appendonly") + 1] == "yes"
    mounts = [str(v).split(":") for v in redis.get("volumes", [])]
    data_volumes = [m[0] for m in mounts if len(m) >= 2 and m[1] == "/data"]
    assert data_volumes, "redis has no volume on /data"
    assert data_volumes[0] in (compose.get("volumes") or {}), "redis /data is not a named volume"
    test = redis.get("healthcheck", {}).get("test", [])
    assert "redis-cli" in " ".join(test if isinstance(test, list) else [test])
    assert "ping" in " ".join(test if isinstance(test, list) else [test])
    assert "ports" not in redis, "redis must not be published outside the compose network"


def test_depends_on_waits_for_healthy_services() -> None:
    services = load_compose()["services"]
    for name, service in app_services().items():
        depends = service.get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on must use conditions"
        assert "redis" in depends, f"{name} does not wait for redis"
        assert GATEWAY_DEPENDENCIES.get(name, set()) <= set(depends), f"{name}: depends_on"
        for dependency, spec in depends.items():
            assert isinstance(spec, dict) and spec.get("condition") == "service_healthy", (
                f"{name} -> {dependency}: {spec}"
            )
            has_check = "healthcheck" in services[dependency] or (
                dependency in PROCFILE and dockerfile_of(dependency).last("HEALTHCHECK")
            )
            assert has_check, f"{name} waits for {dependency}, which has no healthcheck"


def test_no_literal_secrets_in_compose() -> None:
    for name, service in load_compose()["services"].items():
        for key, value in environment(service).items():
            if SECRET_KEY.search(key):
                assert FROM_ENVIRONMENT.fullmatch(value), (
                    f"{name}: {key} must come from the environment (${{{key}:-}}), not the file"
                )
            assert not URL_WITH_PASSWORD.search(value), f"{name}: {key} embeds a password"
    auth_env = environment(load_compose()["services"]["auth"])
    assert auth_env.get("JWT_SECRET") == "${JWT_SECRET:-}"


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on PATH")
    version = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=30
    )
    if version.returncode != 0:
        reason = (version.stderr or version.stdout).strip().splitlines()
        pytest.skip(f"`docker compose version` failed: {reason[0] if reason else version}")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- Requirements ---------------------------------------------------------------------


def requirement_files() -> list[Path]:
    found = []
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d != "node_modules"]
        found += [Path(directory) / f for f in files if re.fullmatch(r"requirements.*\.txt", f)]
    return sorted(found)


def test_every_requirement_is_pinned() -> None:
    files = requirement_files()
    assert ROOT / "common" / "requirements.txt" in files
    for path in files:
        for number, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.split(" #", 1)[0].strip()
            where = f"{path.relative_to(ROOT)}:{number}"
            if not line or line.startswith("#"):
                continue
            if line.startswith("-r "):
                assert (path.parent / line[3:].strip()).is_file(), f"{where}: {line}"
                continue
            assert PINNED.fullmatch(line), f"{where}: not pinned with ==: {line!r}"


def test_dev_requirements_include_every_service() -> None:
    dev = ROOT / "requirements-dev.txt"
    if not dev.is_file():
        pytest.skip("no requirements-dev.txt")
    includes = {line[3:].strip() for line in dev.read_text().splitlines() if line.startswith("-r ")}
    for name in PROCFILE:
        requirements = f"{service_folder(name)}/requirements.txt"
        assert (ROOT / requirements).is_file(), f"{requirements} is missing"
        assert requirements in includes, f"requirements-dev.txt does not include {requirements}"
