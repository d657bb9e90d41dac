"""The iptv domain: channels, categories, programme guide, search and favourites.

`Catalog` reads what `seed.py` wrote and owns the favourites; it knows nothing of
RPC, so it is tested against Redis directly. Redis layout (all keys share the
`{iptv}` hash tag, so one Cluster slot):

```
sb:{iptv}:channels            hash  channel id -> channel JSON
sb:{iptv}:numbers             zset  channel id scored by channel number (listing order)
sb:{iptv}:category:<name>     zset  channel id scored by channel number, one per category
sb:{iptv}:categories          hash  category name -> {"name","title","count","order"} JSON
sb:{iptv}:names               hash  channel id -> channel name (the search index)
sb:{iptv}:epg:<channel id>    zset  programme JSON scored by its start (epoch seconds)
sb:{iptv}:favourites:<user>   zset  channel id scored by the time it was added
sb:{iptv}:now:<channel id>    string  id of the programme last announced as on air
sb:{iptv}:seeded              string  seed metadata; its presence means "seeded"
sb:{iptv}:seed_lock           string  held (SET NX EX) by the instance that is seeding
```
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import redis.asyncio as aioredis

from common.constants import data_key
from common.errors import BadRequest, NotFound

SERVICE = "iptv"

# The seed never writes a longer programme; EPG range queries rely on it to
# find the programme that started before the window but still runs into it.
MAX_PROGRAMME = timedelta(minutes=120)
MAX_EPG_RANGE = timedelta(days=8)
DEFAULT_EPG_RANGE = timedelta(hours=24)
MAX_PAGE_SIZE = 200
# Keeps the offset (page - 1) * page_size far inside the int64 Redis takes.
MAX_PAGE = 1_000_000
# Channel ids are 64-bit: a larger one could not go back over RPC (the codec's ints are).
MAX_CHANNEL_ID = 2**63 - 1
# EPG times a query may name: the arithmetic around them (the window, MAX_PROGRAMME
# before it) stays inside what `datetime` can hold.
EPG_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
EPG_LATEST = datetime(9999, 1, 1, tzinfo=UTC)
MAX_SEARCH_LIMIT = 100
MAX_QUERY_LENGTH = 100
MAX_USER_ID_LENGTH = 128

Clock = Callable[[], datetime]


class Keys:
    """Names of the iptv keys, in one place (see the module docstring)."""

    channels = data_key(SERVICE, "channels")
    numbers = data_key(SERVICE, "numbers")
    categories = data_key(SERVICE, "categories")
    names = data_key(SERVICE, "names")
    seeded = data_key(SERVICE, "seeded")
    seed_lock = data_key(SERVICE, "seed_lock")

    @staticmethod
    def category(name: str) -> str:
        """Channel ids of one category, scored by channel number (`"*"`: a SCAN pattern)."""
        return data_key(SERVICE, "category", name)

    @staticmethod
    def epg(channel_id: int | str) -> str:
        """Programmes of one channel, scored by start time (`"*"`: a SCAN pattern)."""
        return data_key(SERVICE, "epg", str(channel_id))

    @staticmethod
    def now(channel_id: int | str) -> str:
        """The programme last announced as on air on one channel (see `now_playing`)."""
        return data_key(SERVICE, "now", str(channel_id))

    @staticmethod
    def favourites(user_id: str) -> str:
        """One user's favourite channel ids, scored by when they were added."""
        return data_key(SERVICE, "favourites", user_id)


def as_utc(value: datetime) -> datetime:
    """`value` as an aware UTC datetime; a naive one is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


def _programme(channel_id: int, raw: bytes | str) -> dict[str, Any]:
    """A stored programme (epoch seconds) as the API's dict (aware UTC datetimes)."""
    stored = json.loads(raw)
    return {
        "id": f"{channel_id}:{stored['start']}",
        "channel_id": channel_id,
        "title": stored["title"],
        "description": stored["description"],
        "category": stored.get("category"),
        "start": datetime.fromtimestamp(stored["start"], UTC),
        "end": datetime.fromtimestamp(stored["end"], UTC),
    }


def _search_rank(name: str, needle: str) -> int | None:
    """0 when the name starts with the query, 1 when a word does, 2 for any other
    substring, None when the name does not match at all."""
    lowered = name.casefold()
    if lowered.startswith(needle):
        return 0
    position = lowered.find(needle)
    if position < 0:
        return None
    if any(word.startswith(needle) for word in lowered.split()):
        return 1
    return 2


