"""The iptv domain (seed + Catalog) against a real Redis, without the RPC layer.

The read-only tests share one catalog seeded once in Redis DB 1; the seeding
tests use DB 5 and flush it between tests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from datetime import UTC, timedelta, timezone

import pytest
import redis.asyncio as aioredis

from common.errors import BadRequest, NotFound
from microservices.iptv.catalog import MAX_PAGE, MAX_PROGRAMME, Catalog, Keys, _search_rank
from microservices.iptv.seed import (
    GENRES,
    GUIDE_DAYS,
    SEED,
    default_guide_start,
    ensure_seeded,
    generate_channels,
    generate_guide,
)
from tests.helpers import db_url, fresh_db

pytestmark = pytest.mark.timeout(60)

CHANNELS = 300
GUIDE_START = default_guide_start()
# A fixed "now" inside the seeded week, so tests do not depend on the wall clock.
NOW = GUIDE_START + timedelta(days=1, hours=12, minutes=7)


@pytest.fixture(scope="module")
async def seeded(redis_url: str):
    """A Redis client on DB 1 holding a freshly seeded default-size catalog."""
    client = aioredis.Redis.from_url(db_url(redis_url, 1))
    await client.flushdb()
    began = time.perf_counter()
    assert await ensure_seeded(client, CHANNELS, GUIDE_START)
    print(f"\nseeded {CHANNELS} channels x {GUIDE_DAYS} days in {time.perf_counter() - began:.2f}s")
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture
def catalog(seeded: aioredis.Redis) -> Catalog:
    return Catalog(seeded, clock=lambda: NOW)


@pytest.fixture
async def empty_db(redis_url: str):
    async with fresh_db(db_url(redis_url, 5)) as client:
        yield client


# -- seed data ---------------------------------------------------------------------


async def test_seeded_channels_are_complete_and_unique(catalog: Catalog) -> None:
    page = await catalog.list_channels(page_size=200)
    rest = await catalog.list_channels(page=2, page_size=200)
    channels = page["items"] + rest["items"]
    assert page["total"] == CHANNELS and len(channels) == CHANNELS
    assert sorted(c["id"] for c in channels) == list(range(1, CHANNELS + 1))
    assert len({c["number"] for c in channels}) == CHANNELS
    assert len({c["name"] for c in channels}) == CHANNELS
    for channel in channels:
        assert set(channel) == {"id", "name", "number", "category", "logo_url", "stream_url"}
        assert channel["category"] in GENRES
        assert channel["stream_url"].startswith("https://") and channel["logo_url"].endswith(".png")


def test_generation_is_deterministic() -> None:
    first = generate_channels(CHANNELS, random.Random(SEED))
    assert first == generate_channels(CHANNELS, random.Random(SEED))
    end = GUIDE_START + timedelta(days=1)
    guides = [
        list(generate_guide(first[0], GUIDE_START, end, random.Random(SEED))) for _ in range(2)
    ]
    assert guides[0] == guides[1] and guides[0]


def test_programme_lengths_fit_the_epg_query_bound() -> None:
    # The EPG range query looks back MAX_PROGRAMME before the window.
    assert all(15 <= g.minutes[0] <= g.minutes[1] <= 120 for g in GENRES.values())
    assert max(g.minutes[1] for g in GENRES.values()) * 60 <= MAX_PROGRAMME.total_seconds()


async def test_guide_is_back_to_back_for_the_whole_week(seeded: aioredis.Redis) -> None:
    async with seeded.pipeline(transaction=False) as pipe:
        for channel_id in range(1, CHANNELS + 1):
            pipe.zrange(Keys.epg(channel_id), 0, -1)
        guides = await pipe.execute()
    week_end = (GUIDE_START + timedelta(days=GUIDE_DAYS)).timestamp()
    for raws in guides:
        programmes = [json.loads(raw) for raw in raws]
        assert programmes[0]["start"] == GUIDE_START.timestamp()
        assert programmes[-1]["end"] >= week_end > programmes[-1]["start"]
        for before, after in itertools.pairwise(programmes):
            assert before["end"] == after["start"]
        for p in programmes:
            assert 15 * 60 <= p["end"] - p["start"] <= 120 * 60
            assert p["title"] and p["description"] and p["category"]


# -- channels and categories ---------------------------------------------------------


async def test_list_channels_pages_in_number_order(catalog: Catalog) -> None:
    first = await catalog.list_channels(page=1, page_size=50)
    second = await catalog.list_channels(page=2, page_size=50)
    assert (first["total"], first["page"], first["page_size"]) == (CHANNELS, 1, 50)
    numbers = [c["number"] for c in first["items"] + second["items"]]
    assert len(numbers) == 100 and numbers == sorted(numbers)
    last = await catalog.list_channels(page=7, page_size=50)
    assert last["items"] == [] and last["total"] == CHANNELS
    partial = await catalog.list_channels(page=2, page_size=200)
    assert len(partial["items"]) == CHANNELS - 200


async def test_list_channels_by_category(catalog: Catalog) -> None:
    categories = {c["name"]: c["count"] for c in await catalog.list_categories()}
    news = await catalog.list_channels(category="news", page_size=200)
    assert news["total"] == categories["news"] == len(news["items"])
    assert {c["category"] for c in news["items"]} == {"news"}
    assert await catalog.list_channels(category=" NEWS ") == await catalog.list_channels("news")
    assert (await catalog.list_channels(category=" "))["total"] == CHANNELS
    unknown = await catalog.list_channels(category="no-such-category")
    assert unknown["items"] == [] and unknown["total"] == 0


@pytest.mark.parametrize(
    ("page", "page_size"),
    [(0, 50), (-1, 50), (1, 0), (1, 201), (1, -5), (MAX_PAGE + 1, 50), (10**22, 50)],
)
async def test_list_channels_rejects_bad_paging(catalog: Catalog, page: int, page_size: int):
    with pytest.raises(BadRequest):
        await catalog.list_channels(page=page, page_size=page_size)


async def test_get_channel(catalog: Catalog) -> None:
    channel = await catalog.get_channel(7)
    assert channel["id"] == 7
    with pytest.raises(NotFound):
        await catalog.get_channel(CHANNELS + 1)
    with pytest.raises(NotFound):
        await catalog.get_channel(0)


async def test_categories_have_counts_in_number_order(catalog: Catalog) -> None:
    categories = await catalog.list_categories()
    assert [c["name"] for c in categories] == list(GENRES)
    assert sum(c["count"] for c in categories) == CHANNELS
    assert all(c["count"] > 0 and c["title"] for c in categories)


# -- programme guide -----------------------------------------------------------------


async def test_epg_defaults_to_the_next_24_hours(catalog: Catalog) -> None:
    epg = await catalog.get_epg(1)
    assert epg["channel_id"] == 1
    assert epg["start"] == NOW and epg["end"] == NOW + timedelta(hours=24)
    programmes = epg["programmes"]
    assert programmes[0]["start"] <= NOW < programmes[0]["end"]
    assert programmes[-1]["start"] < epg["end"] <= programmes[-1]["end"]
    for before, after in itertools.pairwise(programmes):
        assert before["end"] == after["start"]
    for p in programmes:
        assert p["start"].tzinfo is UTC and p["channel_id"] == 1
        assert set(p) == {"id", "channel_id", "title", "description", "category", "start", "end"}


async def test_epg_window_bounds_are_half_open(catalog: Catalog) -> None:
    day = await catalog.get_epg(2, NOW, NOW + timedelta(hours=6))
    target = day["programmes"][3]
    # A window starting exactly at a programme's end excludes it; ending exactly
    # at a programme's start excludes that one.
    exact = await catalog.get_epg(2, target["start"], target["end"])
    assert exact["programmes"] == [target]
    one_second = await catalog.get_epg(2, target["start"], target["start"] + timedelta(seconds=1))
    assert one_second["programmes"] == [target]
    before = await catalog.get_epg(2, target["start"] - timedelta(minutes=1), target["start"])
    assert [p["end"] for p in before["programmes"]] == [target["start"]]


async def test_epg_takes_naive_as_utc_and_converts_other_zones(catalog: Catalog) -> None:
    start = NOW.replace(tzinfo=None)
    aware = await catalog.get_epg(3, NOW, NOW + timedelta(hours=2))
    naive = await catalog.get_epg(3, start, start + timedelta(hours=2))
    assert naive == aware
    plus_two = timezone(timedelta(hours=2))
    shifted = await catalog.get_epg(3, NOW.astimezone(plus_two), None)
    assert shifted["start"] == NOW and shifted["start"].tzinfo is UTC


async def test_epg_outside_the_guide_is_empty(catalog: Catalog) -> None:
    later = GUIDE_START + timedelta(days=30)
    assert (await catalog.get_epg(1, later))["programmes"] == []


async def test_epg_rejects_bad_ranges_and_unknown_channels(catalog: Catalog) -> None:
    with pytest.raises(BadRequest):
        await catalog.get_epg(1, NOW, NOW)
    with pytest.raises(BadRequest):
        await catalog.get_epg(1, NOW, NOW - timedelta(hours=1))
    with pytest.raises(BadRequest):
        await catalog.get_epg(1, NOW, NOW + timedelta(days=8, seconds=1))
    week = await catalog.get_epg(1, GUIDE_START, GUIDE_START + timedelta(days=8))
    assert len(week["programmes"]) > 7 * 10
    with pytest.raises(NotFound):
        await catalog.get_epg(CHANNELS + 1)


async def test_now_playing(seeded: aioredis.Redis, catalog: Catalog) -> None:
    playing = await catalog.now_playing(4)
    assert playing is not None and playing["start"] <= NOW < playing["end"]
    assert playing == (await catalog.get_epg(4))["programmes"][0]
    off_air = Catalog(seeded, clock=lambda: GUIDE_START - timedelta(days=2))
    assert await off_air.now_playing(4) is None
    with pytest.raises(NotFound):
        await catalog.now_playing(CHANNELS + 1)


# -- search --------------------------------------------------------------------------


async def test_search_ranks_prefix_then_word_then_substring(catalog: Catalog) -> None:
    all_channels = (await catalog.list_channels(page_size=200))["items"] + (
        await catalog.list_channels(page=2, page_size=200)
    )["items"]
    matching = [c for c in all_channels if "st" in c["name"].lower()]
    results = await catalog.search("ST", limit=100)
    assert sorted(c["id"] for c in results) == sorted(c["id"] for c in matching)
    ranks = [_search_rank(c["name"], "st") for c in results]
    assert ranks == sorted(ranks)  # type: ignore[type-var]
    assert {0, 1, 2} <= set(ranks)  # the query exercises all three groups
    assert results[0]["name"].lower().startswith("st")
    # Within a group, names are in alphabetical order.
    prefix = [c["name"].lower() for c in results if _search_rank(c["name"], "st") == 0]
    assert prefix == sorted(prefix)


async def test_search_limit_and_no_match(catalog: Catalog) -> None:
    assert len(await catalog.search("e", limit=5)) == 5
    assert await catalog.search("zzzz-no-such-channel") == []
    assert [c["name"] for c in await catalog.search("  atlas news 24 ")] == ["Atlas News 24"]


@pytest.mark.parametrize(("q", "limit"), [("", 20), ("   ", 20), ("x" * 101, 20), ("a", 0)])
async def test_search_rejects_bad_queries(catalog: Catalog, q: str, limit: int) -> None:
    with pytest.raises(BadRequest):
        await catalog.search(q, limit)


# -- favourites ----------------------------------------------------------------------


async def test_favourites_add_list_remove(catalog: Catalog) -> None:
    user = f"user-{time.monotonic_ns()}"
    assert await catalog.list_favourites(user) == []
    assert (await catalog.add_favourite(user, 9))["changed"] is True
    assert (await catalog.add_favourite(user, 3))["changed"] is True
    assert (await catalog.add_favourite(user, 9))["changed"] is False  # idempotent
    assert [c["id"] for c in await catalog.list_favourites(user)] == [9, 3]  # oldest first
    removed = await catalog.remove_favourite(user, 9)
    assert removed == {"user_id": user, "channel_id": 9, "favourite": False, "changed": True}
    assert (await catalog.remove_favourite(user, 9))["changed"] is False
    assert [c["id"] for c in await catalog.list_favourites(user)] == [3]
    assert await catalog.list_favourites(user + "-other") == []


async def test_favourites_reject_unknown_channel_and_bad_user(catalog: Catalog) -> None:
    with pytest.raises(NotFound):
        await catalog.add_favourite("someone", CHANNELS + 1)
    assert await catalog.list_favourites("someone") == []
    for bad in ("", "   ", "u" * 129):
        with pytest.raises(BadRequest):
            await catalog.add_favourite(bad, 1)
        with pytest.raises(BadRequest):
            await catalog.list_favourites(bad)


# -- seeding once --------------------------------------------------------------------


async def test_seeding_300_channels_for_a_week_is_fast(empty_db: aioredis.Redis) -> None:
    began = time.perf_counter()
    assert await ensure_seeded(empty_db, CHANNELS, GUIDE_START)
    elapsed = time.perf_counter() - began
    meta = json.loads(await empty_db.get(Keys.seeded))
    print(f"\nseed: {meta['programmes']} programmes in {elapsed:.2f}s")
    assert meta["channels"] == CHANNELS and meta["programmes"] > CHANNELS * GUIDE_DAYS * 10
    assert elapsed < 5.0


async def test_concurrent_instances_seed_once(redis_url: str, empty_db: aioredis.Redis) -> None:
    clients = [aioredis.Redis.from_url(db_url(redis_url, 5)) for _ in range(4)]
    try:
        results = await asyncio.gather(*(ensure_seeded(c, 40, GUIDE_START) for c in clients))
    finally:
        for client in clients:
            await client.aclose()
    assert sorted(results) == [False, False, False, True]
    assert await empty_db.hlen(Keys.channels) == 40
    assert not await empty_db.exists(Keys.seed_lock)


async def test_restart_does_not_reseed(empty_db: aioredis.Redis) -> None:
    assert await ensure_seeded(empty_db, 20, GUIDE_START)
    await empty_db.hset(Keys.channels, "1", json.dumps({"id": 1, "name": "edited"}))
    assert not await ensure_seeded(empty_db, 20, GUIDE_START)
    assert json.loads(await empty_db.hget(Keys.channels, "1"))["name"] == "edited"


async def test_a_dead_seeders_lock_expires_and_half_written_data_is_replaced(
    empty_db: aioredis.Redis,
) -> None:
    # A seeder that died half-way: its lock is still held and stale keys remain.
    await empty_db.set(Keys.seed_lock, "dead-instance", px=300)
    await empty_db.zadd(Keys.epg(999), {"stale": 1})
    await empty_db.zadd(Keys.category("bogus"), {"999": 1})
    await empty_db.hset(Keys.channels, "999", "{}")
    assert await ensure_seeded(empty_db, 10, GUIDE_START, poll_interval=0.02)
    assert not await empty_db.exists(Keys.epg(999), Keys.category("bogus"))
    assert await empty_db.hlen(Keys.channels) == 10


async def test_favourites_survive_a_reseed(empty_db: aioredis.Redis) -> None:
    await empty_db.zadd(Keys.favourites("alice"), {"3": 1})
    assert await ensure_seeded(empty_db, 10, GUIDE_START)
    favourites = await Catalog(empty_db).list_favourites("alice")
    assert [c["id"] for c in favourites] == [3]


async def test_a_seeder_takes_its_own_lock_back(empty_db: aioredis.Redis) -> None:
    # The same instance's seed failed half-way (Redis went away): its release failed
    # too, so its lock is still there. Its retry seeds at once, not after lock_ttl.
    await empty_db.set(Keys.seed_lock, "iptv-1", px=120_000)
    assert await ensure_seeded(empty_db, 10, GUIDE_START, owner="iptv-1", wait_timeout=5)
    assert await empty_db.hlen(Keys.channels) == 10
    assert not await empty_db.exists(Keys.seed_lock)
    # Anyone else's lock is still waited for.
    await empty_db.delete(Keys.seeded)
    await empty_db.set(Keys.seed_lock, "iptv-2", px=120_000)
    with pytest.raises(TimeoutError):
        await ensure_seeded(empty_db, 10, GUIDE_START, owner="iptv-1", wait_timeout=0.3)
