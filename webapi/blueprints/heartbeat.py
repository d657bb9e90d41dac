"""`POST /heartbeat`: HTTP/WebSocket backends register (and stay registered) here.

A heartbeat never touches an RPC worker: one registering or removing an instance id
that a worker holds is 409 `conflict` and changes nothing (`Registry.heartbeat` and
`deregister` check the stored record's kind in the script that writes it). Nor may an
HTTP backend join a service the catalog lists (its methods published by a worker):
the enqueue of an RPC call counts every live instance of the service, so calls would
wait for their timeout on a stream no worker reads instead of a 503. The catalog lives
in another Redis slot than the service's keys, so that check precedes the writes
rather than being part of them: a heartbeat racing the very first start of a worker
under its name may pass once, and the next one is refused.
"""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse

from common.errors import quoted
from common.instance_record import InstanceRecord
from webapi.access import requires
from webapi.context import GatewayRequest
from webapi.errors import HeartbeatConflict
from webapi.heartbeats import parse_heartbeat
from webapi.requests import json_object
from webapi.responses import json_response

bp = Blueprint("heartbeat")


@bp.post("/heartbeat", ctx_access=requires("registry", "heartbeat"))
async def heartbeat(request: GatewayRequest) -> HTTPResponse:
    body = json_object(request, empty_ok=False)
    records = parse_heartbeat(body, request.app.ctx.settings.webapi_port)
    registry = request.app.ctx.registry
    # One record can conflict only in the native form: the original form's ids hold an
    # `@`, which no worker's id (`common.registry.new_instance_id`) does.
    if body.get("leaving") is True:
        for record in records:
            if not await registry.deregister(record.service, record.instance_id, kind=record.kind):
                raise _worker_conflict(record)
        return json_response({"deregistered": [r.instance_id for r in records]})
    rpc = await registry.cataloged(r.service for r in records)
    if rpc:
        raise HeartbeatConflict(
            f"service {quoted(min(rpc))} is an RPC service: an HTTP backend cannot join it"
        )
    for record in records:
        if not await registry.heartbeat(record):
            raise _worker_conflict(record)
    ttl = request.app.ctx.settings.heartbeat_ttl
    return json_response({"registered": [r.instance_id for r in records], "ttl": ttl})


def _worker_conflict(record: InstanceRecord) -> HeartbeatConflict:
    return HeartbeatConflict(
        f"instance {quoted(record.instance_id)} of {quoted(record.service)} is an RPC"
        " worker's: a heartbeat cannot replace or remove it"
    )
