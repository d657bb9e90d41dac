"""Switchboard's shared library: RPC over Redis, registry, settings, logging.

The public API is listed in `__all__` (guarded by `tests/common/test_exports.py`).
"""

from common.caller import Caller
from common.client import RpcClient
from common.errors import (
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
from common.log import get_logger, setup_logging
from common.registry import InstanceRecord, Registry
from common.service import Service
from common.settings import Settings, get_settings

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
