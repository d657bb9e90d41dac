"""Changing the live policy from a test, as an admin would, and waiting until a gateway
applies it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import redis.asyncio as aioredis

from common.errors import Conflict
from common.policy import PolicyDocument, PolicyStore
from tests.helpers import wait_for


async def update_service(redis_url: str, service: str, **fields: Any) -> PolicyDocument:
    """Merge `fields` into `services.<service>` of the stored policy (retrying on a race)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = PolicyStore(client)
        while True:
            current = await store.get()
            data = current.model_dump(mode="json")
            data["services"][service] = {**data["services"].get(service, {}), **fields}
            try:
                return await store.put(data, actor="test", expected_version=current.version)
            except Conflict:
                continue  # another test's writer won the race: merge again
    finally:
        await client.aclose()


def set_service(redis_url: str, service: str, **fields: Any) -> PolicyDocument:
    """`update_service` for synchronous tests."""
    return asyncio.run(update_service(redis_url, service, **fields))


async def update_document(redis_url: str, **fields: Any) -> PolicyDocument:
    """Replace top-level `fields` (e.g. `limits=[]`) of the stored policy (retrying on a race)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = PolicyStore(client)
        while True:
            current = await store.get()
            data = {**current.model_dump(mode="json"), **fields}
            try:
                return await store.put(data, actor="test", expected_version=current.version)
            except Conflict:
                continue
    finally:
        await client.aclose()


def set_document(redis_url: str, **fields: Any) -> PolicyDocument:
    """`update_document` for synchronous code."""
    return asyncio.run(update_document(redis_url, **fields))


def policy_version(gateway: str) -> int:
    """The version of the live policy the gateway has applied (`/health`, public)."""
    return int(httpx.get(f"{gateway}/health", timeout=5).json()["policy_version"])


def wait_applied(gateway: str, version: int, timeout: float = 10.0) -> None:
    """Wait until the gateway at `gateway` has applied the policy `version` (or a later
    one); fail after `timeout` seconds. (From a coroutine: `asyncio.to_thread`.)"""
    wait_for(lambda: policy_version(gateway) >= version, timeout=timeout)


def apply_routes(
    gateway: str, redis_url: str, routes: list[dict[str, Any]], **fields: Any
) -> PolicyDocument:
    """Set the policy's routes (and other top-level `fields`) and wait until the
    gateway has applied them (that version or a later one)."""
    doc = set_document(redis_url, routes=routes, **fields)
    wait_applied(gateway, doc.version)
    return doc
