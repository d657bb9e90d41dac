"""Deterministic demo data for the iptv catalog, written to Redis once.

`ensure_seeded` is safe to call from every instance at start-up: the first one
takes a lock (SET NX PX) and writes the catalog in pipelined batches; the others
wait for the "seeded" marker; a restart finds the marker and writes nothing.
The content comes from `random.Random(SEED)`, so every install has the same
channels and programmes; only the guide's dates follow the day of seeding.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis

from common.errors import ConfigError
from common.log import get_logger
from microservices.iptv.catalog import Keys

log = get_logger(__name__)

SEED = 20240611
GUIDE_DAYS = 7
# Channels written per pipeline round trip: big enough to amortise the round
# trip, small enough that one batch (~150 programmes per channel) stays a few MB.
BATCH = 25

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: the lock. ARGV: the owner's token, the lock's TTL (ms). Taken if free or already
# the owner's (a seed that Redis failed half-way, whose release failed too).
_TAKE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


@dataclass(frozen=True, slots=True)
class Genre:
    """What channels and programmes of one category look like."""

    title: str
    weight: int  # share of the channels
    brands: tuple[str, ...]
    channel_patterns: tuple[str, ...]
    shows: tuple[str, ...]  # programme title patterns, filled from `x` and `y`
    x: tuple[str, ...]
    y: tuple[str, ...]
    descriptions: tuple[str, ...]
    minutes: tuple[int, int]  # programme length range, within 15..120
    subgenres: tuple[str, ...]  # programme categories; empty: the `x` of the title is one


_CITIES = ("Lisbon", "Oslo", "Chicago", "Lyon", "Osaka", "Dublin", "Austin", "Porto", "Leeds")
_BRANDS = ("Atlas", "Meridian", "Harbor", "Northstar", "Summit", "Beacon", "Vista", "Orbit")

GENRES: dict[str, Genre] = {
    "news": Genre(
        "News", 14, _BRANDS + _CITIES,
        ("{} News", "{} News 24", "{} World", "{} Business", "{} Today"),
        ("Morning Briefing", "World Report", "Business Today", "The Late Edition",
         "Headlines at the Hour", "Politics Live", "Market Wrap", "Weather Watch",
         "{x} Tonight", "Inside {x}", "{y} Desk"),
        (*_CITIES, "Europe", "Asia", "America", "Africa"),
        ("Foreign", "Money", "Science", "Health", "Climate"),
        ("The latest national and international headlines.",
         "Analysis of the day's biggest stories with our correspondents.",
         "Markets, companies and the economy, explained.",
         "Live coverage and interviews as the story develops."),
        (15, 60), ("Headlines", "Business", "Politics", "Weather"),
    ),
    "sports": Genre(
        "Sports", 14, (*_BRANDS, "Arena", "Stadium", "Victory", "Champion"),
        ("{} Sports", "{} Sports 2", "{} Action", "{} Sport Plus"),
        ("{x} Live: {y}", "{x} Highlights", "{x} Tonight", "{x}: Match of the Week",
         "The {x} Show", "Road to the Final: {y}", "Sports Centre"),
        ("Football", "Basketball", "Tennis", "Cricket", "Rugby", "Cycling", "Golf", "Motorsport"),
        ("Lisbon v Oslo", "Chicago v Austin", "Lyon v Porto", "Dublin v Leeds", "Osaka v Lyon"),
        ("Live coverage with expert commentary.",
         "All the goals, points and talking points.",
         "Previews, interviews and analysis ahead of the weekend.",
         "Classic matches from the archive."),
        (30, 120), (),
    ),
    "movies": Genre(
        "Movies", 14, (*_BRANDS, "Cinema", "Silver Screen", "Premiere", "Reel"),
        ("{} Movies", "{} Cinema", "{} Classics", "{} Premiere", "{} Action"),
        ("The {x} {y}", "{x} {y}", "Return of the {y}", "The Last {y}", "Beyond the {y}"),
        ("Silent", "Crimson", "Broken", "Golden", "Hidden", "Endless", "Frozen", "Electric"),
        ("Harbor", "Horizon", "Garden", "Empire", "Signal", "River", "Witness", "Frontier"),
        ("A gripping thriller about a secret that refuses to stay buried.",
         "A heart-warming comedy about family, friends and second chances.",
         "An epic adventure across a world on the brink.",
         "A quiet drama that builds to an unforgettable finale."),
        (90, 120), ("Drama", "Comedy", "Thriller", "Sci-Fi", "Romance", "Action"),
    ),
    "series": Genre(
        "Series", 12, (*_BRANDS, "Prime", "Binge", "Episode"),
        ("{} Drama", "{} Series", "{} Stories", "{} Box"),
        ("{x}", "{x}", "{x}: {y}", "{x}: Behind the Scenes"),
        ("Harbor Street", "The Agency", "Northern Lights", "Second Chances", "Precinct 9",
         "The Lighthouse", "Cold Case Unit", "Kings of the Valley", "Night Shift"),
        ("The Pilot", "Homecoming", "Crossroads", "The Long Night", "Season Finale"),
        ("Secrets surface as the investigation closes in.",
         "Old rivalries flare up on the worst possible day.",
         "A new arrival turns everything upside down.",
         "Loyalties are tested when the truth comes out."),
        (30, 60), ("Drama", "Crime", "Comedy"),
    ),
    "kids": Genre(
        "Kids", 10, ("Tiny", "Rainbow", "Jellybean", "Sunny", "Bubble", "Rocket", "Puffin",
                     "Doodle", "Sprout", "Pebble", "Giggle"),
        ("{} Kids", "{} TV", "{} Junior", "{} Toons"),
        ("Adventures of {x}", "{x} and Friends", "Learn with {x}", "Cartoon Club",
         "{x}'s {y}", "Story Time with {x}"),
        ("Pip the Penguin", "Captain Comet", "Luna Fox", "Robo Rex", "Milo Mouse", "Bella Bee"),
        ("Big Day", "Birthday", "Treasure Hunt", "Snow Day", "Space Trip"),
        ("Songs, games and giggles for little ones.",
         "A brand-new adventure full of surprises.",
         "Counting, colours and clever ideas.",
         "Friendship saves the day once again."),
        (15, 30), ("Animation", "Preschool", "Education"),
    ),
    "music": Genre(
        "Music", 10, (*_BRANDS, "Groove", "Rhythm", "Amplify", "Vinyl", "Echo"),
        ("{} Music", "{} Hits", "{} FM TV", "{} Live"),
        ("Top 40 Countdown", "{x} Hour", "Live at the {y}", "Classic {x}", "{x} Unplugged",
         "Non-Stop {x}"),
        ("Jazz", "Rock", "Pop", "Hip-Hop", "Classical", "Country", "Electronic", "Indie"),
        ("Apollo", "Roundhouse", "Paradiso", "Fillmore", "Opera House"),
        ("The biggest tracks of the week, back to back.",
         "Live performances recorded in front of a packed house.",
         "Deep cuts and rare recordings from the archive.",
         "Interviews and sessions with rising artists."),
        (30, 120), (),
    ),
    "documentary": Genre(
        "Documentary", 10, (*_BRANDS, "Discovery", "Planet", "Odyssey", "Explorer"),
        ("{} Documentary", "{} Nature", "{} History", "{} Science"),
        ("Wild {x}", "Secrets of {y}", "Inside {y}", "Planet {x}", "The Story of {y}",
         "Lost Worlds: {x}"),
        ("Africa", "Arctic", "Amazon", "Oceans", "Himalayas", "Australia", "Patagonia"),
        ("the Pyramids", "the Deep Sea", "the Human Body", "the Cosmos", "Ancient Rome",
         "the Vikings"),
        ("A breathtaking journey into one of Earth's last wild places.",
         "Historians and new evidence retell a story we thought we knew.",
         "Scientists race to solve a mystery billions of years old.",
         "Extraordinary footage of animals few people have seen."),
        (45, 90), ("Nature", "History", "Science", "Travel"),
    ),
    "lifestyle": Genre(
        "Lifestyle", 8, (*_BRANDS, "Home", "Taste", "Wanderlust", "Fresh"),
        ("{} Living", "{} Food", "{} Travel", "{} Home"),
        ("{x} Kitchen", "Home Makeover", "Travel Diaries: {y}", "Garden Rescue", "Fit in 30",
         "Weekend in {y}", "The {x} Bake Off"),
        ("Italian", "Nordic", "Street Food", "Vegan", "Family"),
        ("Lisbon", "Kyoto", "Marrakesh", "Vancouver", "Cape Town"),
        ("Simple recipes for busy weeknights.",
         "A tired space gets a bold new look on a tight budget.",
         "Local secrets, hidden gems and the best places to eat.",
         "Expert tips for a healthier, happier routine."),
        (15, 60), ("Food", "Home", "Travel", "Health"),
    ),
}  # fmt: skip


def _slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _allocate(count: int) -> dict[str, int]:
    """Split `count` channels across categories by weight (largest remainder)."""
    total = sum(g.weight for g in GENRES.values())
    exact = {name: count * g.weight / total for name, g in GENRES.items()}
    shares = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(GENRES, key=lambda name: shares[name] - exact[name])
    for name in by_remainder[: count - sum(shares.values())]:
        shares[name] += 1
    return shares


def _channel_names(genre: Genre, count: int, taken: set[str], rng: random.Random) -> list[str]:
    """`count` names not in `taken` (which they are added to)."""
    combinations = [p.format(b) for p in genre.channel_patterns for b in genre.brands]
    rng.shuffle(combinations)
    names: list[str] = []
    # Big catalogs outgrow the combinations: go on with numbered "+N" feeds.
    for feed in itertools.count():
        for base in combinations:
            name = f"{base} +{feed}" if feed else base
            if len(names) == count:
                return names
            if name not in taken:
                taken.add(name)
                names.append(name)
    raise AssertionError("unreachable")


def generate_channels(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """`count` channels: grouped by category, numbered in blocks (news 101.., sports 201..)."""
    shares = _allocate(count)
    block = max(100, (max(shares.values()) // 100 + 1) * 100)
    channels: list[dict[str, Any]] = []
    taken: set[str] = set()
    for order, (category, genre) in enumerate(GENRES.items(), start=1):
        names = sorted(_channel_names(genre, shares[category], taken, rng))
        for position, name in enumerate(names, start=1):
            slug = _slug(name)
            channels.append(
                {
                    "id": len(channels) + 1,
                    "name": name,
                    "number": order * block + position,
                    "category": category,
                    "logo_url": f"https://img.example.com/logos/{slug}.png",
                    "stream_url": f"https://live.example.com/{slug}/index.m3u8",
                }
            )
    return channels


def generate_guide(
    channel: dict[str, Any], start: datetime, end: datetime, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """Back-to-back programmes for one channel from `start` until `end` is covered."""
    genre = GENRES[channel["category"]]
    low, high = genre.minutes
    at = int(start.timestamp())
    stop = int(end.timestamp())
    while at < stop:
        # Lengths in 5-minute steps, like a real schedule.
        minutes = rng.randrange(low, high + 1, 5)
        x = rng.choice(genre.x)
        title = rng.choice(genre.shows).format(x=x, y=rng.choice(genre.y))
        yield {
            "start": at,
            "end": at + minutes * 60,
            "title": title,
            "description": rng.choice(genre.descriptions),
            "category": rng.choice(genre.subgenres) if genre.subgenres else x,
        }
        at += minutes * 60


async def write_catalog(
    redis: aioredis.Redis, channel_count: int, guide_start: datetime, days: int = GUIDE_DAYS
) -> dict[str, Any]:
    """Write channels, categories, the search index and `days` of guide; return metadata.

    Overwrites whatever catalog keys exist (left by a seed that crashed half-way);
    favourites are not touched.
    """
    rng = random.Random(SEED)
    channels = generate_channels(channel_count, rng)
    guide_end = guide_start + timedelta(days=days)
    stale = [
        key
        for pattern in (Keys.epg("*"), Keys.category("*"))
        async for key in redis.scan_iter(match=pattern, count=1000)
    ]
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(Keys.channels, Keys.numbers, Keys.categories, Keys.names, *stale)
        await pipe.execute()
    programmes = 0
    for first in range(0, len(channels), BATCH):
        async with redis.pipeline(transaction=False) as pipe:
            for channel in channels[first : first + BATCH]:
                cid = str(channel["id"])
                pipe.hset(Keys.channels, cid, json.dumps(channel))
                pipe.hset(Keys.names, cid, channel["name"])
                pipe.zadd(Keys.numbers, {cid: channel["number"]})
                pipe.zadd(Keys.category(channel["category"]), {cid: channel["number"]})
                guide = {
                    json.dumps(p, separators=(",", ":")): p["start"]
                    for p in generate_guide(channel, guide_start, guide_end, rng)
                }
                pipe.zadd(Keys.epg(channel["id"]), guide)
                programmes += len(guide)
            await pipe.execute()
    shares = _allocate(channel_count)
    await redis.hset(
        Keys.categories,
        mapping={
            name: json.dumps({"name": name, "title": g.title, "count": shares[name], "order": i})
            for i, (name, g) in enumerate(GENRES.items())
            if shares[name]
        },
    )
    return {
        "channels": len(channels),
        "programmes": programmes,
        "guide_start": guide_start.isoformat(),
        "guide_end": guide_end.isoformat(),
    }


def default_guide_start(now: datetime | None = None) -> datetime:
    """Yesterday 00:00 UTC, so "earlier today" has programmes too."""
    midnight = (
        (now or datetime.now(UTC))
        .astimezone(UTC)
        .replace(hour=0, minute=0, second=0, microsecond=0)
    )
    return midnight - timedelta(days=1)


async def ensure_seeded(
    redis: aioredis.Redis,
    channel_count: int,
    guide_start: datetime | None = None,
    lock_ttl: float = 120.0,
    wait_timeout: float = 300.0,
    poll_interval: float = 0.1,
    owner: str | None = None,
) -> bool:
    """Seed the catalog unless it already is; True if this call wrote it.

    Concurrent callers seed once: one holds the lock, the others poll for the
    marker. If the holder dies, its lock expires after `lock_ttl` and a waiter
    takes over (seeding overwrites, so a half-written catalog is repaired).
    `owner` (an instance id; default: this call alone) names the lock's holder: a
    call that Redis failed half-way left its lock behind (its release failed too), and
    the same owner's next call takes it back at once instead of waiting it out.
    Never call it concurrently with the same `owner`.
    """
    if channel_count < 1:
        raise ConfigError("IPTV_CHANNELS must be at least 1")
    if await redis.exists(Keys.seeded):
        return False
    token = owner or uuid.uuid4().hex
    deadline = time.monotonic() + wait_timeout
    while time.monotonic() < deadline:
        if await redis.eval(_TAKE_LOCK, 1, Keys.seed_lock, token, int(lock_ttl * 1000)):
            try:
                # Someone may have finished between our check and our lock.
                if await redis.exists(Keys.seeded):
                    return False
                began = time.perf_counter()
                meta = await write_catalog(
                    redis, channel_count, guide_start or default_guide_start()
                )
                meta["seconds"] = round(time.perf_counter() - began, 3)
                meta["seeded_at"] = datetime.now(UTC).isoformat()
                await redis.set(Keys.seeded, json.dumps(meta))
                log.info("iptv catalog seeded", extra={"fields": {"seed": meta}})
                return True
            finally:
                await redis.eval(_RELEASE_LOCK, 1, Keys.seed_lock, token)
        if await redis.exists(Keys.seeded):
            return False
        await asyncio.sleep(poll_interval)
    raise TimeoutError(f"the iptv catalog was not seeded within {wait_timeout}s")
