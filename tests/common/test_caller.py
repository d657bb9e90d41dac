"""`common.caller.Caller`: its wire form in the envelope, and how a handler's signature
asks for it (`common.params`). End to end (gateway, `/ws`, worker):
tests/webapi/test_rpc_caller.py."""

from __future__ import annotations

import time
from typing import Any

import pytest

from common import Caller, deadletters
from common.errors import ConfigError, InvalidParams
from common.params import MethodSpec
from common.protocol import Call

ALICE = Caller("u-alice", "user", frozenset({"*", "notes"}), username="alice")
KEY = Caller("u-bob", "api_key", frozenset({"notes.get"}), key_id="k1")


@pytest.mark.parametrize("caller", [ALICE, KEY])
def test_the_wire_form_round_trips_through_the_envelope(caller: Caller) -> None:
    call = Call("c1", "get", [], {}, time.time() + 5, "sb:inbox:x", None, who=caller.to_wire())
    decoded = Call.decode(call.encode())
    assert decoded.who is not None and Caller.from_wire(decoded.who) == caller


def test_a_call_without_a_caller_has_none_and_its_envelope_no_field() -> None:
    call = Call("c1", "get", [], {}, time.time() + 5, "sb:inbox:x", None)
    assert b"who" not in call.encode() and Call.decode(call.encode()).who is None


def test_a_task_keeps_its_caller_as_a_dead_letter() -> None:
    task = Call("t1", "get", [], {}, time.time() + 5, None, None, who=KEY.to_wire())
    record = deadletters.encode(task, {"code": "remote_error"})
    size = int(record[1:9])
    assert Call.decode(record[9 : 9 + size]).who == KEY.to_wire()


def test_a_caller_that_is_no_map_makes_the_entry_malformed() -> None:
    call = Call("c1", "get", [], {}, time.time() + 5, "sb:inbox:x", None)
    call.who = ["u-alice"]  # type: ignore[assignment]  # what no client writes
    with pytest.raises(ValueError, match="caller is not a map"):
        Call.decode(call.encode())


@pytest.mark.parametrize(
    "wire",
    [
        {"kind": "user", "scp": []},
        {"sub": 1, "kind": "user", "scp": []},
        {"sub": "u", "kind": "admin", "scp": []},
        {"sub": "u", "kind": "user", "scp": "*"},
        {"sub": "u", "kind": "user", "scp": [1]},
        {"sub": "u", "kind": "user", "scp": [["*"]]},
        {"sub": "u", "kind": "user", "scp": [], "kid": 5},
        {"sub": "u", "kind": "user", "scp": [], "user": b"alice"},
    ],
)
def test_a_malformed_caller_is_invalid_params_for_a_handler_taking_one(
    wire: dict[str, Any],
) -> None:
    async def get(caller: Caller) -> None: ...

    with pytest.raises(InvalidParams, match="the call's caller is malformed"):
        MethodSpec("notes.get", get).bind([], {}, wire)

    async def echo(x: int) -> None: ...

    assert MethodSpec("notes.echo", echo).bind([1], {}, wire) == ([1], {})  # never read


def test_the_caller_is_injected_by_name_wherever_it_sits() -> None:
    async def add(caller: Caller, text: str, pinned: bool = False, **extra: Any) -> None: ...

    spec = MethodSpec("notes.add", add)
    assert spec.describe()["params"] == ["text", "pinned", "extra"]
    expected = {"text": "t", "pinned": True, "caller": ALICE}
    assert spec.bind(["t", True], {}, ALICE.to_wire()) == ([], expected)
    assert spec.bind(["t"], {"pinned": 1}, ALICE.to_wire()) == ([], expected)
    assert spec.bind([], {"text": "t", "tag": 1}, KEY.to_wire()) == (
        [], {"text": "t", "tag": 1, "caller": KEY})  # fmt: skip
    with pytest.raises(InvalidParams, match="too many positional arguments"):
        spec.bind(["t", True, "u-alice"], {}, ALICE.to_wire())  # no slot for it by position


def test_a_caller_named_among_the_arguments_is_refused() -> None:
    async def get(limit: int = 1, *, who: Caller | None = None) -> None: ...

    spec = MethodSpec("notes.get", get)
    for who in (None, KEY.to_wire()):
        with pytest.raises(InvalidParams) as refused:
            spec.bind([], {"who": ALICE.to_wire()}, who)
        assert refused.value.details == [{"field": "who", "type": "caller_not_an_argument",
                                          "message": "not an argument: the authenticated "
                                          "caller, set by the gateway"}]  # fmt: skip
    assert spec.bind([2], {}, None) == ([], {"limit": 2, "who": None})


def test_a_required_caller_refuses_a_call_made_for_no_one() -> None:
    async def get(caller: Caller) -> None: ...

    with pytest.raises(InvalidParams, match="acts for an authenticated caller and this call has"):
        MethodSpec("notes.get", get).bind([], {}, None)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("async def f(caller: Caller | str): ...", "annotate caller `Caller` or `Caller | None`"),
        ("async def f(caller: list[Caller]): ...", "annotate caller"),
        ("async def f(caller: dict[str, Caller] | None): ...", "annotate caller"),
        ("async def f(*callers: Caller): ...", "callers \\(the caller\\) must be a named"),
        ("async def f(a, /, caller: Caller): ...", "positional-only parameters or \\*args"),
        ("async def f(caller: Caller, *rest): ...", "positional-only parameters or \\*args"),
    ],
)
def test_a_signature_that_would_let_a_client_build_a_caller_is_refused(
    source: str, message: str
) -> None:
    """Pydantic would make a `Caller` of the client's JSON for `Caller | str`."""
    namespace: dict[str, Any] = {"Caller": Caller}
    exec(source, namespace)
    with pytest.raises(ConfigError, match=message):
        MethodSpec("notes.f", namespace["f"])


def test_allows_reads_the_credentials_scopes() -> None:
    assert ALICE.allows("notes", "get") and not ALICE.allows("admin")
    assert KEY.allows("notes", "get") and not KEY.allows("notes", "add")
