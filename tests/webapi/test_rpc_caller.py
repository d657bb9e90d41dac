"""The caller's identity reaches a handler taking a `Caller`: through a real gateway
(`/rpc/...`) and a real websocket service (JSON-RPC on `/ws`), onto a real worker
(`tests.support.notes_service`, the scaffold's pattern), for a user token and an API
key; never from the call's arguments; and internal calls carry none."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from common import Caller, InvalidParams, RpcClient, apikeys
from tests.helpers import ServiceProcess, issue_api_key, issue_user_token, wait_for
from tests.webapi.conftest import running_gateway
from tests.websocket.conftest import WsServer, recv_json, start_ws_server

pytestmark = pytest.mark.timeout(120)


@dataclass
class Env:
    gateway: str
    ws: WsServer
    redis_url: str


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[Env]:
    with running_gateway(redis_url) as gateway:  # creates the keyring tokens are signed with
        notes = ServiceProcess(["python", "-m", "tests.support.notes_service"],
                               env={"REDIS_URL": redis_url}, name="notes").start()  # fmt: skip
        ws = start_ws_server(redis_url)
        try:
            key = {"X-Api-Key": issue_api_key(redis_url, ["notes"])}
            wait_for(lambda: _post(gateway, "echo", {"x": 1}, key).status_code == 200, 30)
            yield Env(gateway, ws, redis_url)
        finally:
            ws.proc.stop()
            notes.stop()


def _post(gateway: str, method: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{gateway}/rpc/notes/{method}", json=body, headers=headers, timeout=5)


@dataclass
class User:
    """A user with a bearer token (scopes `*`) and an API key (scope `notes`)."""

    id: str
    name: str
    token: dict[str, str]
    key: dict[str, str]
    key_id: str


def _user(env: Env, name: str) -> User:
    user_id = f"{name}-{uuid.uuid4().hex[:8]}"
    token = issue_user_token(env.redis_url, user_id, name)
    key = issue_api_key(env.redis_url, ["notes"], user_id=user_id, name=f"{name}'s key")
    parsed = apikeys.parse_key(key)
    assert parsed is not None
    return User(user_id, name, {"Authorization": f"Bearer {token}"}, {"X-Api-Key": key},
                parsed[0])  # fmt: skip


@pytest.fixture
def alice(env: Env) -> User:
    return _user(env, "alice")


@pytest.fixture
def eve(env: Env) -> User:
    return _user(env, "eve")


@pytest.fixture
async def http(env: Env) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"{env.gateway}/rpc/notes", timeout=10) as client:
        yield client


def _as_user(user: User) -> dict[str, Any]:
    return {"subject": user.id, "kind": "user", "key_id": None, "username": user.name,
            "scopes": ["*"]}  # fmt: skip


def _as_key(user: User) -> dict[str, Any]:
    return {"subject": user.id, "kind": "api_key", "key_id": user.key_id, "username": None,
            "scopes": ["notes"]}  # fmt: skip


async def test_rpc_gives_the_handler_the_caller_of_a_token_and_of_an_api_key(
    http: httpx.AsyncClient, alice: User
) -> None:
    by_token = await http.post("/whoami", headers=alice.token)
    assert by_token.status_code == 200, by_token.text
    assert by_token.json() == {"result": _as_user(alice)}
    by_key = await http.post("/whoami", json={}, headers=alice.key)
    assert by_key.status_code == 200, by_key.text
    assert by_key.json() == {"result": _as_key(alice)}


async def _ws_call(env: Env, headers: dict[str, str], method: str, params: Any) -> Any:
    """One JSON-RPC call on a new `/ws` connection authenticated by `headers`: the answer."""
    async with env.ws.connect(additional_headers=headers) as ws:
        request = {"jsonrpc": "2.0", "id": 1, "method": f"notes.{method}", "params": params}
        await ws.send(json.dumps(request))
        return await recv_json(ws)


async def test_ws_jsonrpc_gives_the_handler_the_caller_of_a_token_and_of_an_api_key(
    env: Env, alice: User
) -> None:
    answer = await _ws_call(env, alice.token, "whoami", {})
    assert answer == {"jsonrpc": "2.0", "id": 1, "result": _as_user(alice)}
    bearer_key = {"Authorization": f"Bearer {alice.key['X-Api-Key']}"}
    answer = await _ws_call(env, bearer_key, "whoami", [])
    assert answer == {"jsonrpc": "2.0", "id": 1, "result": _as_key(alice)}


async def test_a_user_reaches_only_their_own_notes(
    env: Env, http: httpx.AsyncClient, alice: User, eve: User
) -> None:
    """The probe's IDOR, closed by the scaffold's pattern: the user is the credential's."""
    assert (await http.post("/add", json={"text": "alice's secret"}, headers=alice.token)).json()
    assert (await http.post("/get", headers=alice.key)).json() == {"result": ["alice's secret"]}
    assert (await http.post("/get", headers=eve.token)).json() == {"result": []}
    answer = await _ws_call(env, eve.token, "get", {})
    assert answer == {"jsonrpc": "2.0", "id": 1, "result": []}
    # Naming alice gets eve nowhere: the user is no argument.
    # (As the dataclass's fields, pydantic would have made it a `Caller`; the wire form too.)
    as_alice = {"subject": alice.id, "kind": "user", "scopes": ["*"]}
    wire = {"sub": alice.id, "kind": "user", "scp": ["*"]}
    for body in [{"user_id": alice.id}, {"caller": as_alice}, {"caller": wire}]:
        refused = await http.post("/get", json=body, headers=eve.token)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "invalid_params"


