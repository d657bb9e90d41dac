"""`python -m common.scaffold NAME [--root DIR]`: add a working RPC worker service.

`make new-service NAME=foo` runs this. It creates

    microservices/foo/{__init__,__main__,service}.py, Dockerfile, requirements.txt, README.md
    tests/microservices/test_foo.py

and registers the service where the rest of the repo looks for it: an entry
appended to `services:` in docker-compose.yml (which must stay the file's last
top-level key), a `foo: python -m microservices.foo` line in the Procfile, and a
`-r microservices/foo/requirements.txt` line in requirements-dev.txt so
`make install` picks up its dependencies.

Everything is checked before anything is written: a bad or taken name, or a
compose file the entry cannot be appended to, leaves the checkout untouched.
The templates live in `common/scaffold_templates/` with `{{name}}` placeholders.
"""

from __future__ import annotations

import argparse
import keyword
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.scopes import RESERVED_SERVICES

TEMPLATES = Path(__file__).resolve().parent / "scaffold_templates"
PLACEHOLDER = "{{name}}"

MIN_LEN, MAX_LEN = 2, 32
# Lowercase identifier, no leading/trailing/double underscore: also a valid
# compose service and image name.
NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
# Top-level folders, compose services and module names a service must not shadow, and
# the names the gateway gives a meaning of their own (`admin`: the admin API).
RESERVED = (
    frozenset({"bench", "common", "microservices", "redis", "test", "tests", "webapi", "websocket"})
    | RESERVED_SERVICES
)

# Generated file (relative to the service folder) -> its template.
SERVICE_FILES = {
    "__init__.py": "__init__.py.tmpl",
    "__main__.py": "__main__.py.tmpl",
    "service.py": "service.py.tmpl",
    "Dockerfile": "Dockerfile.tmpl",
    "requirements.txt": "requirements.txt.tmpl",
    "README.md": "README.md.tmpl",
}
COMPOSE_FILE = "docker-compose.yml"
PROCFILE = "Procfile"
DEV_REQUIREMENTS = "requirements-dev.txt"


class ScaffoldError(Exception):
    """The service cannot be created; the message says why and nothing was written."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Every file the scaffold writes, with its full new content."""

    new_dirs: tuple[Path, ...]
    files: dict[Path, str]


def render(template: str, name: str) -> str:
    """The text of `template` (a file in scaffold_templates/) for service `name`."""
    text = (TEMPLATES / template).read_text(encoding="utf-8").replace(PLACEHOLDER, name)
    if "{{" in text:
        raise ScaffoldError(f"template {template} has an unknown placeholder")
    return text


def check_name(name: str) -> None:
    """Raise `ScaffoldError` unless `name` is a well-formed, unreserved service name."""
    if not MIN_LEN <= len(name) <= MAX_LEN:
        raise ScaffoldError(f"service name {name!r} must be {MIN_LEN} to {MAX_LEN} characters")
    if not NAME_RE.fullmatch(name):
        raise ScaffoldError(
            f"service name {name!r} must be a lowercase Python identifier: a letter, then "
            "letters, digits and single underscores (not at the end), e.g. 'billing' or 'nlp_v2'"
        )
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        raise ScaffoldError(f"service name {name!r} is a Python keyword")
    if name in RESERVED:
        raise ScaffoldError(
            f"service name {name!r} is reserved (taken by: {', '.join(sorted(RESERVED))})"
        )


def plan(name: str, root: Path) -> Plan:
    """Check everything and compute the files to write, without touching the disk."""
    check_name(name)
    if not (root / "microservices" / "__init__.py").is_file():
        raise ScaffoldError(f"{root} is not a Switchboard checkout: no microservices/__init__.py")
    service_dir = root / "microservices" / name
    tests_dir = root / "tests" / "microservices"
    test_file = tests_dir / f"test_{name}.py"
    for taken in (service_dir, root / name, test_file):
        if taken.exists():
            raise ScaffoldError(f"{taken.relative_to(root)} already exists: pick another name")

    files = {service_dir / rel: render(tmpl, name) for rel, tmpl in SERVICE_FILES.items()}
    files[test_file] = render("test_service.py.tmpl", name)
    new_dirs = [service_dir]
    if not tests_dir.is_dir():
        new_dirs.append(tests_dir)
        files[tests_dir / "__init__.py"] = ""
    files[root / COMPOSE_FILE] = _with_compose_entry(root / COMPOSE_FILE, name)
    files[root / PROCFILE] = _with_procfile_line(root / PROCFILE, name)
    dev_requirements = root / DEV_REQUIREMENTS
    if dev_requirements.is_file():
        files[dev_requirements] = _with_requirements_line(dev_requirements, name)
    return Plan(new_dirs=tuple(new_dirs), files=files)