class Catalog:
    """Channels, categories, EPG, search and favourites over one Redis connection pool."""

    def __init__(self, redis: aioredis.Redis, clock: Clock = utc_now) -> None:
        self.redis = redis
        self.clock = clock

    # -- channels ---------------------------------------------------------------

    async def list_channels(
        self, category: str | None = None, page: int = 1, page_size: int = 50
    ) -> dict[str, Any]:
        """One page of channels in channel-number order, optionally of one category
        (matched ignoring case). An unknown category is an empty page, not an error:
        it is a filter.
        """
        if not 1 <= page <= MAX_PAGE:
            raise BadRequest(f"page must be between 1 and {MAX_PAGE}")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise BadRequest(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        # A blank category (`?category=` from a form) means "no filter".
        wanted = (category or "").strip().lower()
        index = Keys.category(wanted) if wanted else Keys.numbers
        first = (page - 1) * page_size
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(index)
            pipe.zrange(index, first, first + page_size - 1)
            total, ids = await pipe.execute()
        return {
            "items": await self._channels(ids),
            "total": int(total),
            "page": page,
            "page_size": page_size,
        }

    async def get_channel(self, channel_id: int) -> dict[str, Any]:
        """One channel; `NotFound` if there is no such channel."""
        _check_channel(channel_id)
        raw = await self.redis.hget(Keys.channels, str(channel_id))
        if raw is None:
            raise NotFound(f"channel {channel_id} not found")
        channel: dict[str, Any] = json.loads(raw)
        return channel

    async def list_categories(self) -> list[dict[str, Any]]:
        """Every category with its channel count, in channel-number order."""
        raw = await self.redis.hvals(Keys.categories)
        categories = [json.loads(value) for value in raw]
        categories.sort(key=lambda c: c["order"])
        return [{"name": c["name"], "title": c["title"], "count": c["count"]} for c in categories]

    async def _channels(self, ids: Sequence[bytes | str]) -> list[dict[str, Any]]:
        if not ids:
            return []
        raws = await self.redis.hmget(Keys.channels, ids)
        return [json.loads(raw) for raw in raws if raw is not None]

    # -- programme guide --------------------------------------------------------

    async def get_epg(
        self, channel_id: int, start: datetime | None = None, end: datetime | None = None
    ) -> dict[str, Any]:
        """Programmes of a channel overlapping [start, end), in start order.

        Defaults: start is now, end is start + 24 h. Naive datetimes are UTC.
        """
        _check_channel(channel_id)
        start = _epg_time("start", start) if start is not None else self.clock()
        end = _epg_time("end", end) if end is not None else start + DEFAULT_EPG_RANGE
        if end <= start:
            raise BadRequest("end must be after start")
        if end - start > MAX_EPG_RANGE:
            raise BadRequest(f"the range may span at most {MAX_EPG_RANGE.days} days")
        programmes = await self._overlapping(channel_id, start, end)
        return {"channel_id": channel_id, "start": start, "end": end, "programmes": programmes}

    async def now_playing(self, channel_id: int) -> dict[str, Any] | None:
        """The programme on air on a channel right now, or None in a gap of the guide."""
        _check_channel(channel_id)
        now = self.clock()
        programmes = await self._overlapping(channel_id, now, now + timedelta(seconds=1))
        return programmes[0] if programmes else None

    async def now_playing_all(self) -> dict[int, dict[str, Any] | None]:
        """What is on air on every channel now (None in a gap), in one round trip."""
        now = self.clock()
        low, now_epoch = int((now - MAX_PROGRAMME).timestamp()), now.timestamp()
        ids = [int(i) for i in cast("list[bytes]", await self.redis.zrange(Keys.numbers, 0, -1))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel_id in ids:
                pipe.zrangebyscore(Keys.epg(channel_id), low, now_epoch)
            guides = await pipe.execute()
        playing: dict[int, dict[str, Any] | None] = {}
        for channel_id, raws in zip(ids, guides, strict=True):
            on_air = [p for p in (_programme(channel_id, r) for r in raws)
                      if p["end"].timestamp() > now_epoch]  # fmt: skip
            playing[channel_id] = on_air[-1] if on_air else None
        return playing

    async def _overlapping(
        self, channel_id: int, start: datetime, end: datetime
    ) -> list[dict[str, Any]]:
        # A programme overlapping the window started before `end` and at most
        # MAX_PROGRAMME before `start`; fetch those, then keep the ones still
        # running at `start`. The end bound is exclusive, hence the "(".
        low = int((start - MAX_PROGRAMME).timestamp())
        high = f"({end.timestamp()}"
        start_epoch = start.timestamp()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hexists(Keys.channels, str(channel_id))
            pipe.zrangebyscore(Keys.epg(channel_id), low, high)
            exists, raws = await pipe.execute()
        if not exists:
            raise NotFound(f"channel {channel_id} not found")
        programmes = [_programme(channel_id, raw) for raw in raws]
        return [p for p in programmes if p["end"].timestamp() > start_epoch]

    # -- search -----------------------------------------------------------------

    async def search(self, q: str, limit: int = 20) -> list[dict[str, Any]]:
        """Channels whose name contains `q` (case-insensitive), best matches first:
        names starting with `q`, then names with a word starting with `q`, then the
        rest; ties in channel-name order.

        The whole name index (a few KB for hundreds of channels) is read and
        matched here: substring search has no index in plain Redis, and at demo
        scale one HGETALL is cheaper than anything cleverer.
        """
        needle = q.strip().casefold()
        if not needle:
            raise BadRequest("q must not be blank")
        if len(needle) > MAX_QUERY_LENGTH:
            raise BadRequest(f"q may be at most {MAX_QUERY_LENGTH} characters")
        if not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_SEARCH_LIMIT}")
        names = await self.redis.hgetall(Keys.names)
        ranked: list[tuple[int, str, int]] = []
        for raw_id, raw_name in names.items():
            name = _text(raw_name)
            rank = _search_rank(name, needle)
            if rank is not None:
                ranked.append((rank, name.casefold(), int(raw_id)))
        ranked.sort()
        return await self._channels([str(entry[2]) for entry in ranked[:limit]])

    # -- favourites ---------------------------------------------------------------

    async def add_favourite(self, user_id: str, channel_id: int) -> dict[str, Any]:
        """Add a channel to a user's favourites (idempotent); `NotFound` for no such channel."""
        _check_channel(channel_id)
        key = Keys.favourites(_check_user(user_id))
        await self.get_channel(channel_id)
        added = await self.redis.zadd(key, {str(channel_id): time.time()}, nx=True)
        return {
            "user_id": user_id,
            "channel_id": channel_id,
            "favourite": True,
            "changed": added == 1,
        }

    async def remove_favourite(self, user_id: str, channel_id: int) -> dict[str, Any]:
        """Remove a channel from a user's favourites (idempotent)."""
        _check_channel(channel_id)
        key = Keys.favourites(_check_user(user_id))
        removed = await self.redis.zrem(key, str(channel_id))
        return {
            "user_id": user_id,
            "channel_id": channel_id,
            "favourite": False,
            "changed": removed == 1,
        }

    async def list_favourites(self, user_id: str) -> list[dict[str, Any]]:
        """A user's favourite channels, oldest favourite first."""
        ids = await self.redis.zrange(Keys.favourites(_check_user(user_id)), 0, -1)
        return await self._channels(cast("list[bytes]", ids))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _epg_time(name: str, value: datetime) -> datetime:
    """`value` in UTC, or `BadRequest` outside [EPG_EARLIEST, EPG_LATEST]."""
    try:
        utc = as_utc(value)
    except OverflowError:  # 0001-01-01 or 9999-12-31 in a zone that moves it past either
        utc = None
    if utc is None or not EPG_EARLIEST <= utc <= EPG_LATEST:
        raise BadRequest(f"{name} must be from {EPG_EARLIEST:%Y-%m-%d} to {EPG_LATEST:%Y-%m-%d}")
    return utc


def _check_channel(channel_id: int) -> None:
    if not -MAX_CHANNEL_ID <= channel_id <= MAX_CHANNEL_ID:
        raise BadRequest(f"channel_id must be between {-MAX_CHANNEL_ID} and {MAX_CHANNEL_ID}")


def _check_user(user_id: str) -> str:
    if not user_id.strip() or len(user_id) > MAX_USER_ID_LENGTH:
        raise BadRequest(f"user_id must be 1 to {MAX_USER_ID_LENGTH} non-blank characters")
    return user_id
