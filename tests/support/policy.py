"""Changing one service's entry of the live policy from a test, as an admin would."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from common.errors import Conflict
from common.policy import PolicyDocument, PolicyStore


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
