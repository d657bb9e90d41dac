"""A real HTTP backend for proxy tests: `python -m tests.support.http_backend`.

Env: PORT, NAME (instance label), and optionally GATEWAY (base URL) + SERVICE
(+ VERSION, WEIGHT, INSTANCE_ID: NAME by default) to register itself by heartbeat
every 0.3 s, with the API key in GATEWAY_API_KEY (a credential with the `registry` scope).
Routes: /echo, /slow, /status/<n>, /upload (streamed, counts bytes),
/download?mb=N (streamed), /health, /admin/delay?ms=N (slow every /echo down),
/admin/state (the delay, the health switch, how many uploads began),
POST /nlp, POST /ai_server/ (`params.answer`, a string, is answered as it is).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os

import httpx
from sanic import Request, Sanic, response
from sanic.response import HTTPResponse

NAME = os.environ.get("NAME", "backend")
HOST = os.environ.get("HOST", "127.0.0.1")  # "::1" for an IPv6 instance
HOST_IN_ADDRESS = f"[{HOST}]" if ":" in HOST else HOST
app = Sanic("backend_" + "".join(c if c.isalnum() else "_" for c in NAME))
state = {"delay_ms": 0.0, "healthy": 1.0, "uploads": 0.0}


@app.get("/echo")
async def echo(request: Request) -> HTTPResponse:
    if state["delay_ms"]:
        await asyncio.sleep(state["delay_ms"] / 1000)
    return response.json(
        {
            "instance": NAME,
            "path": request.path,
            "query": request.query_string,
            "headers": {k.lower(): v for k, v in request.headers.items()},
        }
    )


@app.route("/echo/<rest:path>", methods=["GET", "POST", "PUT", "DELETE"])
async def echo_path(request: Request, rest: str) -> HTTPResponse:
    return response.json({"instance": NAME, "path": request.path, "method": request.method})


@app.get("/slow")
async def slow(request: Request) -> HTTPResponse:
    await asyncio.sleep(float(request.args.get("ms", "1000")) / 1000)
    return response.json({"instance": NAME})


@app.get("/status/<code:int>")
async def status(request: Request, code: int) -> HTTPResponse:
    return response.json({"instance": NAME, "status": code}, status=code)


@app.post("/upload", stream=True)
async def upload(request: Request) -> HTTPResponse:
    state["uploads"] += 1
    digest, size = hashlib.sha256(), 0
    assert request.stream is not None
    request.stream.request_max_size = 2**40
    while (chunk := await request.stream.read()) is not None:
        digest.update(chunk)
        size += len(chunk)
    return response.json({"instance": NAME, "bytes": size, "sha256": digest.hexdigest()})


@app.get("/download")
async def download(request: Request) -> None:
    megabytes = int(request.args.get("mb", "1"))
    resp = await request.respond(content_type="application/octet-stream")
    chunk = bytes(range(256)) * 256  # 64 KiB
    for _ in range(megabytes * 16):
        await resp.send(chunk)
    await resp.eof()


@app.get("/health")
async def health(request: Request) -> HTTPResponse:
    ok = bool(state["healthy"])
    return response.json({"ok": ok}, status=200 if ok else 503)


@app.post("/admin/health")
async def set_health(request: Request) -> HTTPResponse:
    state["healthy"] = float(request.args.get("ok", "1"))
    return response.json(state)


@app.get("/admin/state")
async def get_state(request: Request) -> HTTPResponse:
    return response.json(state)


@app.post("/admin/delay")
async def delay(request: Request) -> HTTPResponse:
    state["delay_ms"] = float(request.args.get("ms", "0"))
    return response.json(state)


@app.post("/nlp")
async def nlp(request: Request) -> HTTPResponse:
    return response.json({"instance": NAME, "echo": request.json})


@app.post("/ai_server/")
async def ai_server(request: Request) -> HTTPResponse:
    params = request.json.get("params") if isinstance(request.json, dict) else None
    answer = params.get("answer") if isinstance(params, dict) else None
    if isinstance(answer, str):  # a scripted answer: these bytes, as they are
        return response.raw(answer.encode(), content_type="application/json")
    return response.json({"instance": NAME, "got": request.json})


async def heartbeat(app: Sanic) -> None:
    gateway, service = os.environ.get("GATEWAY"), os.environ.get("SERVICE")
    if not gateway or not service:
        return
    body = {
        "service": service,
        "address": f"{HOST_IN_ADDRESS}:{os.environ['PORT']}",
        "version": os.environ.get("VERSION", "0"),
        "weight": int(os.environ.get("WEIGHT", "1")),
        "health_path": "/health",
        "instance_id": os.environ.get("INSTANCE_ID", NAME),
    }
    headers = {"X-Api-Key": os.environ.get("GATEWAY_API_KEY", "")}
    async with httpx.AsyncClient(timeout=2, headers=headers) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                await client.post(f"{gateway}/heartbeat", json=body)
            await asyncio.sleep(0.3)


app.add_task(heartbeat)

if __name__ == "__main__":
    app.run(host=HOST, port=int(os.environ["PORT"]), single_process=True,
            access_log=False, motd=False)  # fmt: skip
