"""Switchboard's shared library: RPC over Redis, registry, settings, logging.

The public API is listed in `__all__` (guarded by `tests/common/test_exports.py`).
"""

from common.compiled import prefer_compiled

# Before any submodule is imported: the compiled build, when fresh (`common.compiled`).
prefer_compiled(__name__, __path__)

from common.caller import Caller  # noqa: E402
from common.client import RpcClient  # noqa: E402
from common.errors import (  # noqa: E402
    InvalidParams,
    InvalidResult,
    MethodNotFound,
    Overloaded,
    PayloadTooLarge,
    RemoteError,
    ResultTooLarge,
    RpcError,
    RpcTimeout,
    ServiceUnavailable,
)
from common.instance_record import InstanceRecord  # noqa: E402
from common.log import get_logger, setup_logging  # noqa: E402
from common.registry import Registry  # noqa: E402
from common.service import Service  # noqa: E402
from common.settings import Settings, get_settings  # noqa: E402

__all__ = [
    "Caller",
    "InstanceRecord",
    "InvalidParams",
    "InvalidResult",
    "MethodNotFound",
    "Overloaded",
    "PayloadTooLarge",
    "Registry",
    "RemoteError",
    "ResultTooLarge",
    "RpcClient",
    "RpcError",
    "RpcTimeout",
    "Service",
    "ServiceUnavailable",
    "Settings",
    "get_logger",
    "get_settings",
    "setup_logging",
]
