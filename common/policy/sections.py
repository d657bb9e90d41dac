"""The document's sections, and what leaving one out of a whole-document write means.

A PUT replaces the whole policy, and a section it leaves out takes its default:
none. `{"services": {"nlp": {"strategy": "hash"}}}` sent to change one strategy
would so remove every route and every rate limit, the default policy's limits on
`auth.login` and `auth.register` included, silently. So a PUT (`PolicyStore.put`)
that leaves out a section the stored policy has entries in is refused, naming
them: to remove them, say so (`"limits": []`); to change only part of the
policy, send a merge patch (`PolicyStore.patch`, `PATCH /admin/policy`). Leaving
out a section the stored policy has nothing in removes nothing, and is accepted.
`POST /admin/policy/validate`, which does not read the stored policy, warns of
every section left out instead.
"""

from __future__ import annotations

from typing import Any

from common.errors import quoted

# Each section, what its entries are called, and what names one in a message.
SECTIONS: dict[str, tuple[str, str | None]] = {
    "services": ("service entries", None),  # a dict: its keys
    "routes": ("routes", "prefix"),
    "limits": ("limits", "id"),
}
# The most entries a message names.
_NAMED = 5


def missing_sections(data: object) -> list[str]:
    """The sections `data` (a document as JSON, or a `PolicyDocument`) leaves out."""
    if not isinstance(data, dict):
        return []  # a PolicyDocument has every section
    return [section for section in SECTIONS if section not in data]


def removal_refusals(missing: list[str], stored: dict[str, Any]) -> list[dict[str, str]]:
    """A reason for each section in `missing` that has entries in `stored` (the stored
    document as JSON): a whole-document write leaving them out would remove them."""
    reasons = []
    for section in missing:
        names = _names(section, stored.get(section))
        if not names:
            continue
        what = SECTIONS[section][0]
        empty = "{}" if section == "services" else "[]"
        reasons.append({
            "loc": section,
            "msg": f"missing: a PUT replaces the whole policy, so this would remove the "
                   f"{len(names)} {what} stored ({_listed(names)}); to remove them send "
                   f'"{section}": {empty}, to change only part of the policy send a merge '
                   "patch (PATCH /admin/policy)",
        })  # fmt: skip
    return reasons


def omission_warnings(data: object) -> list[str]:
    """What leaving sections out of `data` means if it is PUT (no stored policy read)."""
    warnings = []
    for section in missing_sections(data):
        what = SECTIONS[section][0]
        default = (" (the default policy limits auth.login and auth.register)"
                   if section == "limits" else "")  # fmt: skip
        warnings.append(
            f'"{section}" is missing, which means no {what}: a PUT of this document is '
            f'refused while the stored policy has any{default}; send "{section}" to '
            "set them, or a merge patch (PATCH /admin/policy) to change only what you send"
        )
    return warnings


def _names(section: str, entries: Any) -> list[str]:
    if isinstance(entries, dict):
        return [str(name) for name in entries]
    if not isinstance(entries, list):
        return []
    key = SECTIONS[section][1]
    return [str(e.get(key, "?")) if isinstance(e, dict) else "?" for e in entries]


def _listed(names: list[str]) -> str:
    shown = ", ".join(quoted(name) for name in names[:_NAMED])
    return shown + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")
