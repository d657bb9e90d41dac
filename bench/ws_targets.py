"""The targets of `bench.ws`: the echo upstream and each relay put in front of it.

  upstream-aiohttp,    the echo upstream on /ws/echo, each in its own process
  upstream-websockets  (`python -m bench.ws --serve KIND`), copied from the peers
  nginx                nginx 1 worker, the peers' WebSocket proxy_pass config
  aiohttp-relay,       the peers' Python relays, each in its own process; the
  sanic-relay          Sanic one also serves /ws/idle (the memory comparison)
  switchboard          `python -m websocket`: see `bench.ws_switchboard`

Copied from `/work/shared/bench/peers/ws_bench.py`, outside this repository (a
clean clone must run this benchmark): `start_nginx_relay`, the four `serve_*`
servers, `pump_both_ways` and the upstream trial (`pick_upstream`), unchanged
but for style and types.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from bench.harness import free_port, serve_child, spawn, start_server, stop_child
from bench.ws_load import run_load, wait_ws

WS_PATH = "/ws/echo"  # the upstream's echo endpoint, and what every relay serves
IDLE_PATH = "/ws/idle"  # sanic-relay only: accepts and awaits, never relays
SERVICE = "echo"  # the name the upstream registers under
RELAY_PATH = f"/ws/proxy/{SERVICE}{WS_PATH}"  # switchboard: relayed to ws://<instance>/ws/echo
CLIENT_PATH = "/ws"  # switchboard: the authenticated client endpoint (the memory test)
# Switchboard right after nginx: the CPU goal compares those two.
TARGETS = ("direct", "nginx", "switchboard", "aiohttp-relay", "sanic-relay")
UPSTREAMS = {"aiohttp": "upstream-aiohttp", "websockets": "upstream-websockets"}
DESCRIPTIONS = {
    "direct": "client -> upstream, no relay (the floor)",
    "nginx": "nginx 1 worker, proxy_pass with HTTP/1.1 and the Upgrade/Connection headers",
    "switchboard": "python -m websocket, 1 process, /ws/proxy/echo/ws/echo with a JWT",
    "aiohttp-relay": "aiohttp.web dispatcher, upstream ws_connect on one shared ClientSession",
    "sanic-relay": "Sanic 1 process, upstream through the `websockets` asyncio client",
}


# --------------------------------------------------------------------------
# nginx: the peers' `start_nginx_relay` config (absolute paths here: the
# config lives in the log directory, never in the repository).
# --------------------------------------------------------------------------
def start_nginx_relay(
    nginx: str, tmp: Path, port: int, upstream_port: int
) -> subprocess.Popen[bytes]:
    wd = tmp / "nginx"
    for d in ("cb", "px", "fc", "uw", "sc"):
        (wd / d).mkdir(parents=True, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""  # as the peers: workers stay root
    conf = wd / "nginx.conf"
    conf.write_text(f"""{user}
