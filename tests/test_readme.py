"""The README's commands send what the services accept (the quick start is the first
thing a newcomer runs: a body the auth service refuses stops them at step one)."""

from __future__ import annotations

import json
import re

import pytest

from microservices.auth.passwords import valid_password
from microservices.auth.users import USERNAME
from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(10)

# `curl ... /api/v1/auth/register -d '{...}'`, the body possibly on the next line.
_ACCOUNT_BODY = re.compile(r"/api/v1/auth/(?:register|login)[^']*?-d '(\{[^']*\})'", re.S)


def test_the_quick_start_registers_a_user_the_auth_service_accepts() -> None:
    bodies = [json.loads(b) for b in _ACCOUNT_BODY.findall((ROOT / "README.md").read_text())]
    assert len(bodies) >= 2  # register, then log in
    for body in bodies:
        assert USERNAME.fullmatch(body["username"]), body
        assert valid_password(body["password"]), body
