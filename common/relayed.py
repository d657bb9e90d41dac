"""`RelayedResponse`: the response an instance's answer is relayed in, with its head as
the instance sent it: the gateway's proxy (`webapi.blueprints.proxy`) and the websocket
relay's refused upgrades (`websocket.refusals`)."""

from __future__ import annotations

from collections.abc import Iterator

from sanic import HTTPResponse


class RelayedResponse(HTTPResponse):
    """An instance's response relayed by Sanic: its head as the instance sent it.

    Sanic gives a response with no Content-Type its `content_type`, here None, which it
    writes out as the literal `content-type: None`; an instance that sent no type gets
    none (nginx adds none either).
    """

    @property
    def processed_headers(self) -> Iterator[tuple[bytes, bytes]]:
        if self.content_type is not None or "content-type" in self.headers:
            return super().processed_headers
        sanitize = self._sanitize_header_value
        return (
            (sanitize(name).encode("ascii"), sanitize(f"{value}").encode(errors="surrogateescape"))
            for name, value in self.headers.items()
        )
