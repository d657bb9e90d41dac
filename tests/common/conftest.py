"""Fixtures shared by the RPC tests of `common`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from common import RpcClient


@pytest.fixture
async def rpc(redis_url: str) -> AsyncIterator[RpcClient]:
    """An `RpcClient` on the test Redis, closed after the test."""
    async with RpcClient(redis_url) as client:
        yield client
