"""Pure pass-through routes: a client connection relayed byte for byte to one upstream
connection, the way a TCP proxy relays, while each request is still checked.

A policy route with `"passthrough": true` (it must also be `public` and keep its
prefix: `"strip_prefix": false`) asks the gateway to do nothing but forward:

    {"prefix": "/static/", "service": "web", "public": true,
     "strip_prefix": false, "passthrough": true}

When a request of such a route arrives on an idle keep-alive connection (and no
rate limit covers the service), `FastPathProtocol` connects to an instance of the
service (chosen by its strategy, connect failures retried on another one) and from
then on relays the connection's bytes both ways unchanged. Requests and responses
are not rebuilt: no `X-Forwarded-*`, no request id, no latency headers, no body limit,
no total timeout. That is the point (design §6: nginx parity needs a route with no
per-request work) and the price: use a normal route when the backend needs those.

What is still done per request, by httptools parsers on both directions (framing
only: they see no header, so they cost a few µs; `webapi.passthrough_framing`):

* each request's method and path are checked against the live policy: a request
  that is not the route's (another prefix, a HEAD, an upgrade, a dot segment, a
  malformed request, an HTTP/1.0 one with a chunked body, one that is not
  keep-alive, `Connection: close` or HTTP/1.0: the last request of its connection)
  is never forwarded (but for the head of an HTTP/1.0 request whose chunked body
  comes in a later read: then the body is not, and the connection closes).
  The route requests before it are forwarded (also those pipelined with it in one
  read), the splice ends once the upstream has answered them all, and the request
  goes to Sanic's usual handling on the same connection. Only when the read that
  holds it starts inside a route request's body (whose end httptools does not
  tell) is the connection closed once the forwarded requests are answered (HTTP
  clients retry idempotent requests on a closed keep-alive connection). A request
  head a read ends inside is held, not forwarded, until it is whole: no byte of a
  request goes upstream before its path has been checked. The whole requests
  before it in the read are forwarded at once (they were held with it, and got the
  head's 408 when it stalled), but where the bytes held start inside a body (whose
  end httptools does not tell): those are all held with the head. A head held
  past `MAX_HEAD` (64 KiB) is answered as Sanic's path answers a head over its
  bound, a 431 (a 414 when its request line alone is that long), and the
  connection closes; while requests forwarded before it are unanswered, it closes
  once they are answered, with no answer (as a stalled head: below);
* response boundaries are counted, so the splice knows when the upstream has
  answered everything (1xx interim responses are not answers);
* the upstream closing between responses ends the splice (the next request
  connects again), unless its last response said `Connection: close`: then the
  client's connection closes too, as the relayed response told the client it
  would; closing in the middle of a response closes the client's connection, as
  the end of that response cannot be told any other way. So does closing after an
  early answer (a response that ended before its request's body had all been
  read from the client), whether the rest of that body came before the close or
  not (see `PassThrough.upstream_gone`).

Host is not checked here: the gateway routes on the path alone, so a Host it
would refuse cannot mislead it, and the instance, an HTTP server, judges the Host
it receives, as behind nginx's `stream` module. (An `on_header` callback for it
cost the splice about 2 µs a request, near 9% of its throughput in `make
bench-proxy`, and reading the version as much: `should_keep_alive()` covers the
version, and an HTTP/1.0 keep-alive request's version is read only if its body is
chunked, to refuse it: RFC 9112 §6.1.)

Balancing and health are per connection, as in nginx's `stream` module or
HAProxy's `mode tcp`: the instance is chosen when the splice starts, by the same
`Attempts` as a proxied request. A connect failure ejects it (the health book's
fatal failure) and the next instance is tried, within the service's attempt limit
and the retry budget; a connect to an ejected instance is its trial. The strategy
counts the splice as one request from connect to end (least-connections sees open
splices) that took the connect time (what least-time learns).
Timeouts: Sanic's keep-alive timeout while nothing is outstanding, its response
timeout while a request is (`webapi.fastpath.splicing`: `check_timeouts`), both
counted from the last byte (empty lines aside: below); and a request head held
incomplete must come whole within
`REQUEST_HEAD_TIMEOUT` of its first bytes (a client trickling it held both
connections for good), else a 408 and the connection closes; while requests
forwarded before it are unanswered, it closes once they are answered, with no 408.
Empty lines (CRLF, or a CR or LF alone) read between requests are dropped, neither
forwarded nor counted as activity: RFC 9112 §2.2 lets a server ignore them before a
request line, and a client sending one every little while (each restarted the
keep-alive timeout, and the instance got them) held both connections for good. Idle,
such a client is closed at the keep-alive timeout from the last request or response,
as a silent one is. (nginx does not restart its timer at each either: the first one
ends its keep-alive wait, and the request line must then come within
`client_header_timeout`, which closes the connection with no answer.) Backpressure: a
side whose socket buffer is full stops the other side being read.

A route with `"tunnel": true` as well is spliced by `webapi.tunnel.Tunnel` instead,
which reads nothing after the first request (see there).

Hot path: `PassThrough.from_client` and `PassThrough.from_upstream`. Which requests a
route relays (the route of a request line, checked per request): `webapi.passthrough_routes`.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING, Protocol

from httptools import HttpParserError, HttpParserUpgrade

from common.http_head import EMPTY_LINE
from common.log import get_logger
from common.policy import PolicyDocument, RouteRule
from common.proxy_paths import plain_target
from webapi.passthrough_framing import Requests, Responses, end_of_requests
from webapi.passthrough_routes import PASSTHROUGH_METHODS, passthrough_rule
from webapi.splice import Owner, SpliceBase, UpstreamLeg

if TYPE_CHECKING:
    from webapi.context import PassThroughStats
    from webapi.proxy.attempts import Attempts

log = get_logger("webapi.passthrough")

# A request head held longer than this is refused (Sanic's path takes 16 KiB: `common.http_head`).
MAX_HEAD = 64 * 1024


class CurrentPolicy(Protocol):
    """Where the live policy is read (`PolicyWatcher`)."""

    @property
    def current(self) -> PolicyDocument: ...


class PassThrough(SpliceBase):
    """One client connection spliced to one upstream connection (module docstring)."""

    __slots__ = ("answered_early", "attempts", "begun", "close_at_end", "document", "ending",
                 "head_began", "instance_id", "leftover", "longer", "owner", "parser", "policy",
                 "prefix", "requests", "responses", "rule", "stats", "unsent",
                 "unsent_complete", "upstream")  # fmt: skip

    def __init__(
        self,
        owner: Owner,
        upstream: UpstreamLeg,
        rule: RouteRule,
        policy: CurrentPolicy,
        attempts: Attempts,
        stats: PassThroughStats,
    ) -> None:
        self.owner = owner
        self.upstream = upstream
        self.rule = rule
        self.policy = policy
        self.attempts = attempts  # the upstream's instance was chosen by it (`connect`)
        assert attempts.endpoint is not None
        self.instance_id = attempts.endpoint.instance_id
        self.stats = stats
        self.requests = Requests(self._is_ours)
        self.parser = self.requests.parser
        self.responses = Responses()
        # `responses.ended` when the last response to end did so before its request's
        # body had all been read from the client (an early answer); 0: none did.
        self.answered_early = 0
        self.begun = 0  # requests forwarded (wholly or in part) since the splice started
        self.unsent = b""  # read and parsed, held until the head of a request is whole
        self.head_began = 0.0  # when `unsent` began to be held (`time.monotonic`); 0: none
        self.unsent_complete = 0  # `requests.complete` where `unsent` starts
        self.ending: int | None = None  # responses to wait for before the splice ends
        self.close_at_end = False  # and then close the client's connection
        self.leftover = b""  # bytes for Sanic once the splice has ended
        self.document: PolicyDocument | None = None  # the policy `prefix`, `longer` are of
        self.prefix = b""
        self.longer: tuple[bytes, ...] = ()
        upstream.splice = self
        stats.connections += 1

    @property
    def outstanding(self) -> bool:
        """A forwarded request has no complete response yet."""
        return self.responses.ended < self.begun

    def head_overdue(self, now: float, limit: float) -> bool:
        """Whether the head held in `unsent` began more than `limit` seconds before `now`
        (but for a splice already ending: it closes once its requests are answered)."""
        return self.ending is None and super().head_overdue(now, limit)

    def head_timed_out(self) -> bytes | None:
        """The held head has not come whole in time (`head_overdue`). With every forwarded
        request answered, the splice closes: the bytes held, for the 408 that answers the
        request at their start, the stalled one. Else None: the connection closes once
        they are answered (so it does when the bytes held start inside a body)."""
        if self.outstanding or self.unsent_complete != self.begun:
            self.end_after_answers()
            return None
        held = self.unsent
        self.close()
        return held

    def _head_too_large(self, held: bytes) -> None:
        """`held`, the bytes held for a head not whole yet, passed `MAX_HEAD`: the splice
        ends. With every forwarded request answered and `held` nothing but that head, the
        owner answers it (431, or 414 for a request line that long: as Sanic's path
        answers a head over its bound) and closes; else the connection closes once the
        forwarded requests are answered, with no answer to the head."""
        if self.outstanding or self.unsent_complete != self.begun or self.requests.begun != 1:
            self._end_after(self.unsent_complete, b"", close=True)
            return
        self.close()
        self.owner.passthrough_head_too_large(held, MAX_HEAD)

    def _is_ours(self, url: bytes) -> bool:
        """Whether a request for `url` is the route's: the prefix, no longer route's prefix,
        nothing to decode or normalise (else the full check). Hot path."""
        document = self.policy.current
        if document is not self.document:
            rule = self.rule
            current = passthrough_rule(document, rule.prefix.encode())
            if current is not rule and current != rule:
                return False  # the route changed or is gone
            self.document = document
            self.prefix = rule.prefix.encode()
            self.longer = tuple(r.prefix.encode() for r in document.routes
                                if len(r.prefix) > len(rule.prefix)
                                and r.prefix.startswith(rule.prefix))  # fmt: skip
        parser = self.parser
        if parser.get_method() not in PASSTHROUGH_METHODS or not parser.should_keep_alive():
            return False  # (not keep-alive: the last request of its connection; Sanic closes)
        if (
            url.startswith(self.prefix)
            and plain_target(url)
            and not url.startswith(self.longer)  # () never matches
        ):
            return True
        found = passthrough_rule(document, url)
        return found is not None and (found is self.rule or found == self.rule)

    def from_client(self, data: bytes) -> bool:
        """Forward `data` unless it holds a request that is not the route's; hold a request
        head not whole yet (its path is not known yet), the whole requests before it
        forwarded. False when `data` was nothing but empty lines between requests:
        dropped, and no activity (the idle timer must not restart: module docstring).
        Hot path."""
        if self.ending is not None:  # reading is paused; a read already under way
            self.leftover += data
            return True
        if data[0] in EMPTY_LINE and not self.unsent and self.requests.complete == self.begun:
            # Between requests (none forwarded is still arriving, no head is held): the
            # empty lines RFC 9112 §2.2 lets a server ignore before a request line.
            data = data.lstrip(EMPTY_LINE)
            if not data:
                return False
        calls = self.requests
        if not self.unsent:
            self.unsent_complete = calls.complete
            calls.begun = calls.foreign = 0
        try:
            self.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade):
            if not calls.foreign:
                calls.foreign = max(calls.begun, 1)
        if self.unsent:
            data, self.unsent = self.unsent + data, b""
            if not calls.in_head:
                self.head_began = 0.0  # (whole now)
        if calls.foreign:
            # A request that is not the route's: it and what follows go to Sanic, once
            # the requests before it are answered, when this read starts with a request
            # (theirs are forwarded); else the connection ends (see `end_of_requests`).
            if self.unsent_complete != self.begun:
                self._end_after(self.unsent_complete, b"", close=True)
                return True
            ours = calls.foreign - 1
            if ours:
                data = self._forward_first(data, ours)
            self._end_after(self.begun, data, close=False)
            return True
        if calls.in_head:
            whole = calls.begun - 1
            if whole and self.unsent_complete == self.begun:
                # Whole requests (the route's) before the head: forwarded now, the head
                # alone held, its deadline its own. (Where the bytes held start inside a
                # body, where its end is not known, they are all held: see the function.)
                data = self._forward_first(data, whole).lstrip(EMPTY_LINE)  # (RFC 9112 §2.2)
                self.unsent_complete += whole
                calls.begun = 1
                self.head_began = 0.0
            if len(data) > MAX_HEAD:
                self._head_too_large(data)
            else:
                self.unsent = data
                if not self.head_began:
                    self.head_began = monotonic()
            return True
        self.begun += calls.begun
        self.stats.requests += calls.begun
        self.upstream.transport.write(data)  # type: ignore[union-attr]
        return True

    def _forward_first(self, data: bytes, count: int) -> bytes:
        """Forward the first `count` requests of `data`, which starts with a request (they
        have been checked); the bytes after them."""
        end = end_of_requests(data, count)
        self.begun += count
        self.stats.requests += count
        self.upstream.transport.write(data[:end])  # type: ignore[union-attr]
        return data[end:]

    def from_upstream(self, data: bytes) -> None:
        """Forward the upstream's bytes to the client, counting responses. Hot path."""
        responses = self.responses
        try:
            responses.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            fields = {"instance": self.instance_id, "error": str(exc)}
            log.warning("pass-through: malformed upstream response", extra={"fields": fields})
            self._finish(close=True)
            return
        ended = responses.ended
        if ended > self.requests.complete:  # an answer before the end of its request
            self.answered_early = ended
        owner = self.owner
        client = owner.transport
        if client is not None:
            client.write(data)
        owner.touch()
        if self.ending is not None and ended >= self.ending:
            self._finish(close=self.close_at_end)

    def end_after_answers(self) -> None:
        """Close the client's connection once everything forwarded is answered (shutdown)."""
        if self.ending is None:
            self._end_after(self.begun, b"", close=True)

    def _end_after(self, answered: int, leftover: bytes, close: bool) -> None:
        """End the splice once `answered` responses have ended (now, if they have)."""
        self.ending = answered
        self.leftover = leftover
        self.close_at_end = close
        client = self.owner.transport
        if client is not None:
            client.pause_reading()
        if self.responses.ended >= answered:
            self._finish(close=close)

    def upstream_gone(self) -> None:
        """The upstream closed: between responses the splice ends; within one, or with a
        request unanswered, the client's connection ends too (nothing else can tell the
        client that its response is cut). So it does within a request's body (an early
        answer, then the close): the rest of that body must never be read as requests;
        after a response that said `Connection: close` (relayed to the client as is:
        RFC 9112 §9.6 has its sender close); and after an early answer even when the
        rest of its request's body has been read and forwarded since. Whether that rest
        reached the gateway before this close or after it is a race between the client
        and the instance, which answered without it and may have closed unread: the
        close is the client's only sign of that (RFC 9112 §9.5). Kept open when the
        rest came first, the connection left a client waiting for that sign hanging
        until the keep-alive timeout; now one exchange has one outcome (the request
        is answered: the client's next one connects anew)."""
        if self.upstream.splice is None:
            return
        cut = self.outstanding
        if cut:
            log.info("pass-through: upstream closed with a response outstanding",
                     extra={"fields": {"instance": self.instance_id}})  # fmt: skip
        mid_request = self.requests.complete < self.begun
        ended = self.responses.ended
        early = ended > 0 and self.answered_early == ended  # the last answer was early
        closing = self.responses.closing
        # (Nothing forwarded: the instance closed before the splice started, and its first
        # request, which the client awaits an answer to, was never sent: `UpstreamLeg`.)
        self._finish(close=cut or mid_request or early or closing or self.close_at_end
                     or bool(self.unsent) or not self.begun)  # fmt: skip

    def _finish(self, close: bool) -> None:
        if not self._detach():
            return
        client = self.owner.transport
        if client is not None and not close:
            client.resume_reading()
        leftover, self.leftover = self.leftover, b""
        self.owner.passthrough_ended(leftover, close)

    def resume_client(self) -> None:
        client = self.owner.transport
        if client is not None and self.ending is None:
            client.resume_reading()
