from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from common.dev_redis import cli_redis_url, remove_dev_redis_url, write_dev_redis_url
from common.errors import ConfigError
from common.setting_values import Bounds
from common.settings import Settings
from tests.helpers import ROOT


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.redis_url, s.webapi_port, s.websocket_port, s.log_level) == (None, 8000, 8001, "INFO")


def test_reads_and_types_the_environment() -> None:
    s = Settings.from_env(
        {
            "REDIS_URL": "redis://h:1/2",
            "WEBAPI_PORT": "9000",
            "RPC_TIMEOUT": "2.5",
            "LOG_LEVEL": "debug",
        }
    )
    assert (s.redis_url, s.webapi_port, s.rpc_timeout) == ("redis://h:1/2", 9000, 2.5)


@pytest.mark.parametrize(
    "env",
    [
        {"WEBAPI_PORT": "eighty"},
        {"WEBAPI_PORT": "70000"},
        {"LOG_LEVEL": "LOUD"},
        {"HEARTBEAT_TTL": "0.5"},
        {"RPC_TIMEOUT": "-1"},
        {"PROXY_RETRY_BUDGET_RATIO": "1.5"},
        {"PROXY_RETRY_BUDGET_MIN": "-1"},
        {"PROXY_MAX_BODY": "0"},
        {"PROXY_MAX_BODY": str(2**40 + 1)},
        {"PROXY_TOTAL_TIMEOUT": "-1"},
        {"PROXY_TOTAL_TIMEOUT": "86401"},
        {"AUTH_LOGIN_MAX_FAILURES": "0"},
        {"AUTH_LOGIN_LOCK_BASE": "0"},
        {"AUTH_LOGIN_LOCK_MAX": "0.5"},  # shorter than the base (1 s)
        {"AUTH_LOGIN_LOCK_MAX": "inf"},
        {"AUTH_LOGIN_FAILURE_WINDOW": "-1"},
    ],
)
def test_malformed_values_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert next(iter(env)) in str(info.value)


def test_rpc_max_payload_bytes_is_well_under_redis_own_limit() -> None:
    assert Settings.from_env({}).rpc_max_payload_bytes == 64 * 1024**2
    assert Settings.from_env({"RPC_MAX_PAYLOAD_BYTES": "65536"}).rpc_max_payload_bytes == 65536


def test_missing_redis_url_says_how_to_get_one() -> None:
    with pytest.raises(ConfigError, match="make run"):
        Settings.from_env({}).require_redis_url()


def test_an_operator_command_finds_the_redis_make_run_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """REDIS_URL first; else the URL file `make run` writes (and only while the process
    that wrote it runs); else an error saying what to do."""
    settings = Settings.from_env({"RUN_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="no `make run` is running in this checkout"):
        cli_redis_url(settings, "policy")
    written = write_dev_redis_url(settings, "redis://127.0.0.1:6399/0")
    assert written == tmp_path / "redis-url" and written.stat().st_mode & 0o777 == 0o600
    assert cli_redis_url(settings, "policy") == "redis://127.0.0.1:6399/0"
    assert "policy: REDIS_URL is not set: using the Redis of `make run`" in capsys.readouterr().err
    given = Settings.from_env({"RUN_DIR": str(tmp_path), "REDIS_URL": "redis://h:1/0"})
    assert cli_redis_url(given, "policy") == "redis://h:1/0"  # REDIS_URL wins

    dead = subprocess.Popen(["true"])  # a pid that has exited, and been reaped
    dead.wait()
    written.write_text(json.dumps({"url": "redis://127.0.0.1:6399/0", "pid": dead.pid}))
    with pytest.raises(ConfigError, match="is not running any more"):
        cli_redis_url(settings, "policy")
    remove_dev_redis_url(settings)  # not this process's: left alone
    assert written.exists()
    write_dev_redis_url(settings, "redis://127.0.0.1:6399/0")
    remove_dev_redis_url(settings)
    assert not written.exists()
    written.write_text("garbage")
    with pytest.raises(ConfigError, match="no `make run` is running"):
        cli_redis_url(settings, "policy")


def _numeric_fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(Settings) if f.type in ("int", "float")]


def test_every_number_declares_its_bounds() -> None:
    for f in _numeric_fields():
        assert isinstance(f.metadata.get("bounds"), Bounds), f.metadata["env"]
    # 0 where it means something (none, no bound, no caching, never stale).
    s = Settings.from_env({"RPC_MAX_BACKLOG": "0", "PROXY_TOTAL_TIMEOUT": "0",
                           "API_KEY_CACHE_TTL": "0", "API_KEY_STALE_IF_ERROR": "0",
                           "REDIS_POOL_IDLE_TIMEOUT": "0"})  # fmt: skip
    assert (s.rpc_max_backlog, s.proxy_total_timeout, s.api_key_cache_ttl,
            s.api_key_stale_if_error) == (0, 0.0, 0.0, 0.0)  # fmt: skip
    assert s.redis_pool_idle_timeout == 0.0


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN", "1e999"])
@pytest.mark.parametrize("name", [f.metadata["env"] for f in _numeric_fields()])
def test_no_number_takes_nan_or_infinity(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: raw})
    assert info.value.message.startswith(f"{name}="), info.value.message


