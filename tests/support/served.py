"""A gateway app served in the test's own process and event loop: for tests that look
inside it while it serves (its counters, a module global of its hot path)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from webapi.context import GatewayApp


@asynccontextmanager
async def served(
    app: GatewayApp, protocol: type[asyncio.Protocol] | None = None
) -> AsyncIterator[str]:
    """`app` served in this process (Sanic's `create_server`, its listeners run by hand),
    with `protocol` (Sanic's default when None: `webapi.__main__` picks the gateway's);
    its base URL."""
    # Sanic's touch-up rewrites its `Http` class's methods from their source: once one app
    # in the process has, the next one's startup cannot read them (KeyError: 'read').
    app.config.TOUCHUP = False
    sock = socket.create_server(("127.0.0.1", 0))
    server = await app.create_server(sock=sock, protocol=protocol)
    assert server is not None
    await server.startup()
    await server.before_start()
    await server.after_start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await server.before_stop()
        await server.close()
        await server.after_stop()
