"""Quoting a client's input in error messages (`common.errors.quoted`, `shortened`),
and the bound on a refusal's log line (`common.http_errors.log_refusal`)."""

from __future__ import annotations

import logging

import pytest

from common.errors import SHOWN_CHARS, quoted, shortened
from common.http_errors import MAX_LOGGED_MESSAGE, log_refusal
from common.log import JsonFormatter

pytestmark = pytest.mark.timeout(10)


def test_short_values_are_quoted_as_repr_quotes_them() -> None:
    for value in ("nlp", "", "a'b", "x" * SHOWN_CHARS, None, 42, ["a"]):
        assert quoted(value) == repr(value)
    assert shortened("calc.add") == "calc.add"
    assert shortened("x" * SHOWN_CHARS) == "x" * SHOWN_CHARS


def test_long_values_are_cut_with_their_length() -> None:
    assert quoted("x" * 900_000) == f"{'x' * SHOWN_CHARS!r}... (900000 characters)"
    assert shortened("y" * 1000, 10) == "yyyyyyyyyy... (1000 characters)"
    assert quoted("\x00" * 1000, 4) == "'\\x00\\x00\\x00\\x00'... (1000 characters)"
    many = quoted(list(range(10_000)))
    assert many.startswith("[0, 1, 2") and many.endswith(" characters)")
    assert len(many) < SHOWN_CHARS + 30


def test_a_refusals_log_line_is_bounded() -> None:
    logger = logging.Logger("test-refusals")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(JsonFormatter().format(record))

    logger.addHandler(Collect())
    log_refusal(logger, "POST", "/nlp", 404, "unknown_service", "no service " + "x" * 900_000)
    log_refusal(logger, "GET", "/health", 405, "method_not_allowed", "not allowed")
    assert len(lines[0]) < MAX_LOGGED_MESSAGE + 500
    assert "(900011 characters)" in lines[0]
    assert '"message": "not allowed"' in lines[1]
