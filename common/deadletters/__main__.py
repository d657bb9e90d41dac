"""`python -m common.deadletters list|replay <service>`: see the package docstring."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from common import codec
from common.connection import connect
from common.deadletters import DeadLetters
from common.dev_redis import cli_redis_url
from common.settings import exit_on_config_error, get_settings


async def main(argv: list[str]) -> int:
    """Run the command line `argv`; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m common.deadletters")
    parser.add_argument("action", choices=("list", "replay"))
    parser.add_argument("service")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args(argv)
    redis = connect(cli_redis_url(get_settings(), "deadletters"), name="deadletters")
    try:
        letters = DeadLetters(redis)
        if args.action == "list":
            for letter in await letters.list(args.service, args.limit):
                print(json.dumps(letter, default=_printable))
        else:
            print(f"replayed {await letters.replay(args.service, args.limit)}")
    finally:
        await redis.aclose()
    return 0


def _printable(obj: Any) -> Any:
    """`codec.json_default`, with bytes that are not UTF-8 shown with `\\x` escapes: a
    dead letter's arguments are listed for a person, whatever they hold."""
    if isinstance(obj, bytes):
        return obj.decode(errors="backslashreplace")
    return codec.json_default(obj)


if __name__ == "__main__":
    with exit_on_config_error("deadletters"):
        sys.exit(asyncio.run(main(sys.argv[1:])))
