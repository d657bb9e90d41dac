"""The typed application context: everything long-lived the gateway holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from sanic import Request, Sanic
from sanic.config import Config

from common.settings import Settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from common.client import RpcClient
    from common.policy import PolicyWatcher
    from common.registry import Registry
    from common.registry_view import RegistryView
    from webapi.access import Gatekeeper
    from webapi.errors import ErrorLogs
    from webapi.proxy.forward import Proxy


@dataclass(slots=True)
class FastPathStats:
    """How many requests the proxy's fast path answered itself (and how many of them
    it sent on an idle upstream connection from its callbacks: `direct`), and how
    many times it handed bytes it had looked at over to Sanic (`webapi.fastpath`)."""

    answered: int = 0
    direct: int = 0
    handed_over: int = 0


@dataclass(slots=True)
class PassThroughStats:
    """Counters of this process's pass-through splices (`webapi.passthrough`)."""

    connections: int = 0  # splices started (tunnels included)
    tunnels: int = 0  # of which tunnels (`webapi.tunnel`)
    requests: int = 0  # requests relayed
    connect_failures: int = 0  # splices that could reach no instance


@dataclass
class GatewayContext:
    """`app.ctx`: opened in `before_server_start`, closed in `after_server_stop`."""

    settings: Settings
    # The budgets of its error lines (`webapi.errors.ErrorLogs`): the app's own, with its
    # settings' limit, made with the app (refusals come before the server starts too).
    error_logs: ErrorLogs
    redis: aioredis.Redis = field(init=False)
    rpc: RpcClient = field(init=False)
    registry: Registry = field(init=False)
    view: RegistryView = field(init=False)
    proxy: Proxy = field(init=False)
    policy: PolicyWatcher = field(init=False)
    gate: Gatekeeper = field(init=False)
    fast_path: FastPathStats = field(default_factory=FastPathStats)
    passthrough: PassThroughStats = field(default_factory=PassThroughStats)
    extra: dict[str, Any] = field(default_factory=dict)


GatewayApp: TypeAlias = Sanic[Config, GatewayContext]
GatewayRequest: TypeAlias = Request[GatewayApp, Any]
