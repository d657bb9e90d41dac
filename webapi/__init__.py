"""The Sanic HTTP gateway: `create_app()` builds it, `python -m webapi` serves it."""

from webapi.app import create_app

__all__ = ["create_app"]
