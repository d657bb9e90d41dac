from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from decimal import Decimal

import pytest
from pydantic import BaseModel

from common import codec


@dataclasses.dataclass
class Money:
    amount: Decimal
    currency: str


class Event(BaseModel):
    at: dt.datetime
    tags: list[str]


codec.register(Money)
codec.register(Event)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        12,
        -3.5,
        "text é",
        b"\x00\x01",
        [1, "a", None],
        {"nested": {"k": [1, 2]}},
        dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 21, 12, 0, 0, 123456),
        dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        dt.date(2026, 2, 28),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        Decimal("0.1"),
        Decimal("-1E+3"),
        Money(Decimal("9.99"), "EUR"),
        Event(at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), tags=["a"]),
    ],
)
def test_round_trip(value: object) -> None:
    decoded = codec.unpackb(codec.packb(value))
    assert decoded == value
    assert type(decoded) is type(value)


def test_unregistered_class_arrives_as_dict() -> None:
    @dataclasses.dataclass
    class Unknown:
        x: int

    assert codec.unpackb(codec.packb(Unknown(1))) == {"x": 1}


def test_unencodable_type_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="cannot encode") as info:
        codec.packb(object())
    # ... saying what the codec does carry
    assert "it carries None, bool, int, float, str, bytes" in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        2**64,  # one past msgpack's unsigned 64 bits
        -(2**63) - 1,  # one past its signed 64 bits
        2**64 - 1,  # native still
        -(2**63),
        10**100,
        -(10**100),
        [1, {"n": 2**200, "m": -(2**70)}],
    ],
)
def test_ints_of_any_size_round_trip(value: object) -> None:
    """JSON allows them (a client's `18446744073709551616`) and Python has them: msgpack's
    own ints stop at 64 bits, past which an extension type carries them."""
    decoded = codec.unpackb(codec.packb(value))
    assert decoded == value
    assert json.dumps(decoded) == json.dumps(value)  # ints, not another type


def test_json_default_gives_utf8_bytes_as_text_and_refuses_others() -> None:
    """Bytes that are not UTF-8 are refused, never decoded with U+FFFD in their place."""
    assert json.dumps({"b": "café".encode()}, default=codec.json_default) == '{"b": "caf\\u00e9"}'
    with pytest.raises(codec.NotJsonValue, match=r"bytes that are not UTF-8 text \(5 bytes\)"):
        json.dumps([b"\x00\xffPNG"], default=codec.json_default)


# An int of more digits than Python writes as text (sys.get_int_max_str_digits(): 4300).
_LONG_INT = int("9" * 4000) * 10**1000


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("nan"), "a number that is NaN or an infinity, which JSON cannot carry"),
        ([float("-inf")], "a number that is NaN or an infinity, which JSON cannot carry"),
        (b"\xff", "bytes that are not UTF-8 text (1 bytes)"),
        ({b"key": 1}, "a map key that is not text"),
        pytest.param(_LONG_INT, "an integer of more than 4300 digits", id="long-int"),
    ],
)
def test_not_json_reason_names_the_cause(value: object, reason: str) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        json.dumps(value, default=codec.json_default, allow_nan=False)
    assert codec.not_json_reason(info.value).startswith(reason)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("null", "null"),
        ("[1]", "array"),
        ('"s"', "string"),
        ("1", "number"),
        ("1.5", "number"),
        ("true", "boolean"),
        ("{}", "object"),
    ],
)
def test_json_type_names_the_json_type(text: str, name: str) -> None:
    assert codec.json_type(codec.parse_json(text)) == name


def test_json_default_covers_the_same_types() -> None:
    value = {"m": Money(Decimal("1.5"), "EUR"), "u": uuid.UUID(int=1), "d": dt.date(2026, 1, 1)}
    assert json.loads(json.dumps(value, default=codec.json_default)) == {
        "m": {"amount": "1.5", "currency": "EUR"},
        "u": "00000000-0000-0000-0000-000000000001",
        "d": "2026-01-01",
    }


@pytest.mark.parametrize(
    "text",
    [
        r'{"a": "\ud800"}',
        r'["x\uDC00y"]',  # a low half alone, any case
        r'{"\udbff": 1}',  # in a key
        r'"\ud83d"',  # a high half at the end
        r'"\ude00\ud83d"',  # a pair's halves in the wrong order
        "[" * 500 + r'"\ud800"' + "]" * 500,  # deep: searched without recursion
    ],
)
def test_parse_json_refuses_a_lone_surrogate(text: str) -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        codec.parse_json(text.encode())
    with pytest.raises(ValueError, match="lone surrogate"):
        codec.parse_json(text)
    # ... unless told to let it through (an upstream's answer, relayed as it is).
    assert codec.parse_json(text, lone_surrogates=True) == json.loads(text)


def test_parse_json_reads_surrogate_pairs_and_escaped_backslashes() -> None:
    assert codec.parse_json(rb'{"a": "\ud83d\ude00", "\uD83D\uDE00": 1}') == {
        "a": "\U0001f600",
        "\U0001f600": 1,
    }
    assert codec.parse_json(rb'["\\ud800", "caf\u00e9"]') == ["\\ud800", "café"]
    with pytest.raises(ValueError, match="lone surrogate"):
        codec.parse_json(rb'["\ud83d\ude00", "\\\ud800"]')  # an escaped backslash, then one


@pytest.mark.parametrize("text", ["1e400", "-1e400", '{"id": 1E+400}', "[0.5, -2.5e999]"])
def test_parse_json_refuses_a_number_too_large_for_a_double(text: str) -> None:
    # Python reads these as infinity, which would go out as `Infinity`: not JSON.
    with pytest.raises(ValueError, match="too large for a double"):
        codec.parse_json(text)
    with pytest.raises(ValueError, match="too large for a double"):
        codec.parse_json(text, lone_surrogates=True)
    # the largest doubles, an underflow (a zero) and a long integer are numbers JSON holds
    assert codec.parse_json("[1e308, -1.5e-400, 2.5, 12345678901234567890123]") == [
        1e308,
        -0.0,
        2.5,
        12345678901234567890123,
    ]