def create_service(name: str, root: Path) -> list[Path]:
    """Create service `name` under the checkout at `root`; return the paths written."""
    todo = plan(name, root)
    for directory in todo.new_dirs:
        directory.mkdir(parents=True)
    for path, text in todo.files.items():
        path.write_text(text, encoding="utf-8")
    return list(todo.files)


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ScaffoldError(f"{path.name} not found in {path.parent}") from exc
    return text if not text or text.endswith("\n") else text + "\n"


def _with_compose_entry(path: Path, name: str) -> str:
    """docker-compose.yml with the service's entry appended at the end of `services:`."""
    text = _read(path)
    before = _services(text, path)
    if name in before:
        raise ScaffoldError(f"{path.name} already has a service named {name!r}")
    unit = _service_indent(text)
    entry = "".join(
        unit * (1 + _indent_level(line)) + line.lstrip(" ") if line.strip() else line
        for line in render("compose_entry.yml.tmpl", name).splitlines(keepends=True)
    )
    new_text = f"{text}\n{entry}"
    after = _services(new_text, path)
    expected_dockerfile = f"microservices/{name}/Dockerfile"
    added = after.get(name)
    if (
        not isinstance(added, dict)
        or added.get("build", {}).get("dockerfile") != expected_dockerfile
        or {k: v for k, v in after.items() if k != name} != before
    ):
        raise ScaffoldError(
            f"cannot append to {path.name}: `services:` must be its last top-level key, "
            "in block style"
        )
    return new_text


def _services(text: str, path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScaffoldError(f"{path.name} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or "services" not in data:
        raise ScaffoldError(f"{path.name} has no top-level `services:`")
    services = data["services"] or {}
    if not isinstance(services, dict):
        raise ScaffoldError(f"{path.name}: `services:` is not a mapping")
    return services


def _service_indent(text: str) -> str:
    """The indentation of the service keys under `services:` (two spaces if none yet)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(r"services:\s*(#.*)?", line):
            for following in lines[i + 1 :]:
                stripped = following.lstrip(" ")
                if stripped and not stripped.startswith("#"):
                    indent = following[: len(following) - len(stripped)]
                    return indent or "  "
    return "  "


def _indent_level(line: str) -> int:
    # The template is indented by two spaces per level.
    return (len(line) - len(line.lstrip(" "))) // 2


def _with_procfile_line(path: Path, name: str) -> str:
    text = _read(path)
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == name:
            raise ScaffoldError(f"{path.name} already has a process named {name!r}")
    return f"{text}{name}: python -m microservices.{name}\n"


def _with_requirements_line(path: Path, name: str) -> str:
    """requirements-dev.txt with `-r microservices/NAME/requirements.txt` after its last -r."""
    lines = _read(path).splitlines(keepends=True)
    include = f"-r microservices/{name}/requirements.txt\n"
    if include in lines:
        return "".join(lines)
    last_include = max((i for i, line in enumerate(lines) if line.startswith("-r ")), default=-1)
    at = last_include + 1 if last_include >= 0 else len(lines)
    return "".join([*lines[:at], include, *lines[at:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.scaffold",
        description="Create a working RPC worker service under microservices/NAME.",
    )
    parser.add_argument("name", metavar="NAME", help="service name, e.g. billing or nlp_v2")
    parser.add_argument(
        "--root", type=Path, default=Path.cwd(), help="repo root (default: current directory)"
    )
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    try:
        written = create_service(args.name, root)
    except ScaffoldError as exc:
        print(f"scaffold: error: {exc}", file=sys.stderr)
        return 1
    print(f"Created service {args.name!r}:")
    for path in written:
        print(f"  {path.relative_to(root)}")
    print(
        f"\nNext: edit microservices/{args.name}/service.py, then\n"
        f"  .venv/bin/python -m pytest tests/microservices/test_{args.name}.py\n"
        "  make run"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
