"""The proxy's fast path: plain `/svc/<service>/<path>` requests answered by the
connection's protocol, before Sanic builds a request (`PROXY_FAST_PATH`, default on).

Why: Sanic's request cycle (request object, router, middleware, streaming response)
costs more than the proxying itself. Design §6 measured it on our 2-core machines:
a Sanic handler reached 0.30-0.55x nginx at best, while an `HttpProtocol` subclass
answering pass-through requests from `data_received` reached 0.85-1.0x.

`FastPathProtocol.data_received` answers a request itself only when all of these
hold; otherwise the bytes go to Sanic unchanged and it handles them as it always did:

* Sanic is idle on the connection (no request in progress, nothing buffered, no
  body left to drain) and no fast request is being answered on it (bytes arriving
  meanwhile are held, and looked at once it is done: responses stay in order);
* the whole request is in the buffer: a head of at most 16 KiB that httptools
  parses (it is strict: no bare LF, no folding, no duplicate Content-Length, which
  is what request smuggling relies on), HTTP/1.1, a method of the `/svc/` route,
  no Transfer-Encoding, Upgrade or Expect, one Host at most, and no body or a
  Content-Length body of at most 64 KiB. A body that has not all arrived yet is
  held until it has when the request's credential qualifies (below), else the
  request goes to Sanic at once (whose access check refuses it without waiting for
  the body); a held body silent for `REQUEST_TIMEOUT` gets a 408 and the connection
  closes, as on Sanic's path (`common.strict_http`). A head split across reads is
  Sanic's;
* the path is `/svc/<service>/<rest>` with a valid service name (not an internal
  one) and passes `upstream_target`, exactly the requests the `/svc/` route serves;
* the credential is in the authenticator's cache (`authenticate_sync_cached`) and its
  scopes reach the service. A miss goes to Sanic, which authenticates and fills the
  cache, so the next request is fast; a bad credential gets Sanic's 401/403;
* no rate-limit rule of the live policy matches the service (a limit needs Redis,
  and the answer its `RateLimit-*` headers: Sanic's path does both);
* the app derives scheme and host from the socket and the Host header (no
  SERVER_NAME, FORWARDED_SECRET, PROXIES_COUNT or REAL_IP_HEADER).

An admitted request gets what the `/svc/` route would give it: its request id (the
caller's `X-Request-Id` when well formed), the same upstream headers (`head.py`,
built as bytes, tested equal to `hop_headers_out` + `build_request_head`), the
same instance choice, health and retries
(`webapi.proxy.attempts`), and a response with the upstream's headers minus
hop-by-hop ones, the latency headers and `X-Request-Id` (`response.py`): written at
once with a Content-Length when the body has arrived whole, else streamed. When the
instance has an idle upstream connection, the request is sent and answered from the
two connections' callbacks (`direct.py`: no task per request); otherwise, and for a
retry, from a coroutine through `Proxy.forward`. Errors are `error_response`'s JSON,
logged as `JsonErrorHandler` logs them. Sanic's bookkeeping is kept: keep-alive
(`Connection` read as its list of tokens, as `common.strict_http` reads it on Sanic's
path; `KEEP_ALIVE`), the keep-alive timeout counted from
the last write, the response timeout while a fast request runs, graceful shutdown.
Counters: `app.ctx.fast_path` (`GET /admin/proxy/stats`). `request.py` frames and
reads a request; `admission.py` decides which requests are answered here;
`protocol.py` is the protocol, and `splicing.py` its base: a pass-through route's
splice once started, and the refusals made before a request is parsed.
"""

from common.compiled import prefer_compiled

# Before any submodule is imported: the compiled build, when fresh (`common.compiled`).
prefer_compiled(__name__, __path__)

from webapi.fastpath.protocol import FastPathProtocol  # noqa: E402
from webapi.fastpath.request import MAX_FAST_BODY, MAX_FAST_HEAD, Parsed, parse_request  # noqa: E402

__all__ = ["MAX_FAST_BODY", "MAX_FAST_HEAD", "FastPathProtocol", "Parsed", "parse_request"]
