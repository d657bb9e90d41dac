"""`python -m common.policy`: read, write, check and audit the live policy from a shell.

    python -m common.policy get [--version N]            the document (JSON) on stdout
    python -m common.policy put FILE [--expected-version N]      replaces the whole document
    python -m common.policy patch FILE [--expected-version N]    a JSON merge patch (RFC 7396)
    python -m common.policy validate FILE                 no Redis needed
    python -m common.policy history [--limit N] [--json]     N from 1 to 1000 (20)

FILE is a JSON document, "-" for stdin. `put` refuses a document that leaves out a
section the stored policy has entries in (`"limits": []` removes every limit);
`patch` changes only what FILE names (`{"services": {"nlp": {"strategy": "hash"}}}`)
and `validate` warns of the sections FILE leaves out. Writes are audited as
"cli:<os user>".
Uses REDIS_URL, or, when it is not set, the Redis `make run` started
(`common.dev_redis.cli_redis_url`). Exit status: 0 done, 1 refused (invalid policy, version
conflict, Redis unreachable, unreadable file, a stored version that is not an
integer), 2 bad usage. An audit entry's field that does not read shows as "?".
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from typing import Any

from common.connection import connect
from common.dev_redis import cli_redis_url
from common.errors import RedisUnavailable, SwitchboardError
from common.policy.model import PolicyInvalid, policy_json, validate_document
from common.policy.sections import omission_warnings
from common.policy.store import PolicyStore
from common.settings import get_settings

# The most audit entries one `history` shows (as `GET /admin/policy/history`).
MAX_HISTORY = 1000


def _history_limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_HISTORY:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_HISTORY}")
    return limit


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m common.policy", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    get = actions.add_parser("get", help="print the current document (or an older version)")
    get.add_argument("--version", type=int, help="a version among the last 50")
    put = actions.add_parser("put", help="validate FILE and store it as the next version")
    put.add_argument("file")
    put.add_argument("--expected-version", type=int, help="refuse if the policy moved past it")
    patch = actions.add_parser("patch", help="apply FILE, a JSON merge patch, to the document")
    patch.add_argument("file")
    patch.add_argument("--expected-version", type=int, help="refuse if the policy moved past it")
    check = actions.add_parser("validate", help="check FILE without storing it")
    check.add_argument("file")
    history = actions.add_parser("history", help="the audit log, newest first")
    history.add_argument("--limit", type=_history_limit, default=20)
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def actor() -> str:
    """Who writes from this shell: "cli:<os user>"."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (containers)
        user = str(os.getuid())
    return f"cli:{user}"


def _read(path: str) -> Any:
    """The JSON in `path` ("-": stdin); not JSON is `PolicyInvalid`."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as file:
                text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SwitchboardError(f"cannot read {path}: {exc}") from exc
    return policy_json(text)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


async def _with_store(args: argparse.Namespace) -> int:
    redis = connect(cli_redis_url(get_settings(), "policy"), name="policy-cli")
    try:
        store = PolicyStore(redis)
        if args.action == "get":
            document = await (store.get() if args.version is None
                              else store.get_version(args.version))  # fmt: skip
            if document is None:
                print(f"version {args.version} is not in the history", file=sys.stderr)
                return 1
            _print_json(document.model_dump(mode="json"))
        elif args.action in ("put", "patch"):
            write = store.put if args.action == "put" else store.patch
            stored = await write(
                _read(args.file), actor=actor(), expected_version=args.expected_version
            )
            print(f"stored policy version {stored.version}")
        else:
            for entry in await store.history(args.limit):
                if args.json:
                    print(json.dumps(entry, ensure_ascii=False))
                else:
                    print(_history_line(entry))
    finally:
        await redis.aclose()
    return 0


def _history_line(entry: dict[str, Any]) -> str:
    """One audit entry as a line; "?" for a field that does not read (`PolicyStore.history`)."""
    version = "?" if entry["version"] is None else str(entry["version"])
    at = "?" if entry["at"] is None else time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                         time.gmtime(entry["at"]))  # fmt: skip
    changes = "?" if entry["changes"] is None else ", ".join(entry["changes"]) or "(no change)"
    return f"{version:>6}  {at}  {entry['actor']}  {changes}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.action == "validate":
            data = _read(args.file)
            document = validate_document(data)
            print(f"valid: {len(document.services)} service(s), {len(document.routes)} "
                  f"route(s), {len(document.limits)} limit(s)")  # fmt: skip
            for warning in omission_warnings(data):
                print(f"warning: {warning}", file=sys.stderr)
            return 0
        return asyncio.run(_with_store(args))
    except PolicyInvalid as exc:
        stored = args.action == "get"  # the document read from Redis, not the one given
        print("stored policy is invalid:" if stored else "invalid policy:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error['loc']}: {error['msg']}", file=sys.stderr)
        return 1
    except SwitchboardError as exc:  # Conflict, RedisUnavailable, ConfigError, unreadable file
        # The operator's terminal may see the cause (redis-py's text): no client does.
        cause = f" ({exc.__cause__})" if isinstance(exc, RedisUnavailable) and exc.__cause__ else ""
        print(f"error: {exc.message or exc}{cause}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
