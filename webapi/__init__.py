"""The Sanic HTTP gateway: `create_app()` builds it, `python -m webapi` serves it."""

from common.compiled import prefer_compiled

# Before any submodule is imported: the compiled build, when fresh (`common.compiled`).
prefer_compiled(__name__, __path__)

from webapi.app import create_app  # noqa: E402

__all__ = ["create_app"]
