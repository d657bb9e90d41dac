"""Operator commands, straight against Redis (no auth worker needs to run).

```sh
python -m microservices.auth.admin create-admin --username NAME [--password-stdin]
python -m microservices.auth.admin create-key --username NAME --scopes "iptv logs.query" \
    [--name N] [--expires-in SECONDS]
python -m microservices.auth.admin rotate-signing-key
```

Redis is `REDIS_URL`, or, when it is not set, the one `make run` started
(`common.dev_redis.cli_redis_url`). A password is read from stdin (`--password-stdin`, one
line) or prompted for without echo, never taken from the command line (where
`ps` and shell history would show it), and must be UTF-8 text; without a
terminal to prompt on, `create-admin` needs `--password-stdin`. `create-key`
prints the key on stdout, once; details go to stderr. Exit status: 0 done, 1 refused (the reason on
stderr, one line), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Sequence
from typing import Any

from common.connection import REDIS_DOWN_ERRORS, connect
from common.dev_redis import cli_redis_url
from common.errors import ConfigError, ServiceError
from common.settings import get_settings
from microservices.auth.accounts import Accounts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m microservices.auth.admin")
    commands = parser.add_subparsers(dest="command", required=True)
    admin = commands.add_parser("create-admin", help="create a user with the admin role")
    admin.add_argument("--username", required=True)
    admin.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (one line)"
    )
    key = commands.add_parser("create-key", help="create an API key for a user; prints it once")
    key.add_argument("--username", required=True)
    key.add_argument("--scopes", required=True, help='space-separated, e.g. "iptv logs.query"')
    key.add_argument("--name", default=None)
    key.add_argument("--expires-in", type=int, default=None, metavar="SECONDS")
    commands.add_parser("rotate-signing-key", help="make a new JWT signing key current")
    return parser


def _password(from_stdin: bool) -> str:
    try:
        if from_stdin:
            # Bytes, decoded here: text stdin would give undecodable bytes back as
            # surrogates, or fail, depending on the locale.
            return sys.stdin.buffer.readline().decode().rstrip("\r\n")
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise ServiceError("the passwords differ")
    except UnicodeDecodeError:  # (its message would quote the bytes)
        raise ServiceError("the password is not UTF-8 text") from None
    return password


async def _run(args: argparse.Namespace) -> dict[str, Any] | str:
    settings = get_settings()
    redis = connect(cli_redis_url(settings, "auth.admin"), name="auth-admin")
    try:
        accounts = Accounts(
            redis,
            ttl=settings.jwt_ttl,
            refresh_ttl=settings.jwt_refresh_ttl,
            default_scopes=settings.auth_default_scopes,
            configured_secret=settings.jwt_secret,
        )
        await accounts.prepare()
        if args.command == "create-admin":
            password = _password(args.password_stdin)
            return await accounts.create_admin(args.username, password)
        if args.command == "create-key":
            user = await accounts.users.find(args.username)
            if user is None:
                raise ServiceError(f"no user {args.username!r}")
            created = await accounts.create_api_key(
                user.user_id, args.name, args.scopes.split(), args.expires_in
            )
            details = {k: v for k, v in created.items() if k != "api_key"}
            print(json.dumps(details, default=str), file=sys.stderr)
            return str(created["api_key"])
        return await accounts.rotate_signing_key()
    finally:
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "create-admin" and not args.password_stdin and not sys.stdin.isatty():
        # getpass would fall back to reading a pipe (or fail at its end) with a warning.
        print(
            "error: no terminal to prompt for the password: use --password-stdin", file=sys.stderr
        )
        return 2
    try:
        result = asyncio.run(_run(args))
    except (ServiceError, ConfigError) as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except REDIS_DOWN_ERRORS as exc:
        print(f"error: redis unreachable: {exc}", file=sys.stderr)
        return 1
    print(result if isinstance(result, str) else json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
