"""The iptv RPC methods: thin wrappers over `Catalog`.

The method names and parameters are a contract with the gateway; the logic and
its validation live in `catalog.py`, the demo data in `seed.py`.

The favourites methods act for the user they name. A call made for an authenticated
caller (through the gateway or `/ws`: `common.caller`) may name only the caller's own
user id, unless its credential has the admin scope; a call made for no one (another
service, `RpcClient`) may name anyone.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from common import Caller, Service
from common.aio import background, cancel_and_wait, cancelling
from common.errors import Forbidden
from common.log import get_logger
from common.outage import Outage
from common.scopes import ADMIN
from microservices.iptv.catalog import Catalog
from microservices.iptv.now_playing import NowPlaying
from microservices.iptv.seed import ensure_seeded

svc = Service("iptv")
log = get_logger("iptv")


# How often a running worker checks the catalog is still there (Redis may have lost it).
SEED_CHECK_INTERVAL = 5.0


class _Context:
    """What the startup hook builds for the handlers (set before any call is taken)."""

    catalog: Catalog

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []


ctx = _Context()


@svc.on_startup
async def prepare(service: Service) -> None:
    """Seed the catalog on the very first start (once across instances), then serve it,
    and announce "now playing" changes in the background.

    Run again when Redis failed it half-way (`Service` retries a start-up step): the
    seed lock is this instance's, so the retry takes it back at once."""
    await ensure_seeded(service.redis, service.settings.iptv_channels, owner=service.instance_id)
    ctx.catalog = Catalog(service.redis)
    announcer = NowPlaying(service.redis, ctx.catalog, service.settings.iptv_now_interval)
    ctx.tasks = [
        background(announcer.run(), name="iptv-now-playing"),
        background(keep_seeded(service), name="iptv-keep-seeded"),
    ]


async def keep_seeded(service: Service, interval: float = SEED_CHECK_INTERVAL) -> None:
    """Seed the catalog again if Redis lost it (restarted without its data): recovered
    without restarting the worker, once across instances (`ensure_seeded`'s lock).
    A failure is logged once per outage (Redis refusing writes, say) and retried."""
    outage = Outage(log, "catalog check failed", "catalog checks again")
    while not cancelling():
        await asyncio.sleep(interval)
        try:
            seeded = await ensure_seeded(
                service.redis, service.settings.iptv_channels, owner=service.instance_id
            )
            outage.recovered()
        except Exception as exc:
            outage.failed(exc)
            continue
        if seeded:
            log.warning("catalog was gone from Redis: seeded it again")


@svc.on_shutdown
async def stop_background(service: Service) -> None:
    for task in ctx.tasks:
        await cancel_and_wait(task)
    ctx.tasks = []


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


def _reachable(user_id: str, caller: Caller | None) -> str:
    """`user_id`, when `caller` may act for that user (module docstring), else `Forbidden`."""
    if caller is None or caller.subject == user_id or caller.allows(ADMIN):
        return user_id
    raise Forbidden("a caller can reach its own favourites only")


@svc.method
async def add_favourite(
    user_id: str, channel_id: int, caller: Caller | None = None
) -> dict[str, Any]:
    """Add a channel to a user's favourites (idempotent)."""
    return await ctx.catalog.add_favourite(_reachable(user_id, caller), channel_id)


@svc.method
async def remove_favourite(
    user_id: str, channel_id: int, caller: Caller | None = None
) -> dict[str, Any]:
    """Remove a channel from a user's favourites (idempotent)."""
    return await ctx.catalog.remove_favourite(_reachable(user_id, caller), channel_id)


@svc.method
async def list_favourites(user_id: str, caller: Caller | None = None) -> list[dict[str, Any]]:
    """A user's favourite channels, oldest first."""
    return await ctx.catalog.list_favourites(_reachable(user_id, caller))
