"""What changed between two policy documents, as dotted paths for the audit log."""

from __future__ import annotations

from typing import Any

# Deep enough to name a service's field ("services.nlp.version_weights") or a
# limit's ("limits.login.rate"); deeper detail is in the stored versions.
MAX_DEPTH = 3


def changed_paths(old: dict[str, Any], new: dict[str, Any], depth: int = MAX_DEPTH) -> list[str]:
    """The sorted dotted paths whose values differ between `old` and `new` (JSON forms).

    Objects are compared key by key down to `depth` segments; a key present on
    one side only is reported at its own path. A list of objects that each carry
    a distinct "id" (the limits) is compared as an object keyed by id; any other
    list is one value. The top-level "version" is left out: it always changes.
    """
    out: list[str] = []
    _walk({k: v for k, v in old.items() if k != "version"},
          {k: v for k, v in new.items() if k != "version"}, "", depth, out)  # fmt: skip
    return sorted(out)


def _walk(old: Any, new: Any, path: str, depth: int, out: list[str]) -> None:
    if old == new:
        return
    old, new = _keyed(old), _keyed(new)
    if isinstance(old, dict) and new == []:
        new = {}  # every limit removed: name each one
    elif isinstance(new, dict) and old == []:
        old = {}
    if depth > 0 and isinstance(old, dict) and isinstance(new, dict):
        for key in old.keys() | new.keys():
            child = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                out.append(child)
            else:
                _walk(old[key], new[key], child, depth - 1, out)
    else:
        out.append(path)


def _keyed(value: Any) -> Any:
    """A list of objects with distinct string ids, as a dict by id; anything else as is."""
    if not isinstance(value, list) or not value:
        return value
    if not all(isinstance(item, dict) and isinstance(item.get("id"), str) for item in value):
        return value
    by_id = {item["id"]: item for item in value}
    return by_id if len(by_id) == len(value) else value
