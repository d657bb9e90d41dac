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
