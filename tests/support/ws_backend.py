"""A real upstream WebSocket server for the websocket tests: `python -m tests.support.ws_backend`.

Env: PORT, NAME (instance id), REDIS_URL, SERVICE (registers itself in the
registry by heartbeat every 0.3 s, TTL 1.5 s), KIND ("ws" or "http"), VERSION.

`/ws` speaks the original dispatcher's envelope protocol: a request
`{"service_name", "frames": n, "fail": bool, "die_after": k}` is answered with
n frames `{"ret": 0, "flag": 0, "result": "<NAME>:<i>"}` and a last one with
`flag: 1`; `fail` answers `{"ret": 2, "flag": 0, "result": "boom"}` instead;
`die_after` sends k frames then kills the process (no close frame); `"handshake":
true` is answered with one last frame whose `result` is what `handshake` answers.

The handshake: a subprotocol of `SUBPROTOCOLS` (`chat.v2`, `mqtt`) is chosen when the
client offers one, else none; an `Origin` of `https://refused.example` is refused
with 403 (a backend's CSRF origin check), a path `/refuse/<status>` with that status
(and the fields and body its query names: `refusal`),
`/redirect` with a 302 to `/echo`, and a path `/slow` is answered after a second
(`slow_done` counts those answered).

Any other path echoes text and binary frames, except these text commands:
`whoami` -> `{"instance", "path"}`; `forwarded` -> `{"instance", "x-forwarded-for",
"x-forwarded-proto", "x-forwarded-host"}`, each the list of that field's lines in the
upgrade request; `handshake` -> `{"instance", "headers", "subprotocol"}`: every field
line of the upgrade request, in order, as `[name, value]` (values as received, read as
ISO-8859-1), and the subprotocol chosen; `open` -> `{"open", "slow_done"}`: the
connections open now and the `/slow` handshakes answered; `close <code> <reason>` ->
closes so;
`die` -> the process exits at once (no close frame); `last_close` -> the code
and reason of the last close received from a peer (the closes of connections
that asked `last_close` are not recorded, so a probe never hides what it probes).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from common.connection import connect
from common.instance_record import InstanceRecord
from common.registry import Registry

NAME = os.environ.get("NAME", "wsb")
state: dict[str, object] = {"last_close": None, "slow_done": 0}
probes: set[ServerConnection] = set()  # connections that asked `last_close`
opened: set[ServerConnection] = set()
FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
SUBPROTOCOLS = ("chat.v2", "mqtt")
REFUSED_ORIGIN = "https://refused.example"


def select_subprotocol(ws: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    return next((p for p in offered if p in SUBPROTOCOLS), None)


async def process_request(ws: ServerConnection, request: Request) -> Response | None:
    if request.headers.get("origin") == REFUSED_ORIGIN:
        return ws.respond(403, "origin refused\n")
    if request.path.startswith("/refuse/"):
        return refusal(ws, request.path)
    if request.path == "/redirect":  # to a path it serves: a client following it gets in
        moved = ws.respond(302, "moved\n")
        moved.headers["Location"] = "/echo"
        return moved
    if request.path == "/slow":
        await asyncio.sleep(1.0)
        state["slow_done"] = int(str(state["slow_done"])) + 1
    return None


def refusal(ws: ServerConnection, target: str) -> Response:
    """`/refuse/<status>?<name>=<value>&...`: that status, each query pair a field line
    (in order, repeats included), and the body "refused\\n"; `_body=<n>` makes it n bytes
    of `x`, `_type=<type>` its Content-Type (empty: none)."""
    parts = urlsplit(target)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    options = dict(pair for pair in pairs if pair[0].startswith("_"))
    body = "x" * int(options["_body"]) if "_body" in options else "refused\n"
    answer = ws.respond(int(parts.path.split("/")[2]), body)
    if "_type" in options:
        del answer.headers["Content-Type"]
        if options["_type"]:
            answer.headers["Content-Type"] = options["_type"]
    for name, value in pairs:
        if not name.startswith("_"):
            answer.headers[name] = value  # (appended: a repeated name is another line)
    return answer


def handshake(ws: ServerConnection) -> dict[str, object]:
    headers = ws.request.headers.raw_items() if ws.request else []
    return {"instance": NAME, "headers": [list(item) for item in headers],
            "subprotocol": ws.subprotocol}  # fmt: skip


async def handler(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request else "/"
    opened.add(ws)
    try:
        if path == "/ws":
            await envelope(ws)
        else:
            await echo(ws, path)
    except ConnectionClosed:
        pass
    finally:
        rcvd = ws.protocol.close_rcvd
        if rcvd is not None and ws not in probes:
            state["last_close"] = [rcvd.code, rcvd.reason]
        probes.discard(ws)
        opened.discard(ws)


async def echo(ws: ServerConnection, path: str) -> None:
    async for message in ws:
        if message == "whoami":
            await ws.send(json.dumps({"instance": NAME, "path": path}))
        elif message == "forwarded":
            headers = ws.request.headers if ws.request else None
            seen = {name: headers.get_all(name) if headers else [] for name in FORWARDED}
            await ws.send(json.dumps({"instance": NAME, **seen}))
        elif message == "handshake":
            await ws.send(json.dumps(handshake(ws)))
        elif message == "open":
            await ws.send(json.dumps({"open": len(opened), "slow_done": state["slow_done"]}))
        elif message == "last_close":
            probes.add(ws)
            await ws.send(json.dumps(state["last_close"]))
        elif message == "die":
            os._exit(1)
        elif isinstance(message, str) and message.startswith("close "):
            _, code, reason = message.split(" ", 2)
            await ws.close(int(code), reason)
        else:
            await ws.send(message)


async def envelope(ws: ServerConnection) -> None:
    async for message in ws:
        request = json.loads(message)
        if request.get("handshake"):
            await ws.send(json.dumps({"ret": 0, "flag": 1, "result": handshake(ws)}))
            continue
        if request.get("fail"):
            await ws.send(json.dumps({"ret": 2, "flag": 0, "result": "boom"}))
            continue
        frames = int(request.get("frames", 2))
        die_after = request.get("die_after")
        for i in range(frames):
            if die_after is not None and i == die_after:
                os._exit(1)
            await ws.send(json.dumps({"ret": 0, "flag": 0, "result": f"{NAME}:{i}"}))
        await ws.send(json.dumps({"ret": 0, "flag": 1, "result": "done"}))


async def heartbeat(port: int) -> None:
    redis_url, service = os.environ.get("REDIS_URL"), os.environ.get("SERVICE")
    if not redis_url or not service:
        return
    registry = Registry(connect(redis_url), ttl=1.5)
    record = InstanceRecord(
        service,
        NAME,
        kind=os.environ.get("KIND", "ws"),
        address=f"127.0.0.1:{port}",
        version=os.environ.get("VERSION", "0"),
        weight=int(os.environ.get("WEIGHT", "1")),
    )
    while True:
        await registry.heartbeat(record)
        await asyncio.sleep(0.3)


async def main() -> None:
    port = int(os.environ["PORT"])
    async with serve(
        handler,
        "127.0.0.1",
        port,
        compression=None,
        select_subprotocol=select_subprotocol,
        process_request=process_request,
    ):
        await heartbeat(port)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