@pytest.mark.parametrize(
    "body", [{"caller": "alice"}, {"caller": None}, {"text": "x", "caller": {"sub": "alice"}}]
)
async def test_a_json_argument_naming_the_caller_is_refused_with_422(
    http: httpx.AsyncClient, eve: User, body: dict[str, Any]
) -> None:
    method = "add" if "text" in body else "whoami"
    refused = await http.post(f"/{method}", json=body, headers=eve.token)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_params"
    assert error["details"][0]["field"] == "caller"
    assert "not an argument" in error["message"]


async def test_ws_jsonrpc_refuses_the_caller_as_an_argument(env: Env, eve: User) -> None:
    for params in [{"caller": {"sub": "alice"}}, ["alice"]]:  # by name; by position: no slot
        answer = await _ws_call(env, eve.token, "whoami", params)
        assert answer["error"]["code"] == -32602, answer  # invalid params


async def test_an_internal_call_has_no_caller(env: Env) -> None:
    """A service calling another calls as no one: a method requiring a caller refuses it,
    clearly; one taking `Caller | None` gets None; `caller=` sends one on purpose."""
    async with RpcClient(env.redis_url) as rpc:
        with pytest.raises(InvalidParams) as refused:
            await rpc.call("notes.whoami", timeout=5)
        assert "acts for an authenticated caller and this call has none" in str(refused.value)
        assert await rpc.call("notes.maybe", 3, timeout=5) == {"limit": 3, "subject": None}
        bob = Caller("bob-1", "api_key", frozenset({"notes"}), key_id="k1")
        answer = await rpc.call("notes.maybe", limit=2, caller=bob, timeout=5)
        assert answer == {"limit": 2, "subject": "bob-1"}
        assert await rpc.call("notes.whoami", caller=bob, timeout=5) == {
            "subject": "bob-1", "kind": "api_key", "key_id": "k1", "username": None,
            "scopes": ["notes"]}  # fmt: skip
        with pytest.raises(InvalidParams, match="maybe: who: not an argument"):
            await rpc.invoke("notes.maybe", kwargs={"who": None}, caller=bob, timeout=5)


async def test_a_method_without_a_caller_parameter_is_unaffected(
    env: Env, http: httpx.AsyncClient, alice: User
) -> None:
    assert (await http.post("/echo", json={"x": 3}, headers=alice.token)).json() == {"result": 3}
    answer = await _ws_call(env, alice.key, "echo", [4])
    assert answer == {"jsonrpc": "2.0", "id": 1, "result": 4}
    async with RpcClient(env.redis_url) as rpc:
        assert await rpc.call("notes.echo", 5, timeout=5) == 5
    # `caller` is an unknown argument there, as any other (the handler has no such one).
    refused = await http.post("/echo", json={"x": 3, "caller": "x"}, headers=alice.token)
    assert refused.status_code == 422