# Durations: 0 and below would busy-loop, expire at once or break the event loop.
DURATIONS = ("HEARTBEAT_INTERVAL", "RPC_TIMEOUT", "PROXY_TIMEOUT", "PROXY_CONNECT_TIMEOUT",
             "SHUTDOWN_GRACE", "RPC_DEDUP_WINDOW", "TASK_RETRY_DELAY", "LEAST_TIME_DECAY",
             "WS_PING_INTERVAL", "WS_PING_TIMEOUT", "WS_AUTH_TIMEOUT", "WS_DRAIN_TIMEOUT",
             "WS_RELAY_SEND_TIMEOUT", "IPTV_NOW_INTERVAL", "JWT_TTL",
             "JWT_REFRESH_TTL", "LOOP_STALL_LIMIT")  # fmt: skip
# Counts where 0 makes no sense.
COUNTS = ("RPC_CONCURRENCY", "RPC_THREAD_POOL", "TASK_ATTEMPTS", "DEAD_LETTER_CAP",
          "IPTV_CHANNELS", "WS_MAX_CONNECTIONS", "WS_SEND_QUEUE", "WS_MAX_SUBSCRIPTIONS",
          "WS_MAX_CALLS_IN_FLIGHT", "WS_MAX_MESSAGE_BYTES",
          "AUTH_MAX_SESSIONS_PER_USER")  # fmt: skip


@pytest.mark.parametrize(
    "env",
    [
        *({name: value} for value in ("0", "-1") for name in DURATIONS),
        *({name: "0"} for name in COUNTS),
        {"RPC_MAX_BACKLOG": "-1"},
        {"RPC_MAX_PAYLOAD_BYTES": "1000"},  # no room for an error reply
        {"RPC_MAX_PAYLOAD_BYTES": str(512 * 1024**2 + 1)},  # over Redis's own default limit
        {"API_KEY_CACHE_TTL": "-1"},
        {"API_KEY_STALE_IF_ERROR": "-1"},
        {"REDIS_POOL_IDLE_TIMEOUT": "-1"},
        {"HEARTBEAT_INTERVAL": "0.001"},  # a busy loop on Redis all the same
        {"HEARTBEAT_TTL": "1e300"},
        {"RPC_TIMEOUT": "1e300"},
        {"WEBSOCKET_PORT": "-1"},
        {"WEBAPI_PORT": "0"},  # any free port: nobody would find the service there
        {"WEBSOCKET_PORT": "0"},
        {"TASK_ATTEMPTS": "101"},  # was cut to 100 by the workers, silently
    ],
)
def test_out_of_bounds_numbers_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    name = next(iter(env))
    assert info.value.message.startswith(f"{name}="), info.value.message
    assert "is not valid: must be" in info.value.message


def test_every_setting_is_in_the_readmes_settings_section() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Settings") : readme.index("## Add a service")]
    missing = [f.metadata["env"] for f in dataclasses.fields(Settings)
               if f"`{f.metadata['env']}`" not in section]  # fmt: skip
    assert missing == []


SECRET = "Sup3rS3cretPart"
BAD_REDIS_URLS = [
    f"redis://:{SECRET}/tail@127.0.0.1:6379/0",  # redis-py's error quotes part of it
    f"redis://:{SECRET}#tail@127.0.0.1:6379/0",
    f"redis://:{SECRET}?tail@127.0.0.1:6379/0",
    f"redis://user:{SECRET}/x@redis:6379",
    "redis://:1234/" + SECRET + "@redis:6379/0",  # redis-py reads it as localhost:1234
    f"http://:{SECRET}@redis:6379/0",
    f"redis://redis:6379/0?password={SECRET}&db=x",
    "redis://redis:port/0",
    "unix://",
]
GOOD_REDIS_URLS = [
    "redis://127.0.0.1:6379/0",
    "redis://redis",
    "rediss://user:p%2Fw%23rd%3F@redis.example.com:6380/2",
    "redis://:p%40ss@redis:6379/0?socket_timeout=5",
    "unix:///run/redis/redis.sock",
    "unix:///run/redis/redis.sock?db=3",
]


def test_redis_url_is_read_as_redis_py_will_and_never_quoted_with_its_credentials() -> None:
    for url in GOOD_REDIS_URLS:
        assert Settings.from_env({"REDIS_URL": url}).redis_url == url
    for url in BAD_REDIS_URLS:
        with pytest.raises(ConfigError) as info:
            Settings.from_env({"REDIS_URL": url})
        assert info.value.message.startswith("REDIS_URL"), url
        assert SECRET not in info.value.message and "tail" not in info.value.message


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"AUTH_ADMIN_USERNAME": "root"}, "AUTH_ADMIN_PASSWORD"),
        ({"AUTH_ADMIN_PASSWORD": "a long passphrase"}, "AUTH_ADMIN_USERNAME"),
    ],
)
def test_the_first_admin_needs_both_its_name_and_password(
    env: dict[str, str], missing: str
) -> None:
    with pytest.raises(ConfigError, match=f"without {missing}") as info:
        Settings.from_env(env)
    assert "a long passphrase" not in str(info.value)


def test_trusted_proxies_are_checked_at_start_up() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/8, garbage"})
    assert info.value.message.startswith("TRUSTED_PROXIES")


def test_a_short_jwt_secret_is_refused_at_settings_load() -> None:
    with pytest.raises(ConfigError, match="JWT_SECRET must be at least 32 bytes") as info:
        Settings.from_env({"JWT_SECRET": "x" * 31})
    assert "x" * 31 not in str(info.value)
    assert Settings.from_env({"JWT_SECRET": "x" * 32}).jwt_secret == "x" * 32
