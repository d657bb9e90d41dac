"""Request ids (`X-Request-Id`): the caller's when well formed, else a new one. Shared by
the gateway (every response carries one, every proxied request too) and the websocket
service's relays (the upstream's handshake carries one)."""

from __future__ import annotations

import itertools
import os
import re

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_of(incoming: str | None) -> str:
    """`incoming` (an `X-Request-Id` value) when it is well formed, else a new id: 32 hex
    digits, a random 64-bit prefix drawn once per process and a 64-bit counter. Unique
    without a `getrandom` system call per request (hot path); request ids need not be
    unguessable (they are echoed to the caller and logged, never trusted)."""
    if incoming and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return f"{_id_prefix}{next(_id_counter):016x}"


def _new_id_prefix() -> None:
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = os.urandom(8).hex(), itertools.count()


_id_prefix, _id_counter = "", itertools.count()
_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # a forked worker draws its own prefix
