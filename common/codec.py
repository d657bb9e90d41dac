"""The wire codec: msgpack, extended with the types handlers really return.

Native msgpack covers None, bool, int, float, str, bytes, lists and maps. On
top of that, extension types carry `datetime` (naive or aware, offset kept),
`date`, `UUID` and `Decimal` exactly. Dataclasses and pydantic models travel as
an extension holding the class's registered name and its fields: the receiver
rebuilds the object when it knows the class (registered with `register`, which
`Service.method` does for every class in a handler's type hints) and a plain
dict otherwise. Classes are never imported by name from the wire, so a message
cannot make a process import or instantiate arbitrary code.

`json_default` makes the same types JSON-serialisable for HTTP responses;
`parse_json` reads what a client sends as JSON, strictly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import uuid
from decimal import Decimal
from typing import Any

import msgpack
from pydantic import BaseModel

_DATETIME, _DATE, _UUID, _DECIMAL, _OBJECT = 1, 2, 3, 4, 5

_registry: dict[str, type[Any]] = {}


def type_name(cls: type[Any]) -> str:
    """The name a class travels under: `module.QualName`."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register(cls: type[Any]) -> type[Any]:
    """Let received objects of `cls` (a dataclass or pydantic model) be rebuilt as `cls`."""
    if not (dataclasses.is_dataclass(cls) or issubclass(cls, BaseModel)):
        raise TypeError(f"{cls!r} is neither a dataclass nor a pydantic model")
    _registry[type_name(cls)] = cls
    return cls


def _fields(obj: Any) -> dict[str, Any]:
    if isinstance(obj, BaseModel):
        return dict(obj)
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _default(obj: Any) -> msgpack.ExtType:
    # datetime before date: datetime is a subclass of date.
    if isinstance(obj, dt.datetime):
        return msgpack.ExtType(_DATETIME, obj.isoformat().encode())
    if isinstance(obj, dt.date):
        return msgpack.ExtType(_DATE, obj.isoformat().encode())
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(_UUID, obj.bytes)
    if isinstance(obj, Decimal):
        return msgpack.ExtType(_DECIMAL, str(obj).encode())
    if isinstance(obj, BaseModel) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        return msgpack.ExtType(_OBJECT, packb([type_name(type(obj)), _fields(obj)]))
    raise TypeError(f"cannot encode {type(obj).__name__} over RPC")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _DATETIME:
        return dt.datetime.fromisoformat(data.decode())
    if code == _DATE:
        return dt.date.fromisoformat(data.decode())
    if code == _UUID:
        return uuid.UUID(bytes=data)
    if code == _DECIMAL:
        return Decimal(data.decode())
    if code == _OBJECT:
        name, fields = unpackb(data)
        cls = _registry.get(name)
        if cls is None:
            return fields
        if issubclass(cls, BaseModel):
            return cls.model_validate(fields)
        return cls(**fields)
    return msgpack.ExtType(code, data)


def _encodable(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    return _default(obj)


def packb(obj: Any) -> bytes:
    """Encode `obj` to bytes (sets become lists, tuples become lists)."""
    data: bytes = msgpack.packb(obj, default=_encodable, use_bin_type=True, datetime=False)
    return data


def unpackb(data: bytes) -> Any:
    """Decode bytes produced by `packb`."""
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` hook for the same types, for HTTP responses."""
    if isinstance(obj, (dt.datetime, dt.date)):
        return obj.isoformat()
    if isinstance(obj, (uuid.UUID, Decimal)):
        return str(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _fields(obj)
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(literal: str) -> float:
    # `1e400` is valid JSON grammar, but a double cannot hold it: Python makes it
    # inf, which would go out as `Infinity`, the very non-JSON `_not_json` keeps out.
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"the number {literal[:40]} is too large for a double")
    return value


_STRICT = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)
# Any UTF-16 surrogate code point left in a decoded string is a lone one: the decoder
# joins a high surrogate escape followed by a low one into one character.
_SURROGATE = re.compile("[\\ud800-\\udfff]")


def parse_json(data: str | bytes, *, lone_surrogates: bool = False) -> Any:
    """`data` (a client's) as JSON (RFC 8259), else `ValueError`: for malformed text,
    bytes that are not UTF-8, `NaN` and `Infinity` (Python's extension, which no strict
    parser, a browser's included, reads back) and a number too large for a double
    (`1e400`, which Python reads as infinity), nesting deeper than Python's recursion
    limit (a `RecursionError` from `json.loads`, which a handler catching `ValueError`
    would let through as a crash), and a string holding a lone surrogate escape
    (`"\\ud800"`: the grammar allows it, but it is no Unicode text, and neither UTF-8
    nor msgpack can carry it; a pair such as `"\\ud83d\\ude00"` is one character and
    fine). `lone_surrogates=True` lets those through, for an upstream's answer that is
    relayed rather than used.

    Hot path (every JSON request body): only a text with a `\\ud`/`\\uD` escape in it
    has its strings searched for a lone surrogate.
    """
    try:
        text = data.decode() if isinstance(data, bytes) else data
        value = _STRICT.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not lone_surrogates and ("\\ud" in text or "\\uD" in text) and _has_lone_surrogate(value):
        raise ValueError("a string holds a lone surrogate escape (\\ud800-\\udfff), not text")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a string (key or value) anywhere in decoded JSON holds a surrogate code point.
    Iterative: `value` may be nested as deep as the decoder allowed."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
