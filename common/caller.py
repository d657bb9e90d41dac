"""`Caller`: who a call is made for, as the gateway or the WebSocket service vouch for it.

A handler that acts for the user calling it asks for the caller in its signature:

```python
@svc.method
async def get_notes(caller: Caller) -> list[str]:         # through the gateway or /ws only
    return await notes_of(caller.subject)

@svc.method
async def hello(caller: Caller | None = None) -> str:     # internal calls too (None then)
    return f"hello, {caller.username if caller else 'service'}"
```

The worker fills that parameter in (any parameter annotated `Caller` or `Caller |
None`, whatever its name) from the call envelope, never from the call's
arguments: a client naming it in its JSON gets `InvalidParams` (422), so nobody can
claim to be someone else. The gateway (`/rpc/...` and its REST routes) and the
WebSocket service (JSON-RPC on `/ws`) attach the credential's caller to every call
they make for it; a call or task made with `RpcClient` carries none unless given
`caller=` (a service calling another acts as itself), and a method that requires a
`Caller` answers such a call with `InvalidParams` saying so.

Trust: the envelope travels through Redis, and whatever can write to Redis can
write any envelope; a `Caller` is as trustworthy as the processes holding the
Redis credentials, as the rest of RPC is.

Wire form (`to_wire`), the envelope's optional `who` field (`common.protocol`):
`{"sub", "kind", "scp": [scopes], "kid"?, "user"?}`. A worker older than this
field ignores it; a call without it has no caller. The worker makes it a `Caller`
only for a handler that takes one: the others pay nothing for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from common.scopes import allows

__all__ = ["Caller"]

_KINDS = ("user", "api_key")


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated user (or API key) a call is made for.

    `subject` is the user id (an API key's owner for an API key): the one to key
    per-user data by. `kind` says which credential it was; `key_id` is the API key's
    id (None for a user token); `username` the user's name when the credential
    names it (a user token; None for an API key, whose owner's name is not at hand).
    `scopes` are the credential's (`common.scopes`): `allows` checks one.
    """

    subject: str
    kind: Literal["user", "api_key"]
    scopes: frozenset[str]
    key_id: str | None = None
    username: str | None = None

    def allows(self, service: str, method: str | None = None) -> bool:
        """Whether the credential's scopes reach `(service, method)` (`common.scopes`):
        for a handler that grants more to some callers (`allows("admin")`, say)."""
        return allows(self.scopes, service, method)

    def to_wire(self) -> dict[str, Any]:
        """The envelope's `who` field (module docstring). Hot path: one per call."""
        wire: dict[str, Any] = {"sub": self.subject, "kind": self.kind, "scp": list(self.scopes)}
        if self.key_id is not None:
            wire["kid"] = self.key_id
        if self.username is not None:
            wire["user"] = self.username
        return wire

    @classmethod
    def from_wire(cls, wire: object) -> Caller:
        """The caller of an envelope's `who` field; `ValueError` (or `TypeError`) for one
        no gateway writes (the call is then answered `InvalidParams`). Run for the
        handlers taking a `Caller` only."""
        if not isinstance(wire, dict):
            raise ValueError("caller is not a map")
        get = wire.get
        subject, kind, scopes = get("sub"), get("kind"), get("scp")
        key_id, username = get("kid"), get("user")
        if type(subject) is not str or kind not in _KINDS:
            raise ValueError("caller has no subject or an unknown kind")
        if type(scopes) is not list:
            raise ValueError("caller's scopes are not a list")
        scopes = frozenset(scopes)  # (a map or a list in it cannot be hashed: a TypeError)
        if not all(type(s) is str for s in scopes):
            raise ValueError("caller's scopes are not strings")
        if (key_id is not None and type(key_id) is not str) or (
            username is not None and type(username) is not str
        ):
            raise ValueError("caller's key id or username is not a string")
        return cls(subject, kind, scopes, key_id, username)
