"""What a setting's environment variable may hold, and how its text is read.

A number must be finite (never nan or inf) and within the `Bounds` its field
declares (durations positive, counts at least 1; 0 only where it means something,
said in the bounds). `env` is a field's metadata (its variable and bounds); `parse`
reads a variable's text as the field's type, `ConfigError` naming the variable
when it cannot. `common.settings` declares the fields with these.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError

DAY = 86400.0


@dataclass(frozen=True, slots=True)
class Bounds:
    """The values a numeric setting takes: from `low` (excluded if `above`) to `high`.

    `zero` says what 0 means where 0 is allowed and is not just the smallest amount
    ("none", "no bound"); `unit` names the unit in the error message.
    """

    low: float
    high: float = math.inf
    above: bool = False
    zero: str = ""
    unit: str = ""

    def admits(self, value: float) -> bool:
        """Whether `value` is finite and within the bounds."""
        if not math.isfinite(value) or value > self.high:
            return False
        return value > self.low if self.above else value >= self.low

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.above:
            text = f"greater than {low}" + (f" and at most {high}" if high else "")
        elif high:
            text = f"from {low} to {high}"
        else:
            text = f"at least {low}"
        notes = [note for note in (self.unit, f"0: {self.zero}" if self.zero else "") if note]
        return f"{text} ({'; '.join(notes)})" if notes else text


def _number(value: float) -> str:
    """`value` as a bound reads: `86400`, `0.1`; "" for no bound."""
    if math.isinf(value):
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def env(name: str, bounds: Bounds | None = None) -> dict[str, Any]:
    """A field's metadata: the variable it is read from, and for a number its bounds."""
    return {"env": name, "bounds": bounds}


# 0 (any free port) is refused: a service would listen where no one can find it (`make
# run` and the health checks ask the configured port); the tests pick free ports.
PORT = Bounds(1, 65535)
COUNT = Bounds(1)
# Durations: a day is beyond any sensible timeout or interval here, and far from the
# values the event loop and Redis's millisecond expiries cannot represent.
SECONDS = Bounds(0, DAY, above=True, unit="seconds")
# Below 0.1 s a heartbeat is a busy loop on Redis, for every instance.
HEARTBEAT = Bounds(0.1, DAY, unit="seconds")
TOKEN_TTL = Bounds(1, 365 * DAY, unit="seconds")


def parse(name: str, raw: str, type_name: str) -> Any:
    """`raw`, the text of variable `name`, as a field of type `type_name` ("int",
    "float", "bool", "str", "str | None"); `ConfigError` naming the variable if it
    cannot be read as one."""
    try:
        return _PARSERS[type_name](raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not valid: {exc}") from exc


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):  # float() takes "nan" and "inf"; no setting does
        raise ValueError("expected a finite number")
    return value


_PARSERS: dict[str, Callable[[str], Any]] = {
    "bool": _bool,
    "str": str,
    "str | None": str,
    "int": int,
    "float": _float,
}
