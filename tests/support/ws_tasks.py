"""The websocket service as `python -m websocket` serves it, plus one test-only route:
`python -m tests.support.ws_tasks`.

    GET /test/tasks    {"<coroutine's qualified name>": count} of the tasks not done

A task nothing will ever wake (say, Sanic's `WebsocketImplProtocol.async_data_received`
waiting for a reader of a connection that is gone) shows only here, or as "Task was
destroyed but it is pending!" whenever a full garbage collection happens to run: this
route counts it while it is still pending, without waiting for one.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from sanic import HTTPResponse
from sanic.response import json as json_response

from common.settings import Settings
from websocket.__main__ import main
from websocket.app import WsApp, WsRequest, create_app


async def pending_tasks(request: WsRequest) -> HTTPResponse:
    current = asyncio.current_task()
    names = Counter(
        getattr(task.get_coro(), "__qualname__", repr(task.get_coro()))
        for task in asyncio.all_tasks()
        if task is not current and not task.done()
    )
    return json_response(dict(names))


def create_probed_app(settings: Settings) -> WsApp:
    app = create_app(settings)
    app.add_route(pending_tasks, "/test/tasks", methods=["GET"])
    return app


if __name__ == "__main__":
    main(create_probed_app)
