"""The public API of `common` is exactly what `__all__` lists (style habit 2)."""

from __future__ import annotations

import common


def test_public_names() -> None:
    assert sorted(common.__all__) == [
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
    for name in common.__all__:
        assert getattr(common, name).__module__.startswith("common.")


def test_error_hierarchy() -> None:
    from common import errors

    for name in ("RpcTimeout", "RemoteError", "MethodNotFound", "InvalidParams",
                 "ServiceUnavailable", "Overloaded", "PayloadTooLarge",
                 "InvalidResult"):  # fmt: skip
        assert issubclass(getattr(errors, name), errors.RpcError)
    assert issubclass(errors.ResultTooLarge, errors.InvalidResult)
    assert issubclass(errors.RpcTimeout, TimeoutError)
    assert issubclass(errors.RpcError, errors.SwitchboardError)
