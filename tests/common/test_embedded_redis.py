from __future__ import annotations

import redis

from common.embedded_redis import MIN_VERSION, EmbeddedRedis, _version_of, find_redis_server


def test_finds_a_recent_enough_server() -> None:
    version = _version_of(find_redis_server())
    assert version is not None and version[:2] >= MIN_VERSION


def test_starts_answers_and_stops_cleanly() -> None:
    server = EmbeddedRedis().start()
    process = server.process
    data_dir = server.data_dir
    assert redis.Redis.from_url(server.url).ping()
    server.stop()
    assert process is not None and process.poll() is not None
    assert not data_dir.exists()


def test_context_manager_with_persistence(tmp_path) -> None:
    with EmbeddedRedis(appendonly=True, data_dir=tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert tmp_path.exists()  # a caller-owned directory is kept
