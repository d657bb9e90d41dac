from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.settings import Settings


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


def test_missing_redis_url_says_how_to_get_one() -> None:
    with pytest.raises(ConfigError, match="make run"):
        Settings.from_env({}).require_redis_url()
