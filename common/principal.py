"""`Principal`: who a request is authenticated as (`common.credentials`), and what an
RPC call made for it carries (`common.caller`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.caller import Caller
from common.revocation import member
from common.scopes import allows


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    `subject` is the user id (for an API key, its owner's); `name` the username
    or the key's name; `expires_at` when the credential stops being valid
    (None: an API key without expiry).
    """

    kind: Literal["user", "api_key"]
    subject: str
    name: str
    roles: frozenset[str]
    scopes: frozenset[str]
    key_id: str | None = None
    session_id: str | None = None
    expires_at: float | None = None
    token_id: str | None = None  # an access token's `jti`
    # What `as_caller` answers: made once, as principals are cached per credential and
    # asked for it at every RPC call made for them.
    _caller: Caller = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind == "api_key":
            caller = Caller(self.subject, "api_key", self.scopes, self.key_id)
        else:
            caller = Caller(self.subject, "user", self.scopes, username=self.name)
        object.__setattr__(self, "_caller", caller)

    def allows(self, service: str, method: str | None) -> bool:
        """Whether this credential's scopes reach `(service, method)` (see `common.scopes`)."""
        return allows(self.scopes, service, method)

    def as_caller(self) -> Caller:
        """The `Caller` an RPC call made for this credential carries (`common.caller`)."""
        return self._caller

    def revoked_by(self) -> tuple[str, ...]:
        """The revocation members (`common.revocation`) any of which ends this credential:
        the ones `Authenticator` checks for it."""
        if self.kind == "api_key":
            return (member("key", str(self.key_id)), member("user", self.subject))
        return (member("sid", str(self.session_id)), member("jti", str(self.token_id)),
                member("user", self.subject))  # fmt: skip
