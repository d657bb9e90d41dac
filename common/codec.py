"""The wire codec: msgpack, extended with the types handlers really return.

Native msgpack covers None, bool, int (64 bits), float, str, bytes, lists and
maps. On top of that, extension types carry an int of any size (past 64 bits:
its two's-complement bytes), `datetime` (naive or aware, offset kept), `date`,
`UUID` and `Decimal` exactly. Dataclasses and pydantic models travel as
an extension holding the class's registered name and its fields: the receiver
rebuilds the object when it knows the class (registered with `register`, which
`Service.method` does for every class in a handler's type hints) and a plain
dict otherwise. Classes are never imported by name from the wire, so a message
cannot make a process import or instantiate arbitrary code.

`json_default` makes the same types JSON-serialisable for HTTP and WebSocket
clients: a datetime, date, UUID or Decimal as its ISO or decimal text, a model or
dataclass as an object of its fields, a set as an array, bytes as the text they
encode in UTF-8. Bytes that are not UTF-8 are refused (`NotJsonValue`), never decoded
with replacement characters: JSON has no bytes type, and a handler that means binary
data for JSON clients returns it as text (base64) itself. `not_json_reason` says why
a value could not be written as JSON, and `not_json_message` is the text of the
`invalid_result` answers of the edge that says so.
`parse_json` reads what a client sends as JSON, strictly; `json_type` names a
decoded value's JSON type, for messages.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import sys
import uuid
from decimal import Decimal
from typing import Any

import msgpack
from pydantic import BaseModel

_DATETIME, _DATE, _UUID, _DECIMAL, _OBJECT, _BIGINT = 1, 2, 3, 4, 5, 6
# What the codec carries, for the message of a value it cannot.
CARRIED = (
    "None, bool, int, float, str, bytes, list, tuple, set, dict, datetime, date, UUID, "
    "Decimal, dataclasses and pydantic models"
)

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
    # msgpack calls this for an int past 64 bits too (rare path: any other int is native).
    if isinstance(obj, int):
        value = int(obj)
        data = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
        return msgpack.ExtType(_BIGINT, data)
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
    raise TypeError(f"cannot encode {type(obj).__name__} over RPC (it carries {CARRIED})")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _BIGINT:
        return int.from_bytes(data, "big", signed=True)
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


def encode_failure(exc: BaseException) -> str:
    """Why `packb` refused a value (`exc` is what it raised), in words for a message."""
    if isinstance(exc, UnicodeEncodeError):  # msgpack's str is UTF-8
        return "a string holds a lone surrogate (\\ud800-\\udfff), which UTF-8 cannot encode"
    return str(exc) or type(exc).__name__


class NotJsonValue(ValueError):
    """A value JSON cannot carry (`json_default`); the message says which."""


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` hook for the same types, for HTTP and WebSocket clients;
    `NotJsonValue` for bytes that are not UTF-8 (see the module docstring)."""
    if isinstance(obj, (dt.datetime, dt.date)):
        return obj.isoformat()
    if isinstance(obj, (uuid.UUID, Decimal)):
        return str(obj)
    if isinstance(obj, bytes):
        try:
            return obj.decode()
        except UnicodeDecodeError:
            raise NotJsonValue(
                f"bytes that are not UTF-8 text ({len(obj)} bytes), which JSON cannot carry: "
                "a service gives binary data to JSON clients as text (base64, say)"
            ) from None
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _fields(obj)
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def not_json_reason(exc: Exception) -> str:
    """Why `json.dumps(value, default=json_default, allow_nan=False)` refused a value
    (`exc`, the `ValueError` or `TypeError` it raised), in words for a message."""
    if isinstance(exc, NotJsonValue):
        return str(exc)
    text = str(exc)
    if text.startswith("Out of range float"):
        return "a number that is NaN or an infinity, which JSON cannot carry"
    if "integer string conversion" in text:
        digits = sys.get_int_max_str_digits()
        return f"an integer of more than {digits} digits, more than Python writes as text"
    if text.startswith("keys must be"):  # a map key of another type: bytes, a tuple
        return f"a map key that is not text ({text})"
    return f"a value JSON cannot carry ({text or type(exc).__name__})"


def not_json_message(subject: str, exc: Exception) -> str:
    """The message of the `invalid_result` answer for a value JSON cannot carry:
    `subject` ("the answer", "the result of iptv.search") cannot be sent as JSON, and
    why (`not_json_reason` of `exc`, what `json.dumps` raised). Every edge that writes
    JSON (the gateway, the websocket service, the asyncredisrpc bridge) says it so."""
    return f"{subject} cannot be sent as JSON: it holds {not_json_reason(exc)}"


_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def json_type(value: Any) -> str:
    """The JSON type of a value `parse_json` returned (`null`, `array`...), for messages:
    a client sent JSON, and Python's names (NoneType, list) mean nothing to it."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


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
