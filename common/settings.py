"""Typed settings, read from the environment once at start-up.

Every tunable lives here; the rest of the code asks `get_settings()` and never
reads `os.environ` itself. A malformed value fails start-up with a `ConfigError`
naming the variable, instead of surfacing later as a strange behaviour: the
values each field takes (its `Bounds`) and how its text is read are in
`common.setting_values`, REDIS_URL's check in `common.redis_url`. An entry point
runs inside `exit_on_config_error`, which turns such an error into one line on
stderr and exit status 1. An error quotes a value but never `REDIS_URL`'s
credentials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from common.clientip import parse_networks
from common.connection import IDLE_TIMEOUT
from common.errors import ConfigError
from common.protocol import MAX_TASK_ATTEMPTS
from common.redis_url import check_redis_url
from common.setting_values import (
    COUNT,
    DAY,
    HEARTBEAT,
    PORT,
    SECONDS,
    TOKEN_TTL,
    Bounds,
    env,
    parse,
)
from common.tokens import check_secret

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The largest body limit the proxy takes (1 TiB): the setting's and the live policy's.
MAX_BODY_LIMIT = 1024**4
# The largest whole-exchange bound (PROXY_TOTAL_TIMEOUT, a service's `total_timeout`): a day.
MAX_TOTAL_TIMEOUT = 86400.0
# The longest login lock and failure window (AUTH_LOGIN_LOCK_MAX, AUTH_LOGIN_FAILURE_WINDOW):
# a day. Longer comes close to the permanent lockout the throttle is meant not to be.
MAX_LOGIN_LOCK = 86400.0
# The smallest RPC_MAX_PAYLOAD_BYTES: room for any error reply (its message is cut at
# 2,000 characters, `common.calls.MAX_ERROR_CHARS`).
MIN_PAYLOAD_LIMIT = 64 * 1024

_LOGIN_SECONDS = Bounds(0, MAX_LOGIN_LOCK, above=True, unit="seconds")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a Switchboard process can be told through its environment."""

    # Redis. Unset means "no Redis configured": `make run` and the test fixtures
    # then start an embedded one and export its URL to every process they start.
    redis_url: str | None = field(default=None, metadata=env("REDIS_URL"))
    # A process's pooled Redis connection unused this long is closed (all but the one
    # used last), so a burst's connections do not stay open for good (common.redis_pool).
    redis_pool_idle_timeout: float = field(
        default=IDLE_TIMEOUT,
        metadata=env(
            "REDIS_POOL_IDLE_TIMEOUT",
            Bounds(0, DAY, zero="never close an idle connection", unit="seconds"),
        ),
    )

    # Network. Loopback by default so a laptop exposes nothing; images set 0.0.0.0.
    bind_host: str = field(default="127.0.0.1", metadata=env("BIND_HOST"))
    webapi_port: int = field(default=8000, metadata=env("WEBAPI_PORT", PORT))
    websocket_port: int = field(default=8001, metadata=env("WEBSOCKET_PORT", PORT))

    log_level: str = field(default="INFO", metadata=env("LOG_LEVEL"))
    # How long the gateway and the websocket service wait for a request's next bytes,
    # of its head or of its body, before a 408 (nginx's client_body_timeout, 60 s;
    # Sanic's REQUEST_TIMEOUT). The whole head has REQUEST_HEAD_TIMEOUT besides.
    request_timeout: float = field(default=60.0, metadata=env("REQUEST_TIMEOUT", SECONDS))
    # The bound on receiving a whole request head, however its bytes are spaced (nginx's
    # client_header_timeout; REQUEST_TIMEOUT alone restarts at every byte). 0: REQUEST_TIMEOUT.
    request_head_timeout: float = field(
        default=0.0,
        metadata=env(
            "REQUEST_HEAD_TIMEOUT", Bounds(0, DAY, zero="REQUEST_TIMEOUT", unit="seconds")
        ),
    )

    # Reverse proxy: connect timeout, and the read timeout (no progress) / head deadline.
    proxy_connect_timeout: float = field(
        default=2.0, metadata=env("PROXY_CONNECT_TIMEOUT", SECONDS)
    )
    proxy_timeout: float = field(default=30.0, metadata=env("PROXY_TIMEOUT", SECONDS))
    # The bound on a whole exchange, from the request's first try to the response's
    # last byte, unless the live policy sets the service's `total_timeout`. 0: none
    # (the default: a 100 MB download and a JSON call need very different bounds).
    proxy_total_timeout: float = field(
        default=0.0,
        metadata=env(
            "PROXY_TOTAL_TIMEOUT", Bounds(0, MAX_TOTAL_TIMEOUT, zero="none", unit="seconds")
        ),
    )
    # The largest request body the proxy forwards (bytes), unless the live policy sets
    # the service's own `max_body`; larger is refused with 413 before anything is sent.
    proxy_max_body: int = field(
        default=1024**3, metadata=env("PROXY_MAX_BODY", Bounds(1, MAX_BODY_LIMIT, unit="bytes"))
    )
    # Answer plain `/svc/...` requests from the connection's protocol, before Sanic
    # (webapi.fastpath); off: every request goes through Sanic's handler.
    proxy_fast_path: bool = field(default=True, metadata=env("PROXY_FAST_PATH"))
    # Retry budget of each service (common.balancing.RetryBudget), unless the live
    # policy sets its own: retries add at most RATIO of the load, plus MIN per second.
    proxy_retry_budget_ratio: float = field(
        default=0.2, metadata=env("PROXY_RETRY_BUDGET_RATIO", Bounds(0, 1))
    )
    proxy_retry_budget_min: float = field(
        default=10.0, metadata=env("PROXY_RETRY_BUDGET_MIN", Bounds(0, 1000, unit="per second"))
    )
    # least_time: how fast a latency peak is forgotten (seconds, time constant).
    least_time_decay: float = field(default=10.0, metadata=env("LEAST_TIME_DECAY", SECONDS))

    # Where `make run` keeps its embedded Redis data (AOF) between runs.
    run_dir: str = field(default=".run", metadata=env("RUN_DIR"))

    # RPC.
    rpc_timeout: float = field(default=5.0, metadata=env("RPC_TIMEOUT", SECONDS))
    rpc_concurrency: int = field(default=64, metadata=env("RPC_CONCURRENCY", COUNT))
    rpc_thread_pool: int = field(default=16, metadata=env("RPC_THREAD_POOL", COUNT))
    shutdown_grace: float = field(default=10.0, metadata=env("SHUTDOWN_GRACE", SECONDS))
    # Calls queued (plus in flight) beyond this are refused with `Overloaded`; 0 = no bound.
    rpc_max_backlog: int = field(
        default=10_000, metadata=env("RPC_MAX_BACKLOG", Bounds(0, zero="no bound"))
    )
    # The largest encoded call (arguments) or reply (result) that goes through Redis: a
    # call over it is refused by its caller's client (`PayloadTooLarge`), a result over
    # it answered with `ResultTooLarge`. Well under Redis's own limit on one value
    # (proto-max-bulk-len, 512 MiB by default), over which Redis drops the connection;
    # a reply is held by the worker, Redis (twice: the inbox and the deduplication
    # window) and the caller, several copies each while it is encoded and written.
    rpc_max_payload_bytes: int = field(
        default=64 * 1024**2,
        metadata=env(
            "RPC_MAX_PAYLOAD_BYTES", Bounds(MIN_PAYLOAD_LIMIT, 512 * 1024**2, unit="bytes")
        ),
    )
    # How long a completed call's reply is kept to answer a redelivery without re-running.
    rpc_dedup_window: float = field(default=30.0, metadata=env("RPC_DEDUP_WINDOW", SECONDS))
    # A call handed to workers more times than this (each died or was stopped while
    # running it) is not run again: answered with an error, or dead-lettered (a task).
    rpc_max_deliveries: int = field(default=3, metadata=env("RPC_MAX_DELIVERIES", COUNT))
    # Tasks (fire-and-forget): runs in all before a failing task is dead-lettered,
    # first retry delay (doubled each time), and how many dead letters are kept.
    task_attempts: int = field(
        default=3, metadata=env("TASK_ATTEMPTS", Bounds(1, MAX_TASK_ATTEMPTS))
    )
    task_retry_delay: float = field(default=1.0, metadata=env("TASK_RETRY_DELAY", SECONDS))
    dead_letter_cap: int = field(default=10_000, metadata=env("DEAD_LETTER_CAP", COUNT))

    # Registry: liveness by heartbeat (design §5 defaults).
    heartbeat_interval: float = field(default=1.0, metadata=env("HEARTBEAT_INTERVAL", HEARTBEAT))
    heartbeat_ttl: float = field(default=3.0, metadata=env("HEARTBEAT_TTL", HEARTBEAT))
    # A worker's lease is renewed by a thread of its own (common.lease), so a handler
    # that blocks the event loop (a sync call, a CPU-bound step in an `async def`) does
    # not make the worker look dead and its calls run twice. A loop blocked longer than
    # this is taken for hung: the lease is no longer renewed and its calls go elsewhere.
    loop_stall_limit: float = field(default=60.0, metadata=env("LOOP_STALL_LIMIT", SECONDS))

    # auth. No default secret on purpose: without JWT_SECRET the auth service
    # generates one at first start and keeps it in Redis (never in the repo).
    jwt_secret: str | None = field(default=None, metadata=env("JWT_SECRET"))
    jwt_ttl: int = field(default=900, metadata=env("JWT_TTL", TOKEN_TTL))
    # A refresh token is good for this long (seconds); each use replaces it.
    jwt_refresh_ttl: int = field(default=14 * 86400, metadata=env("JWT_REFRESH_TTL", TOKEN_TTL))
    # The most live sessions (logins) a user has: one more ends the least recently used
    # (microservices.auth.sessions: why 50). Without a cap a client logging in at every
    # request would keep every session for JWT_REFRESH_TTL.
    auth_max_sessions_per_user: int = field(
        default=50, metadata=env("AUTH_MAX_SESSIONS_PER_USER", COUNT)
    )
    # First admin, created at the auth service's start when no admin exists yet
    # (the password is a deployment secret; there is no default password).
    auth_admin_username: str | None = field(default=None, metadata=env("AUTH_ADMIN_USERNAME"))
    auth_admin_password: str | None = field(default=None, metadata=env("AUTH_ADMIN_PASSWORD"))
    # Scopes a newly registered user gets (space-separated; "*" = every service, not admin).
    auth_default_scopes: str = field(default="*", metadata=env("AUTH_DEFAULT_SCOPES"))
    # Login throttling (brute force; never a permanent lockout; microservices.auth.throttle):
    # after AUTH_LOGIN_MAX_FAILURES failures in a row of a username from one client
    # address, its logins from there are refused for AUTH_LOGIN_LOCK_BASE seconds,
    # doubled at each further failure up to AUTH_LOGIN_LOCK_MAX; the count is forgotten
    # AUTH_LOGIN_FAILURE_WINDOW seconds after the last failure (and its lock). A
    # successful login resets it.
    auth_login_max_failures: int = field(default=5, metadata=env("AUTH_LOGIN_MAX_FAILURES", COUNT))
    # The account-wide backstop against guessing from many addresses: past this many
    # failures of a username from all addresses, the same growing locks, except for
    # the addresses its owner logged in from within AUTH_LOGIN_KNOWN_ADDRESS_DAYS.
    # 20: four addresses' worth of the owner's own typos, well under NIST SP 800-63B's
    # ceiling of 100 failures in a row.
    auth_login_max_failures_account: int = field(
        default=20, metadata=env("AUTH_LOGIN_MAX_FAILURES_ACCOUNT", COUNT)
    )
    auth_login_known_address_days: int = field(
        default=30,
        metadata=env(
            "AUTH_LOGIN_KNOWN_ADDRESS_DAYS",
            Bounds(0, 365, zero="no address escapes the account-wide lock", unit="days"),
        ),
    )
    # A successful login gives the client a device token (microservices.auth.devices)
    # good for this long: logins presenting it are counted per device, not per address,
    # so a stranger behind the owner's NAT locks the address, not the owner's device.
    auth_login_device_days: int = field(
        default=30,
        metadata=env(
            "AUTH_LOGIN_DEVICE_DAYS",
            Bounds(0, 365, zero="no device tokens are given", unit="days"),
        ),
    )
    auth_login_lock_base: float = field(
        default=1.0, metadata=env("AUTH_LOGIN_LOCK_BASE", _LOGIN_SECONDS)
    )
    auth_login_lock_max: float = field(
        default=900.0, metadata=env("AUTH_LOGIN_LOCK_MAX", _LOGIN_SECONDS)
    )
    auth_login_failure_window: float = field(
        default=900.0, metadata=env("AUTH_LOGIN_FAILURE_WINDOW", _LOGIN_SECONDS)
    )
    # How long a gateway trusts a cached API key record (revocations are pushed at once).
    api_key_cache_ttl: float = field(
        default=5.0,
        metadata=env(
            "API_KEY_CACHE_TTL", Bounds(0, DAY, zero="read the record at each use", unit="seconds")
        ),
    )
    # How long past API_KEY_CACHE_TTL a cached record still answers while Redis cannot
    # be read (down, or refusing: `common.apikey_cache`); then such a key's request is a 503.
    api_key_stale_if_error: float = field(
        default=300.0,
        metadata=env(
            "API_KEY_STALE_IF_ERROR",
            Bounds(0, DAY, zero="never answer with a stale record", unit="seconds"),
        ),
    )

    # Refused requests (4xx) the gateway and the websocket service log in full per client
    # address and minute; the rest are counted in one line per client and minute
    # (`common.log_budget`).
    log_refusals_per_client: int = field(
        default=10, metadata=env("LOG_REFUSALS_PER_CLIENT", Bounds(0, zero="log every one"))
    )

    # The client's address, at the gateway and the websocket relay: X-Forwarded-For is
    # believed only from these peers (comma-separated addresses or CIDRs; empty = trust
    # no one).
    trusted_proxies: str = field(default="", metadata=env("TRUSTED_PROXIES"))
    # Rate limits when Redis is unreachable: "local" (each process enforces the
    # limits alone), "open" (no limit) or "closed" (refuse with 503).
    rate_limit_on_redis_down: str = field(default="local", metadata=env("RATE_LIMIT_ON_REDIS_DOWN"))

    # websocket service (design §7). Frames over WS_MAX_MESSAGE_BYTES close with
    # 1009; a client whose WS_SEND_QUEUE pushed messages are not yet written is
    # closed with 1013; no pong within WS_PING_TIMEOUT of a ping (sent every
    # WS_PING_INTERVAL) closes with 1011; beyond WS_MAX_CONNECTIONS new
    # connections get HTTP 503; a client has WS_AUTH_TIMEOUT to authenticate.
    ws_max_message_bytes: int = field(
        default=1024 * 1024, metadata=env("WS_MAX_MESSAGE_BYTES", Bounds(1, unit="bytes"))
    )
    ws_send_queue: int = field(default=256, metadata=env("WS_SEND_QUEUE", COUNT))
    ws_ping_interval: float = field(default=20.0, metadata=env("WS_PING_INTERVAL", SECONDS))
    ws_ping_timeout: float = field(default=20.0, metadata=env("WS_PING_TIMEOUT", SECONDS))
    ws_max_connections: int = field(default=10_000, metadata=env("WS_MAX_CONNECTIONS", COUNT))
    ws_auth_timeout: float = field(default=5.0, metadata=env("WS_AUTH_TIMEOUT", SECONDS))
    ws_max_subscriptions: int = field(default=100, metadata=env("WS_MAX_SUBSCRIPTIONS", COUNT))
    # JSON-RPC calls one connection may have in flight; more are answered with an error.
    ws_max_calls_in_flight: int = field(default=32, metadata=env("WS_MAX_CALLS_IN_FLIGHT", COUNT))
    # How long SIGTERM waits for clients to acknowledge the 1001 close.
    ws_drain_timeout: float = field(default=5.0, metadata=env("WS_DRAIN_TIMEOUT", SECONDS))
    # A relayed connection (`websocket.splice`) one end of which has read nothing of what
    # it was sent for this long, while the other end waits on it, is cut (nginx's
    # proxy_send_timeout and send_timeout, 60 s by default).
    ws_relay_send_timeout: float = field(
        default=60.0, metadata=env("WS_RELAY_SEND_TIMEOUT", SECONDS)
    )

    # iptv: how often the worker checks which programme is on air, to publish changes.
    iptv_now_interval: float = field(default=15.0, metadata=env("IPTV_NOW_INTERVAL", SECONDS))

    # iptv seed size (a few hundred channels, a week of programmes).
    iptv_channels: int = field(default=300, metadata=env("IPTV_CHANNELS", COUNT))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: the process environment)."""
        source = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            raw = source.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = parse(name, raw, str(f.type))
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
        for f in dataclasses.fields(self):
            bounds: Bounds | None = f.metadata.get("bounds")
            value = getattr(self, f.name)
            if bounds is not None and not bounds.admits(value):
                raise ConfigError(f"{f.metadata['env']}={value!r} is not valid: must be {bounds}")
        if self.redis_url is not None:
            check_redis_url(self.redis_url)
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}")
        parse_networks(self.trusted_proxies)
        if self.rate_limit_on_redis_down not in ("local", "open", "closed"):
            raise ConfigError("RATE_LIMIT_ON_REDIS_DOWN must be local, open or closed")
        if self.auth_login_lock_base > self.auth_login_lock_max:
            raise ConfigError("AUTH_LOGIN_LOCK_BASE must be no longer than AUTH_LOGIN_LOCK_MAX")
        if self.heartbeat_ttl <= self.heartbeat_interval:
            raise ConfigError("HEARTBEAT_TTL must be longer than HEARTBEAT_INTERVAL")
        if self.jwt_secret:  # refused here, before a service starts, not by its listener
            check_secret(self.jwt_secret)
        if bool(self.auth_admin_username) != bool(self.auth_admin_password):
            given, missing = (
                ("AUTH_ADMIN_USERNAME", "AUTH_ADMIN_PASSWORD")
                if self.auth_admin_username
                else ("AUTH_ADMIN_PASSWORD", "AUTH_ADMIN_USERNAME")
            )
            raise ConfigError(
                f"{given} is set without {missing}: set both (the first admin) or neither"
            )


# The repository's root: `RUN_DIR` is relative to it, whatever the working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent


def run_path(settings: Settings, *parts: str) -> Path:
    """A path under `RUN_DIR` (`.run` in the repository, unless absolute)."""
    return REPO_ROOT.joinpath(settings.run_dir, *parts)


@contextlib.contextmanager
def exit_on_config_error(program: str) -> Iterator[None]:
    """Run an entry point: a `ConfigError` inside ends the process with one line on
    stderr (`<program>: <message>`, which names the variable) and exit status 1,
    instead of a traceback."""
    try:
        yield
    except ConfigError as exc:
        raise SystemExit(f"{program}: {exc.message}") from None


@cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()
