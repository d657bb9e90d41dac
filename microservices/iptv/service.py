"""The iptv RPC methods: thin wrappers over `Catalog`.

The method names and parameters are a contract with the gateway; the logic and
its validation live in `catalog.py`, the demo data in `seed.py`.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from common import Service
from common.aio import cancel_and_wait
from microservices.iptv.catalog import Catalog
from microservices.iptv.now_playing import NowPlaying
from microservices.iptv.seed import ensure_seeded

svc = Service("iptv")


class _Context:
    """What the startup hook builds for the handlers (set before any call is taken)."""

    catalog: Catalog
    now_playing: asyncio.Task[None] | None = None


ctx = _Context()


@svc.on_startup
async def prepare(service: Service) -> None:
    """Seed the catalog on the very first start (once across instances), then serve it,
    and announce "now playing" changes in the background."""
    await ensure_seeded(service.redis, service.settings.iptv_channels)
    ctx.catalog = Catalog(service.redis)
    announcer = NowPlaying(service.redis, ctx.catalog, service.settings.iptv_now_interval)
    ctx.now_playing = asyncio.create_task(announcer.run(), name="iptv-now-playing")


@svc.on_shutdown
async def stop_announcing(service: Service) -> None:
    await cancel_and_wait(ctx.now_playing)
    ctx.now_playing = None


@svc.method
async def list_channels(
    category: str | None = None, page: int = 1, page_size: int = 50
) -> dict[str, Any]:
    """One page of channels in number order: {"items", "total", "page", "page_size"}."""
    return await ctx.catalog.list_channels(category, page, page_size)


@svc.method
async def get_channel(channel_id: int) -> dict[str, Any]:
    """One channel by id (not_found if there is none)."""
    return await ctx.catalog.get_channel(channel_id)


@svc.method
async def list_categories() -> list[dict[str, Any]]:
    """Every category with its channel count: [{"name", "title", "count"}]."""
    return await ctx.catalog.list_categories()


@svc.method
async def get_epg(
    channel_id: int, start: datetime | None = None, end: datetime | None = None
) -> dict[str, Any]:
    """Programmes overlapping [start, end) (default: the next 24 h; at most 8 days)."""
    return await ctx.catalog.get_epg(channel_id, start, end)


@svc.method
async def now_playing(channel_id: int) -> dict[str, Any] | None:
    """The programme on air on a channel now, or None."""
    return await ctx.catalog.now_playing(channel_id)


@svc.method
async def search(q: str, limit: int = 20) -> list[dict[str, Any]]:
    """Channels whose name contains q, prefix matches first."""
    return await ctx.catalog.search(q, limit)


@svc.method
async def add_favourite(user_id: str, channel_id: int) -> dict[str, Any]:
    """Add a channel to a user's favourites (idempotent)."""
    return await ctx.catalog.add_favourite(user_id, channel_id)


@svc.method
async def remove_favourite(user_id: str, channel_id: int) -> dict[str, Any]:
    """Remove a channel from a user's favourites (idempotent)."""
    return await ctx.catalog.remove_favourite(user_id, channel_id)


@svc.method
async def list_favourites(user_id: str) -> list[dict[str, Any]]:
    """A user's favourite channels, oldest first."""
    return await ctx.catalog.list_favourites(user_id)
