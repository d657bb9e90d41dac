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
    with pytest.raises(TypeError, match="cannot encode"):
        codec.packb(object())


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
