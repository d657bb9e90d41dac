"""The JSON log line's own keys (`common.log`): `service` is the process that wrote the
line, whatever the line's fields say, so logs queried by service find every line of it.
Merged over it, a line's `"service": "echo"` (the service the line is about) made the
gateway's line read as echo's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(20)

# A process set up as the gateway's: a line about `echo` of its own (an instance
# ejected), and lines whose fields are named as the record's own keys.
_SCRIPT = textwrap.dedent(
    """
    import logging
    from common.balancing._health import HealthBook
    from common.log import request_id_var, setup_logging

    setup_logging("webapi")
    HealthBook().failed("echo", "echo-1", fatal=True)
    log = logging.getLogger("test")
    log.warning("collides", extra={"fields": {"service": "echo", "level": "x", "msg": "y",
                                              "ts": 1, "logger": "z", "exc": "e", "n": 1}})
    request_id_var.set("req-1")
    log.warning("collides in a request", extra={"fields": {"request_id": "forged"}})
    """
)


def _lines() -> dict[str, dict[str, Any]]:
    """The script's log lines by message."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          timeout=15, check=True)  # fmt: skip
    records = [json.loads(line) for line in done.stderr.splitlines()]
    return {record["msg"]: record for record in records}


def test_the_writer_is_the_service_and_a_colliding_field_is_kept_aside() -> None:
    lines = _lines()
    ejected = lines["upstream ejected"]
    assert ejected["service"] == "webapi"
    assert ejected["target_service"] == "echo" and ejected["instance"] == "echo-1"
    collides = lines["collides"]
    assert {k: collides[k] for k in ("service", "level", "logger")} == {
        "service": "webapi", "level": "warning", "logger": "test"}  # fmt: skip
    assert "exc" not in collides and isinstance(collides["ts"], str)
    assert {k: v for k, v in collides.items() if k.endswith("_field")} == {
        "service_field": "echo", "level_field": "x", "msg_field": "y", "ts_field": 1,
        "logger_field": "z", "exc_field": "e"}  # fmt: skip
    assert collides["n"] == 1
    in_request = lines["collides in a request"]
    assert in_request["request_id"] == "req-1" and in_request["request_id_field"] == "forged"