worker_processes 1;
daemon off;
master_process on;
pid {wd}/nginx.pid;
error_log {wd}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {wd}/cb;
  proxy_temp_path {wd}/px;
  fastcgi_temp_path {wd}/fc;
  uwsgi_temp_path {wd}/uw;
  scgi_temp_path {wd}/sc;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  upstream ws_upstream {{ server 127.0.0.1:{upstream_port}; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://ws_upstream;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }}
  }}
}}
""")
    return spawn([nginx, "-c", str(conf), "-p", f"{wd}/"], tmp / "nginx.log")


# --------------------------------------------------------------------------
# Python servers, each in its own process: `python -m bench.ws --serve KIND`.
# --------------------------------------------------------------------------
def _run_aiohttp(app: Any, port: int) -> None:
    """Serve an aiohttp.web app as the peers run theirs: no access log, backlog 4096."""
    from aiohttp import web

    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        backlog=4096,
        shutdown_timeout=1.0,
    )


def serve_upstream_aiohttp(port: int, upstream_url: str) -> None:
    """Echo server: aiohttp.web WebSocketResponse, echoes text and binary."""
    from aiohttp import WSMsgType, web

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get(WS_PATH, echo)
    _run_aiohttp(app, port)


def serve_upstream_websockets(port: int, upstream_url: str) -> None:
    """Echo server: `websockets` asyncio server; other paths get a 404."""
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.http11 import Request, Response

    async def echo(ws: ServerConnection) -> None:
        async for msg in ws:
            await ws.send(msg)

    def only_echo_path(conn: ServerConnection, request: Request) -> Response | None:
        if request.path != WS_PATH:
            return conn.respond(404, "not found\n")
        return None

    async def main() -> None:
        async with serve(
            echo, "127.0.0.1", port, process_request=only_echo_path, compression=None, backlog=4096
        ):
            await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(main())


async def pump_both_ways(a: Any, b: Any) -> None:
    """Run two pump coroutines as tasks; when either ends (its side closed or
    failed), cancel the other. The relay handlers then close both legs."""
    tasks = [asyncio.create_task(a), asyncio.create_task(b)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def serve_aiohttp_relay(port: int, upstream_url: str) -> None:
    """Simple dispatcher: aiohttp.web in front, one shared ClientSession,
    one upstream ws_connect per client connection, two pump tasks."""
    from aiohttp import ClientSession, TCPConnector, WSMsgType, web

    session_key = web.AppKey("session", ClientSession)

    async def pump(src: Any, dst: Any) -> None:
        async for msg in src:  # ends on CLOSE/CLOSING/CLOSED
            if msg.type == WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == WSMsgType.ERROR:
                break

    async def relay(request: web.Request) -> web.WebSocketResponse:
        client = web.WebSocketResponse(compress=False)
        await client.prepare(request)
        try:
            async with request.app[session_key].ws_connect(upstream_url, compress=0) as upstream:
                await pump_both_ways(pump(client, upstream), pump(upstream, client))
        except Exception:  # upstream unreachable: tell the client
            await client.close(code=1011, message=b"upstream failed")
        await client.close()
        return client

    async def on_startup(app: web.Application) -> None:
        app[session_key] = ClientSession(connector=TCPConnector(limit=0))

    async def on_cleanup(app: web.Application) -> None:
        await app[session_key].close()

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get(WS_PATH, relay)
    _run_aiohttp(app, port)


def serve_sanic_relay(port: int, upstream_url: str) -> None:
    """Sanic 1 worker: /ws/echo relays to the upstream through the
    `websockets` asyncio client (two pump tasks); /ws/idle only awaits."""
    import logging

    from sanic import Sanic
    from websockets.asyncio.client import connect

    app = Sanic("peer_ws_relay")
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 1.0
    logging.getLogger("sanic.websockets").setLevel(logging.WARNING)  # 1 INFO line per close

    async def relay(request: Any, ws: Any) -> None:
        upstream = await connect(upstream_url, compression=None, proxy=None)
        try:

            async def client_to_upstream() -> None:
                async for msg in ws:
                    await upstream.send(msg)

            async def upstream_to_client() -> None:
                async for msg in upstream:
                    await ws.send(msg)

            await pump_both_ways(client_to_upstream(), upstream_to_client())
        finally:
            # Sanic cancels this handler once the client has closed; inside
            # `async with connect(...)` that would close the upstream leg with
            # 1011 (internal error), so close it here, normally (1000).
            await upstream.close()

    async def idle(request: Any, ws: Any) -> None:
        async for _ in ws:  # a plain service endpoint: wait for messages
            pass

    app.add_websocket_route(relay, WS_PATH)
    app.add_websocket_route(idle, IDLE_PATH)

    app.run(
        host="127.0.0.1",
        port=port,
        single_process=True,
        access_log=False,
        debug=False,
        motd=False,
        backlog=4096,
    )


SERVERS = {
    "upstream-aiohttp": serve_upstream_aiohttp,
    "upstream-websockets": serve_upstream_websockets,
    "aiohttp-relay": serve_aiohttp_relay,
    "sanic-relay": serve_sanic_relay,
}


def serve(kind: str, port: int, upstream_url: str, loop: str) -> None:
    serve_child(SERVERS, kind, port, upstream_url, loop)


def start_python(
    kind: str, tmp: Path, port: int, upstream_url: str, loop: str
) -> subprocess.Popen[bytes]:
    return start_server("bench.ws", kind, tmp, port, "--upstream-url", upstream_url, loop)


# --------------------------------------------------------------------------
# The upstream: started for each target; `pick_upstream` is the peers' trial.
# --------------------------------------------------------------------------
def start_upstream(
    kind: str, port: int, args: argparse.Namespace, tmp: Path
) -> subprocess.Popen[bytes]:
    proc = start_python(UPSTREAMS[kind], tmp, port, "", args.loop)
    wait_ws(f"ws://127.0.0.1:{port}{WS_PATH}", args.ready_timeout, proc)
    return proc


def pick_upstream(args: argparse.Namespace, tmp: Path) -> tuple[str, dict[str, Any]]:
    """With `auto`, trial both echo servers and keep the one that spends less CPU
    per echo (a short trial's msg/s swings too much with process placement)."""
    if args.upstream != "auto":
        return args.upstream, {}
    if not args.aiohttp:
        return "websockets", {"skipped": "aiohttp is not installed"}
    if args.trial_seconds <= 0:
        return "aiohttp", {"skipped": "--trial-seconds 0 (--quick): aiohttp, the peers' pick"}
    trial: dict[str, Any] = {}
    for kind in UPSTREAMS:
        port = free_port()
        proc = start_upstream(kind, port, args, tmp)
        try:
            r = run_load(
                f"ws://127.0.0.1:{port}{WS_PATH}",
                args,
                tmp,
                f"trial-{kind}",
                {"upstream": proc.pid},
                warmup=0.5,
                lat_count=0,
                duration=args.trial_seconds,
            )["loaded"]
        finally:
            stop_child(proc)
        us = r["cpu_s"]["upstream"] / r["messages"] * 1e6 if r["messages"] else float("inf")
        trial[kind] = {
            "msgs_per_s": r["msgs_per_s"],
            "cpu_us_per_msg": round(us, 1),
            "p50_ms": r["lat_ms"]["p50"],
            "errors": r["errors"],
        }
        print(
            f"[ws] upstream trial {kind}: {r['msgs_per_s']:.0f} msg/s, {us:.1f} µs CPU per "
            f"echo ({args.connections} conns, {args.trial_seconds:g} s)",
            flush=True,
        )
    return min(trial, key=lambda k: trial[k]["cpu_us_per_msg"]), trial
