"""Container health checks (Dockerfile HEALTHCHECK), usable outside Docker too.

    python -m common.healthcheck http://127.0.0.1:8000/health   # HTTP 200?
    python -m common.healthcheck --service iptv                 # a live instance on this host?

Exit status 0 means healthy, 1 unhealthy.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import urllib.request

from common.connection import connect
from common.registry import Registry
from common.settings import get_settings


def check_http(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def check_service(service: str) -> bool:
    """True when an instance of `service` on this host holds a live heartbeat lease."""
    settings = get_settings()
    redis = connect(settings.require_redis_url(), name="healthcheck")
    try:
        instances = await Registry(redis, settings.heartbeat_ttl).live_instances(service)
    except Exception:
        return False
    finally:
        await redis.aclose()
    host = socket.gethostname()
    return any(i.host == host for i in instances)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("url", nargs="?", help="HTTP URL that must answer 200")
    parser.add_argument("--service", help="RPC service that must have a live instance here")
    args = parser.parse_args(argv)
    if bool(args.url) == bool(args.service):
        parser.error("give either a URL or --service")
    ok = check_http(args.url) if args.url else asyncio.run(check_service(args.service))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
