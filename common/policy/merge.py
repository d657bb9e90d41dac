"""JSON merge patch (RFC 7396): how `PATCH /admin/policy` changes part of the policy.

A patch is a JSON object shaped like the document: each member replaces the
document's member of that name, an object member is merged into the document's
object recursively, and `null` removes the member. Anything that is not an object
(a list, a number...) replaces the target whole, so `"limits": [...]` replaces
every limit: a limit is changed by sending the whole list.

    merge_patch({"services": {"nlp": {"strategy": "round_robin", "retries": 2}}},
                {"services": {"nlp": {"strategy": "hash"}}})
    -> {"services": {"nlp": {"strategy": "hash", "retries": 2}}}
"""

from __future__ import annotations

from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """`target` with `patch` applied (RFC 7396 §2); neither argument is changed."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = merge_patch(merged.get(name), value)
    return merged
