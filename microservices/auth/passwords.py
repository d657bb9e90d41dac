"""Password hashing with argon2id, off the event loop and bounded.

Hashing is CPU- and memory-heavy by design (64 MiB per hash with the
defaults), so it runs in threads behind a semaphore: logins neither block the
event loop nor run more hashes at once than there are CPUs. Neither passwords
nor hashes are ever logged.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from common.log import get_logger

log = get_logger(__name__)

MIN_PASSWORD, MAX_PASSWORD = 8, 256

T = TypeVar("T")


def password_fault(password: str) -> str | None:
    """Why `password` cannot be a password, or None when it can."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        return f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters"
    try:
        password.encode()
    except UnicodeEncodeError:
        # A lone surrogate: bytes that were not UTF-8, read as text. RPC and the gateway
        # never deliver one (neither msgpack nor JSON carries it); the admin CLI and
        # AUTH_ADMIN_PASSWORD can, and argon2 would fail on it mid-hash.
        return "password must be UTF-8 text"
    return None


def valid_password(password: str) -> bool:
    return password_fault(password) is None


class Passwords:
    """argon2id hashing and verification in bounded threads."""

    def __init__(self, hasher: PasswordHasher | None = None, *, concurrency: int | None = None):
        self.hasher = hasher or PasswordHasher()
        self._slots = asyncio.Semaphore(concurrency or os.cpu_count() or 2)
        self._dummy_hash: str | None = None

    async def hash(self, password: str) -> str:
        return await self._in_thread(self.hasher.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        """Whether `password` matches; False (never an exception) for a bad or unreadable hash."""
        try:
            return await self._in_thread(self.hasher.verify, password_hash, password)
        except VerificationError:
            return False
        except InvalidHashError:
            log.error("stored password hash is unreadable")
            return False

    async def verify_dummy(self, password: str) -> None:
        """Spend one verification's time on nothing (for unknown users: same timing, same answer).

        The dummy is a hash of a random password made with the current
        parameters, so it costs what a real user's verification costs.
        """
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash(secrets.token_urlsafe(16))
        await self.verify(self._dummy_hash, password[:MAX_PASSWORD])

    def needs_rehash(self, password_hash: str) -> bool:
        return self.hasher.check_needs_rehash(password_hash)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._slots:
            return await asyncio.to_thread(fn, *args)
