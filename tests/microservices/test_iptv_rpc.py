"""The iptv worker as a real process, called through RpcClient (Redis DBs 3 and 5)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import InvalidParams, RemoteError, RpcClient, RpcError
from common.constants import instances_key
from microservices.iptv.catalog import MAX_PAGE, Keys
from tests.helpers import ServiceProcess, db_url, wait_for_async

pytestmark = pytest.mark.timeout(90)

CHANNELS = 60


def start_iptv(url: str) -> ServiceProcess:
    return ServiceProcess(
        ["python", "-m", "microservices.iptv"],
        env={"REDIS_URL": url, "IPTV_CHANNELS": str(CHANNELS)},
    ).start()


async def ready(rpc: RpcClient, process: ServiceProcess) -> None:
    """Poll until the worker answers (it registers only after seeding)."""
    try:
        await wait_for_async(lambda: rpc.call("iptv.list_categories", timeout=2.0), timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- iptv log ---\n{process.log_tail()}") from None


async def flushed(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
async def iptv(redis_url: str) -> AsyncIterator[ServiceProcess]:
    url = db_url(redis_url, 3)
    await flushed(url)
    process = start_iptv(url)
    try:
        yield process
    finally:
        process.stop()
        await flushed(url)


@pytest.fixture(scope="module")
async def rpc(redis_url: str, iptv: ServiceProcess) -> AsyncIterator[RpcClient]:
    async with RpcClient(db_url(redis_url, 3)) as client:
        await ready(client, iptv)
        yield client


@pytest.fixture
def db5(redis_url: str) -> str:
    return db_url(redis_url, 5)


async def test_catalog_is_seeded_with_the_configured_size(rpc: RpcClient) -> None:
    page = await rpc.call("iptv.list_channels")
    assert set(page) == {"items", "total", "page", "page_size"}
    assert (page["total"], page["page"], page["page_size"]) == (CHANNELS, 1, 50)
    assert len(page["items"]) == 50
    categories = await rpc.call("iptv.list_categories")
    assert sum(c["count"] for c in categories) == CHANNELS


async def test_list_channels_filters_and_validates(rpc: RpcClient) -> None:
    news = await rpc.call("iptv.list_channels", category="news", page_size=200)
    assert news["items"] and {c["category"] for c in news["items"]} == {"news"}
    with pytest.raises(RemoteError) as caught:
        await rpc.call("iptv.list_channels", page_size=201)
    assert caught.value.code == "bad_request"
    with pytest.raises(RemoteError) as caught:
        await rpc.call("iptv.list_channels", page=0)
    assert caught.value.code == "bad_request"
    with pytest.raises(InvalidParams):
        await rpc.call("iptv.list_channels", page="first")


# Past int64 (as a query string brings them: the gateway forwards them as text).
HUGE = "99999999999999999999999"


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("list_channels", {"page": HUGE}),
        ("list_channels", {"page": str(2**63 - 1)}),
        ("list_channels", {"page": str(MAX_PAGE + 1)}),
        ("get_epg", {"channel_id": 1, "start": "0001-01-01T00:00:00"}),
        ("get_epg", {"channel_id": 1, "start": "0001-01-01T01:00:00+05:00"}),
        ("get_epg", {"channel_id": 1, "start": "9999-12-31T23:00:00"}),
        ("get_channel", {"channel_id": HUGE}),
        ("get_channel", {"channel_id": str(2**63)}),
        ("get_epg", {"channel_id": HUGE}),
        ("now_playing", {"channel_id": HUGE}),
        ("add_favourite", {"user_id": "rpc-user-2", "channel_id": HUGE}),
        ("remove_favourite", {"user_id": "rpc-user-2", "channel_id": HUGE}),
        ("remove_favourite", {"user_id": "rpc-user-2", "channel_id": f"-{HUGE}"}),
    ],
)
async def test_out_of_range_numbers_are_bad_requests(
    rpc: RpcClient, iptv: ServiceProcess, method: str, kwargs: dict[str, Any]
) -> None:
    """Bounded above as below: past them Redis, `datetime` or the RPC codec would fail
    (a remote error naming a Redis command, a traceback in the worker's log)."""
    with pytest.raises(RemoteError) as caught:
        await rpc.call(f"iptv.{method}", **kwargs)
    assert caught.value.code == "bad_request", caught.value
    assert "ZRANGE" not in str(caught.value) and "sb:" not in str(caught.value)
    assert iptv.log_records("handler raised") == []


async def test_get_channel(rpc: RpcClient) -> None:
    channel = await rpc.call("iptv.get_channel", channel_id="3")  # JSON strings are coerced
    assert channel["id"] == 3 and channel["name"]
    with pytest.raises(RemoteError) as caught:
        await rpc.call("iptv.get_channel", CHANNELS + 1)
    assert caught.value.code == "not_found"


async def test_epg_over_rpc_takes_iso_strings_and_returns_utc(rpc: RpcClient) -> None:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    end = start + timedelta(hours=3)
    epg = await rpc.call("iptv.get_epg", 1, start=start.isoformat(), end=end.isoformat())
    assert (epg["channel_id"], epg["start"], epg["end"]) == (1, start, end)
    programmes = epg["programmes"]
    assert programmes and programmes[0]["start"] <= start < programmes[0]["end"]
    assert all(p["start"] < end and p["end"] > start for p in programmes)
    assert all(p["start"].tzinfo == UTC for p in programmes)
    naive = start.replace(tzinfo=None).isoformat()  # "no zone" means UTC
    assert await rpc.call("iptv.get_epg", 1, start=naive, end=end.isoformat()) == epg


async def test_epg_defaults_and_errors(rpc: RpcClient) -> None:
    before = datetime.now(UTC)
    epg = await rpc.call("iptv.get_epg", channel_id=2)
    assert before <= epg["start"] <= datetime.now(UTC)
    assert epg["end"] - epg["start"] == timedelta(hours=24)
    now = datetime.now(UTC)
    for start, end in ((now, now), (now, now + timedelta(days=9))):
        with pytest.raises(RemoteError) as caught:
            await rpc.call("iptv.get_epg", 2, start=start, end=end)
        assert caught.value.code == "bad_request"
    with pytest.raises(RemoteError) as caught:
        await rpc.call("iptv.get_epg", CHANNELS + 1)
    assert caught.value.code == "not_found"


async def test_now_playing(rpc: RpcClient) -> None:
    # The guide starts yesterday 00:00 UTC, so something is on now.
    playing = await rpc.call("iptv.now_playing", 5)
    now = datetime.now(UTC)
    assert playing["channel_id"] == 5 and playing["start"] <= now < playing["end"]


async def test_search(rpc: RpcClient) -> None:
    results = await rpc.call("iptv.search", q="NEWS", limit=5)
    assert 0 < len(results) <= 5 and all("news" in c["name"].lower() for c in results)
    with pytest.raises(RemoteError) as caught:
        await rpc.call("iptv.search", q="  ")
    assert caught.value.code == "bad_request"


async def test_favourites(rpc: RpcClient) -> None:
    user = "rpc-user-1"
    assert (await rpc.call("iptv.add_favourite", user, 4))["changed"] is True
    assert (await rpc.call("iptv.add_favourite", user_id=user, channel_id=2))["changed"]
    assert [c["id"] for c in await rpc.call("iptv.list_favourites", user)] == [4, 2]
    assert (await rpc.call("iptv.remove_favourite", user, 4))["changed"] is True
    assert [c["id"] for c in await rpc.call("iptv.list_favourites", user)] == [2]
    with pytest.raises(RemoteError) as caught:
        await rpc.call("iptv.add_favourite", user, CHANNELS + 1)
    assert caught.value.code == "not_found"


async def test_a_restart_does_not_reseed(db5: str) -> None:
    await flushed(db5)
    probe = aioredis.Redis.from_url(db5)
    first = start_iptv(db5)
    try:
        async with RpcClient(db5) as rpc:
            await ready(rpc, first)
            seeded = await probe.get(Keys.seeded)
            await rpc.call("iptv.add_favourite", "alice", 7)
            assert first.stop() == 0  # SIGTERM: a clean exit
            second = start_iptv(db5)
            try:
                await ready(rpc, second)
                assert await probe.get(Keys.seeded) == seeded
                assert [c["id"] for c in await rpc.call("iptv.list_favourites", "alice")] == [7]
            finally:
                assert second.stop() == 0
        assert "iptv catalog seeded" not in second.log_path.read_text()
    finally:
        first.stop()
        await probe.flushdb()
        await probe.aclose()


async def test_instances_starting_together_seed_once(db5: str) -> None:
    await flushed(db5)
    probe = aioredis.Redis.from_url(db5)
    processes = [start_iptv(db5), start_iptv(db5)]
    try:
        # Both are live once both hold a heartbeat lease; each seeded or waited first.
        await wait_for_async(lambda: _count(probe, instances_key("iptv"), 2), timeout=30)
        logs = [p.log_path.read_text() for p in processes]
        assert sum(log.count("iptv catalog seeded") for log in logs) == 1, logs
        meta = json.loads(await probe.get(Keys.seeded))
        assert meta["channels"] == CHANNELS
    finally:
        for process in processes:
            process.stop()
        await probe.flushdb()
        await probe.aclose()


async def _count(client: aioredis.Redis, key: str, expected: int) -> bool:
    return int(await client.zcard(key)) == expected


async def test_a_catalog_lost_with_redis_data_comes_back_without_a_restart(db5: str) -> None:
    # Redis restarted without its data (FLUSHDB here): the worker registers again, makes
    # its consumer group again and seeds again (`keep_seeded`), and meanwhile a client
    # that reached iptv before is told it is unavailable (503), never that it is unknown.
    await flushed(db5)
    worker = start_iptv(db5)
    try:
        async with RpcClient(db5) as rpc:
            await ready(rpc, worker)
            await flushed(db5)
            errors: list[str] = []
            deadline = asyncio.get_running_loop().time() + 60
            while asyncio.get_running_loop().time() < deadline:
                try:
                    page = await rpc.call("iptv.list_channels", timeout=2.0)
                except RpcError as exc:
                    errors.append(type(exc).__name__)
                    page = {"total": None}
                if page["total"] == CHANNELS:
                    break
                await asyncio.sleep(0.05)
            assert page["total"] == CHANNELS, worker.log_tail()
            assert "MethodNotFound" not in errors
        assert worker.alive()
        # (logged once the seeding returned: a client may see the catalog just before)
        await wait_for_async(
            lambda: worker.log_records("catalog was gone from Redis: seeded it again")
        )
    finally:
        worker.stop()
        await flushed(db5)
