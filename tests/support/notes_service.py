"""Per-user notes, the scaffold's pattern (`python -m tests.support.notes_service`).

The probe's IDOR was `get(user_id)`: any user named another's id. Here the user is
the call's `Caller`, which the gateway and `/ws` attach and no client can name.
"""

from __future__ import annotations

from typing import Any

from common import Caller, Service

svc = Service("notes")
NOTES: dict[str, list[str]] = {}


@svc.method
async def add(text: str, caller: Caller) -> int:
    """Add a note for the caller; how many they have."""
    NOTES.setdefault(caller.subject, []).append(text)
    return len(NOTES[caller.subject])


@svc.method
async def get(caller: Caller) -> list[str]:
    """The caller's notes."""
    return NOTES.get(caller.subject, [])


@svc.method
async def whoami(caller: Caller) -> dict[str, Any]:
    """The caller, field by field (its scopes sorted)."""
    return {"subject": caller.subject, "kind": caller.kind, "key_id": caller.key_id,
            "username": caller.username, "scopes": sorted(caller.scopes)}  # fmt: skip


@svc.method
async def maybe(limit: int = 1, *, who: Caller | None = None) -> dict[str, Any]:
    """The caller's subject, or None for a call made for no one (another service)."""
    return {"limit": limit, "subject": None if who is None else who.subject}


@svc.method
async def echo(x: int) -> int:
    """No caller parameter: calls with or without a caller are alike."""
    return x


if __name__ == "__main__":
    svc.run()
