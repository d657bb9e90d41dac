"""Typed settings, read from the environment once at start-up.

Every tunable lives here; the rest of the code asks `get_settings()` and never
reads `os.environ` itself. A malformed value fails start-up with a `ConfigError`
naming the variable, instead of surfacing later as a strange behaviour.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

from common.errors import ConfigError

T = TypeVar("T")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The largest body limit the proxy takes (1 TiB): the setting's and the live policy's.
MAX_BODY_LIMIT = 1024**4
# The largest whole-exchange bound (PROXY_TOTAL_TIMEOUT, a service's `total_timeout`): a day.
MAX_TOTAL_TIMEOUT = 86400.0
# The longest login lock and failure window (AUTH_LOGIN_LOCK_MAX, AUTH_LOGIN_FAILURE_WINDOW):
# a day. Longer comes close to the permanent lockout the throttle is meant not to be.
MAX_LOGIN_LOCK = 86400.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a Switchboard process can be told through its environment."""

    # Redis. Unset means "no Redis configured": `make run` and the test fixtures
    # then start an embedded one and export its URL to every process they start.
    redis_url: str | None = field(default=None, metadata={"env": "REDIS_URL"})

    # Network. Loopback by default so a laptop exposes nothing; images set 0.0.0.0.
    bind_host: str = field(default="127.0.0.1", metadata={"env": "BIND_HOST"})
    webapi_port: int = field(default=8000, metadata={"env": "WEBAPI_PORT"})
    websocket_port: int = field(default=8001, metadata={"env": "WEBSOCKET_PORT"})

    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL"})

    # Reverse proxy: connect timeout, and the read timeout (no progress) / head deadline.
    proxy_connect_timeout: float = field(default=2.0, metadata={"env": "PROXY_CONNECT_TIMEOUT"})
    proxy_timeout: float = field(default=30.0, metadata={"env": "PROXY_TIMEOUT"})
    # The bound on a whole exchange, from the request's first try to the response's
    # last byte, unless the live policy sets the service's `total_timeout`. 0: none
    # (the default: a 100 MB download and a JSON call need very different bounds).
    proxy_total_timeout: float = field(default=0.0, metadata={"env": "PROXY_TOTAL_TIMEOUT"})
    # The largest request body the proxy forwards (bytes), unless the live policy sets
    # the service's own `max_body`; larger is refused with 413 before anything is sent.
    proxy_max_body: int = field(default=1024**3, metadata={"env": "PROXY_MAX_BODY"})
    # Answer plain `/svc/...` requests from the connection's protocol, before Sanic
    # (webapi.fastpath); off: every request goes through Sanic's handler.
    proxy_fast_path: bool = field(default=True, metadata={"env": "PROXY_FAST_PATH"})
    # Retry budget of each service (common.balancing.RetryBudget), unless the live
    # policy sets its own: retries add at most RATIO of the load, plus MIN per second.
    proxy_retry_budget_ratio: float = field(
        default=0.2, metadata={"env": "PROXY_RETRY_BUDGET_RATIO"}
    )
    proxy_retry_budget_min: float = field(default=10.0, metadata={"env": "PROXY_RETRY_BUDGET_MIN"})
    # least_time: how fast a latency peak is forgotten (seconds, time constant).
    least_time_decay: float = field(default=10.0, metadata={"env": "LEAST_TIME_DECAY"})

    # Where `make run` keeps its embedded Redis data (AOF) between runs.
    run_dir: str = field(default=".run", metadata={"env": "RUN_DIR"})

    # RPC.
    rpc_timeout: float = field(default=5.0, metadata={"env": "RPC_TIMEOUT"})
    rpc_concurrency: int = field(default=64, metadata={"env": "RPC_CONCURRENCY"})
    rpc_thread_pool: int = field(default=16, metadata={"env": "RPC_THREAD_POOL"})
    shutdown_grace: float = field(default=10.0, metadata={"env": "SHUTDOWN_GRACE"})
    # Calls queued (plus in flight) beyond this are refused with `Overloaded`; 0 = no bound.
    rpc_max_backlog: int = field(default=10_000, metadata={"env": "RPC_MAX_BACKLOG"})
    # How long a completed call's reply is kept to answer a redelivery without re-running.
    rpc_dedup_window: float = field(default=30.0, metadata={"env": "RPC_DEDUP_WINDOW"})
    # A call handed to workers more times than this (each died or was stopped while
    # running it) is not run again: answered with an error, or dead-lettered (a task).
    rpc_max_deliveries: int = field(default=3, metadata={"env": "RPC_MAX_DELIVERIES"})
    # Tasks (fire-and-forget): runs in all before a failing task is dead-lettered,
    # first retry delay (doubled each time), and how many dead letters are kept.
    task_attempts: int = field(default=3, metadata={"env": "TASK_ATTEMPTS"})
    task_retry_delay: float = field(default=1.0, metadata={"env": "TASK_RETRY_DELAY"})
    dead_letter_cap: int = field(default=10_000, metadata={"env": "DEAD_LETTER_CAP"})

    # Registry: liveness by heartbeat (design §5 defaults).
    heartbeat_interval: float = field(default=1.0, metadata={"env": "HEARTBEAT_INTERVAL"})
    heartbeat_ttl: float = field(default=3.0, metadata={"env": "HEARTBEAT_TTL"})

    # auth. No default secret on purpose: without JWT_SECRET the auth service
    # generates one at first start and keeps it in Redis (never in the repo).
    jwt_secret: str | None = field(default=None, metadata={"env": "JWT_SECRET"})
    jwt_ttl: int = field(default=900, metadata={"env": "JWT_TTL"})
    # A refresh token is good for this long (seconds); each use replaces it.
    jwt_refresh_ttl: int = field(default=14 * 86400, metadata={"env": "JWT_REFRESH_TTL"})
    # First admin, created at the auth service's start when no admin exists yet
    # (the password is a deployment secret; there is no default password).
    auth_admin_username: str | None = field(default=None, metadata={"env": "AUTH_ADMIN_USERNAME"})
    auth_admin_password: str | None = field(default=None, metadata={"env": "AUTH_ADMIN_PASSWORD"})
    # Scopes a newly registered user gets (space-separated; "*" = every service, not admin).
    auth_default_scopes: str = field(default="*", metadata={"env": "AUTH_DEFAULT_SCOPES"})
    # Login throttling per username (brute force; never a permanent lockout): after
    # AUTH_LOGIN_MAX_FAILURES failures in a row, a username's logins are refused for
    # AUTH_LOGIN_LOCK_BASE seconds, doubled at each further failure up to
    # AUTH_LOGIN_LOCK_MAX; the count is forgotten AUTH_LOGIN_FAILURE_WINDOW seconds
    # after the last failure (and its lock). A successful login resets it.
    auth_login_max_failures: int = field(default=5, metadata={"env": "AUTH_LOGIN_MAX_FAILURES"})
    auth_login_lock_base: float = field(default=1.0, metadata={"env": "AUTH_LOGIN_LOCK_BASE"})
    auth_login_lock_max: float = field(default=900.0, metadata={"env": "AUTH_LOGIN_LOCK_MAX"})
    auth_login_failure_window: float = field(
        default=900.0, metadata={"env": "AUTH_LOGIN_FAILURE_WINDOW"}
    )
    # How long a gateway trusts a cached API key record (revocations are pushed at once).
    api_key_cache_ttl: float = field(default=5.0, metadata={"env": "API_KEY_CACHE_TTL"})

    # Gateway access: X-Forwarded-For is believed only from these peers
    # (comma-separated addresses or CIDRs; empty = trust no one).
    trusted_proxies: str = field(default="", metadata={"env": "TRUSTED_PROXIES"})
    # Rate limits when Redis is unreachable: "local" (each process enforces the
    # limits alone), "open" (no limit) or "closed" (refuse with 503).
    rate_limit_on_redis_down: str = field(
        default="local", metadata={"env": "RATE_LIMIT_ON_REDIS_DOWN"}
    )

    # websocket service (design §7). Frames over WS_MAX_MESSAGE_BYTES close with
    # 1009; a client whose WS_SEND_QUEUE pushed messages are not yet written is
    # closed with 1013; no pong within WS_PING_TIMEOUT of a ping (sent every
    # WS_PING_INTERVAL) closes with 1011; beyond WS_MAX_CONNECTIONS new
    # connections get HTTP 503; a client has WS_AUTH_TIMEOUT to authenticate.
    ws_max_message_bytes: int = field(default=1024 * 1024, metadata={"env": "WS_MAX_MESSAGE_BYTES"})
    ws_send_queue: int = field(default=256, metadata={"env": "WS_SEND_QUEUE"})
    ws_ping_interval: float = field(default=20.0, metadata={"env": "WS_PING_INTERVAL"})
    ws_ping_timeout: float = field(default=20.0, metadata={"env": "WS_PING_TIMEOUT"})
    ws_max_connections: int = field(default=10_000, metadata={"env": "WS_MAX_CONNECTIONS"})
    ws_auth_timeout: float = field(default=5.0, metadata={"env": "WS_AUTH_TIMEOUT"})
    ws_max_subscriptions: int = field(default=100, metadata={"env": "WS_MAX_SUBSCRIPTIONS"})
    # JSON-RPC calls one connection may have in flight; more are answered with an error.
    ws_max_calls_in_flight: int = field(default=32, metadata={"env": "WS_MAX_CALLS_IN_FLIGHT"})
    # How long SIGTERM waits for clients to acknowledge the 1001 close.
    ws_drain_timeout: float = field(default=5.0, metadata={"env": "WS_DRAIN_TIMEOUT"})

    # iptv: how often the worker checks which programme is on air, to publish changes.
    iptv_now_interval: float = field(default=15.0, metadata={"env": "IPTV_NOW_INTERVAL"})

    # iptv seed size (a few hundred channels, a week of programmes).
    iptv_channels: int = field(default=300, metadata={"env": "IPTV_CHANNELS"})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: the process environment)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(name, raw, _PARSERS[str(f.type)])
        settings = cls(**values)
        settings._validate()
        return settings

    def require_redis_url(self) -> str:
        """The Redis URL, or a `ConfigError` telling the user how to get one."""
        if not self.redis_url:
            raise ConfigError(
                "REDIS_URL is not set: export it (redis://host:6379/0) or start "
                "everything with `make run`, which starts an embedded Redis"
            )
        return self.redis_url

    def _validate(self) -> None:
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}")
        for name, port in (
            ("WEBAPI_PORT", self.webapi_port),
            ("WEBSOCKET_PORT", self.websocket_port),
        ):
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be a TCP port, got {port}")
        if self.rate_limit_on_redis_down not in ("local", "open", "closed"):
            raise ConfigError("RATE_LIMIT_ON_REDIS_DOWN must be local, open or closed")
        if self.jwt_ttl <= 0 or self.jwt_refresh_ttl <= 0 or self.api_key_cache_ttl < 0:
            raise ConfigError("JWT_TTL and JWT_REFRESH_TTL must be positive")
        if self.auth_login_max_failures < 1:
            raise ConfigError("AUTH_LOGIN_MAX_FAILURES must be at least 1")
        if not 0 < self.auth_login_lock_base <= self.auth_login_lock_max <= MAX_LOGIN_LOCK:
            raise ConfigError(
                "AUTH_LOGIN_LOCK_BASE and AUTH_LOGIN_LOCK_MAX must be positive, the base no "
                f"longer than the max, the max at most {MAX_LOGIN_LOCK:g} (seconds)"
            )
        if not 0 < self.auth_login_failure_window <= MAX_LOGIN_LOCK:
            raise ConfigError(
                f"AUTH_LOGIN_FAILURE_WINDOW must be positive, at most {MAX_LOGIN_LOCK:g} (seconds)"
            )
        if self.heartbeat_ttl <= self.heartbeat_interval:
            raise ConfigError("HEARTBEAT_TTL must be longer than HEARTBEAT_INTERVAL")
        if not 0 <= self.proxy_total_timeout <= MAX_TOTAL_TIMEOUT:
            raise ConfigError(
                f"PROXY_TOTAL_TIMEOUT must be from 0 (none) to {MAX_TOTAL_TIMEOUT:g} (seconds)"
            )
        if not 0 < self.proxy_max_body <= MAX_BODY_LIMIT:
            raise ConfigError(f"PROXY_MAX_BODY must be from 1 to {MAX_BODY_LIMIT} (bytes)")
        if not 0 <= self.proxy_retry_budget_ratio <= 1:
            raise ConfigError("PROXY_RETRY_BUDGET_RATIO must be between 0 and 1")
        if not 0 <= self.proxy_retry_budget_min <= 1000:
            raise ConfigError("PROXY_RETRY_BUDGET_MIN must be between 0 and 1000 (per second)")
        if self.rpc_timeout <= 0 or self.rpc_concurrency <= 0:
            raise ConfigError("RPC_TIMEOUT and RPC_CONCURRENCY must be positive")
        if self.rpc_max_deliveries < 1:
            raise ConfigError("RPC_MAX_DELIVERIES must be at least 1")
        for name, value in (
            ("WS_MAX_MESSAGE_BYTES", self.ws_max_message_bytes),
            ("WS_SEND_QUEUE", self.ws_send_queue),
            ("WS_PING_INTERVAL", self.ws_ping_interval),
            ("WS_PING_TIMEOUT", self.ws_ping_timeout),
            ("WS_MAX_CONNECTIONS", self.ws_max_connections),
            ("WS_AUTH_TIMEOUT", self.ws_auth_timeout),
            ("WS_MAX_SUBSCRIPTIONS", self.ws_max_subscriptions),
            ("WS_MAX_CALLS_IN_FLIGHT", self.ws_max_calls_in_flight),
            ("WS_DRAIN_TIMEOUT", self.ws_drain_timeout),
            ("IPTV_NOW_INTERVAL", self.iptv_now_interval),
        ):
            if value <= 0:
                raise ConfigError(f"{name} must be positive")


def _parse(name: str, raw: str, parser: Callable[[str], T]) -> T:
    try:
        return parser(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not valid: {exc}") from exc


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "bool": _bool,
    "str": str,
    "str | None": str,
    "int": int,
    "float": float,
}


@cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()
