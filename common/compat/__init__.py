"""Adapters that let clients of other RPC libraries call Switchboard services (migration aids)."""

from common.compat.asyncredisrpc import serve_asyncredisrpc

__all__ = ["serve_asyncredisrpc"]
