"""A relayed upgrade that the upstream refused (a 3xx or 4xx:
`websocket.upstreams.UpstreamRefused`, raised by `websocket.relay.connect_first`),
answered to the client as the gateway's proxy answers a backend's response
(`webapi.blueprints.proxy`):

* the instance's status and fields, less the hop-by-hop ones
  (`common.forwarding.strip_hop_by_hop`), byte for byte: `WWW-Authenticate` (401),
  `Retry-After` (429), `Location` (3xx: the relay never follows a redirect; a
  relative one is the instance's, passed as it is, as the gateway passes one),
  every `Set-Cookie` line, `Vary`, `Cache-Control`...;
* its body, with its `Content-*` fields, when it has one of at most
  `MAX_RELAYED_BODY` bytes (an error page, a JSON error); else the platform's JSON
  error body (code `upstream_refused`, saying which service refused, and why its body
  is not passed on when it had one), without the instance's `Content-*` fields (they
  describe a body the client does not get).

Why a bound: the answer is not streamed. `websockets` reads the instance's body whole
(up to its own `WEBSOCKETS_MAX_BODY_SIZE`, 1 MiB; a larger body fails the handshake,
a connect failure) and Sanic writes the client's whole, so each refused client holds
the body twice while it is answered; an error body larger than 64 KiB is no page a
client needs, and refusing many clients at once stays cheap.

A 5xx is no refusal: `websocket.upstreams` takes it for a failed connect and fails over.
"""

from __future__ import annotations

from sanic import HTTPResponse
from sanic.compat import Header
from sanic.response import json as json_response

from common.forwarding import strip_hop_by_hop
from common.http_errors import error_body
from common.relayed import RelayedResponse
from websocket.handshake import sanic_value
from websocket.upstreams import UpstreamRefused

MAX_RELAYED_BODY = 64 * 1024  # the largest body of an instance's refusal passed on (bytes)


def refused_answer(refused: UpstreamRefused) -> HTTPResponse:
    """The client's response to an upgrade that the instance answered as `refused` says."""
    fields = [(name, sanic_value(value)) for name, value in strip_hop_by_hop(refused.fields)
              if name.lower() != "content-length"]  # fmt: skip  # (Sanic writes the body's)
    body = refused.body
    if body and len(body) <= MAX_RELAYED_BODY:
        return RelayedResponse(body, status=refused.status_code, headers=Header(fields))
    message = str(refused)
    if body:
        message += f" (its body of {len(body)} bytes is over {MAX_RELAYED_BODY}: not passed on)"
    response = json_response(error_body(refused.code, message), refused.status_code)
    for name, value in fields:
        if not name.lower().startswith("content-"):
            response.headers.add(name, value)
    return response
