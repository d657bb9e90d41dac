"""`/ws/proxy/<service>/<path>` and the `/ws/stream` envelope mode, through real processes:
a websocket service and upstream WebSocket servers registered by heartbeat."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter

import pytest
import websockets

from tests.helpers import wait_for_async
from tests.support.policy import update_service
from tests.support.registry import dead_instances
from tests.support.ws_relay import hashed_pair, one_instance
from tests.websocket.conftest import (
    Backends,
    WsServer,
    recv_json,
    wait_reachable,
    wait_upstream_closed,
    whoami,
)

pytestmark = pytest.mark.timeout(120)


async def test_text_and_binary_frames_pass_both_ways(ws_server: WsServer, backends: Backends):
    await one_instance(ws_server, backends)
    async with ws_server.connect(f"/ws/proxy/{backends.service}/echo/deep?x=1") as ws:
        await ws.send("whoami")
        assert await recv_json(ws) == {"instance": "a", "path": "/echo/deep?x=1"}
        for i in range(50):
            await ws.send(f"text {i}")
            assert await ws.recv() == f"text {i}"
        payload = bytes(range(256)) * 100
        await ws.send(payload)
        echoed = await ws.recv()
        assert isinstance(echoed, bytes) and echoed == payload


async def test_upstream_close_code_and_reason_reach_the_client(ws_server, backends):
    await one_instance(ws_server, backends)
    async with ws_server.connect(f"/ws/proxy/{backends.service}/echo") as ws:
        await ws.send("close 4001 see you")
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "see you")


async def test_client_close_code_and_reason_reach_the_upstream(ws_server, backends):
    await one_instance(ws_server, backends)
    async with ws_server.connect(f"/ws/proxy/{backends.service}/echo") as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.close(4002, "client done")

    await wait_upstream_closed(ws_server, backends.service, [4002, "client done"])


async def test_upstream_death_mid_stream_closes_the_client_1014(ws_server, backends):
    await one_instance(ws_server, backends)
    async with ws_server.connect(f"/ws/proxy/{backends.service}/echo") as ws:
        await ws.send("still there?")
        assert await ws.recv() == "still there?"
        await ws.send("die")  # the upstream process exits without a close frame
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1014
    assert info.value.rcvd.reason == "upstream connection lost"


async def test_connect_failure_fails_over_to_another_instance(
    ws_server: WsServer, backends: Backends
) -> None:
    backends.start("alive")
    await wait_reachable(ws_server, backends.service, {"alive"})
    # A registered instance where nothing listens: every connect to it fails.
    async with dead_instances(backends.redis_url, backends.service, 1, kind="ws"):
        reached = Counter([await whoami(ws_server, backends.service) for _ in range(10)])
        assert reached == {"alive": 10}  # round robin tried "dead" too: the client never saw it


async def test_no_reachable_instance_closes_1014_with_the_reason(ws_server: WsServer) -> None:
    service = f"gone{uuid.uuid4().hex[:6]}"
    async with dead_instances(ws_server.redis_url, service, 2, kind="ws"):
        async with ws_server.connect(f"/ws/proxy/{service}/echo") as ws:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1014
        assert info.value.rcvd.reason.startswith("upstream unavailable")


async def test_a_relay_to_an_rpc_service_says_it_is_one(ws_server: WsServer) -> None:
    """An RPC service's instances are live but are no WebSocket upstreams: the close's
    reason says what it is, not "no live instance"."""
    service = f"rpcsvc{uuid.uuid4().hex[:6]}"
    async with (
        dead_instances(ws_server.redis_url, service, 1, kind="rpc"),
        ws_server.connect(f"/ws/proxy/{service}/echo") as ws,
    ):
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1014
    assert info.value.rcvd.reason == (
        f"upstream unavailable: {service}: an RPC service: call it with JSON-RPC on /ws"
    )


async def test_failover_stops_when_the_services_retry_budget_is_spent(ws_server: WsServer) -> None:
    """Four dead instances, four attempts a connection, a budget of one retry (no share
    per connection, no minimum rate): the first connection tries two instances, the
    next two only their first, then none is left; without the budget the first would
    try all four."""
    service = f"wsbudget{uuid.uuid4().hex[:6]}"
    doc = await update_service(ws_server.redis_url, service, retries=3,
                               retry_budget={"ratio": 0.0, "min_per_second": 0.0})  # fmt: skip
    await wait_for_async(lambda: ws_server.health()["policy_version"] >= doc.version, timeout=10)
    reasons = []
    async with dead_instances(ws_server.redis_url, service, 4, kind="ws"):
        for _ in range(4):
            async with ws_server.connect(f"/ws/proxy/{service}/echo") as ws:
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1014
            reasons.append(info.value.rcvd.reason)
    unavailable = f"upstream unavailable: {service}: "
    spent = unavailable + "retry budget exhausted after ConnectionRefusedError"
    refused = unavailable + "ConnectionRefusedError"  # (the last instance: no retry to refuse)
    assert [reason[: len(spent)] for reason in reasons[:2]] == [spent, spent], reasons
    assert reasons[2].startswith(refused), reasons
    assert reasons[3] == unavailable + "no live instance"


async def test_round_robin_over_ws_and_http_kinds(ws_server: WsServer, backends: Backends):
    backends.start("a", kind="ws")
    backends.start("b", kind="http")  # the original dispatcher's heartbeat registers "http"
    await wait_reachable(ws_server, backends.service, {"a", "b"})
    reached = Counter([await whoami(ws_server, backends.service) for _ in range(10)])
    assert reached == {"a": 5, "b": 5}


async def test_hash_on_a_cookie_keeps_a_browser_on_one_instance(
    ws_server: WsServer, backends: Backends
) -> None:
    service = await hashed_pair(ws_server, backends, hash_on="cookie:session")

    async def owners(session: str) -> set[str | None]:
        cookie = {"Cookie": f"theme=dark; session={session}"}
        return {await whoami(ws_server, service, headers=cookie) for _ in range(4)}

    sessions = [await owners(f"s{i}") for i in range(12)]
    assert all(len(owner) == 1 for owner in sessions), sessions
    assert {name for owner in sessions for name in owner} == {"a", "b"}  # spread, not one


async def _old_and_new(ws_server: WsServer, backends: Backends) -> None:
    """Instance `old` at version 0 and `new` at v2, both reachable through the relay."""
    backends.start("old")
    backends.start("new", version="v2")
    await wait_reachable(ws_server, backends.service, {"old", "new"})


async def test_live_policy_version_weights_pick_the_upstream_version(
    ws_server: WsServer, backends: Backends
) -> None:
    await _old_and_new(ws_server, backends)
    await update_service(backends.redis_url, backends.service, version_weights={"v2": 100})
    await wait_for_async(lambda: _reaches_only(ws_server, backends.service, "new"), timeout=10)
    await update_service(backends.redis_url, backends.service, version_weights={"0": 1})
    await wait_for_async(lambda: _reaches_only(ws_server, backends.service, "old"), timeout=10)


async def test_x_service_version_picks_the_upstream_version(
    ws_server: WsServer, backends: Backends
) -> None:
    await _old_and_new(ws_server, backends)
    for version, name in (("v2", "new"), ("0", "old")):
        named = {"X-Service-Version": version}
        assert {await whoami(ws_server, backends.service, headers=named) for _ in range(4)} == {
            name
        }
    # A version nothing serves: closed with 1014 and the reason, as for a dead service.
    async with ws_server.connect(
        f"/ws/proxy/{backends.service}/echo",
        additional_headers={**ws_server.bearer(), "X-Service-Version": "v9"},
    ) as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1014
    assert "upstream unavailable" in info.value.rcvd.reason


async def _reaches_only(server: WsServer, service: str, name: str) -> bool:
    return {await whoami(server, service) for _ in range(6)} == {name}


async def test_least_time_learns_a_relays_connect_time_not_its_lifetime(
    ws_server: WsServer, backends: Backends
) -> None:
    """A relayed connection held open for seconds must not make its instance look slow.
    `heavy` (weight 100) wins least_time while its latency is its connect time; had it
    learnt the held connection's 2.5 s, 25 ms per unit of weight would lose to `light`'s
    few ms of connect time on every new connection."""
    await update_service(backends.redis_url, backends.service, strategy="least_time")
    backends.start("heavy", weight=100)
    backends.start("light")
    await wait_reachable(ws_server, backends.service, {"heavy", "light"})
    async with ws_server.connect(f"/ws/proxy/{backends.service}/echo") as held:
        await held.send("whoami")
        assert json.loads(await held.recv())["instance"] == "heavy"
        await asyncio.sleep(2.5)
    await asyncio.sleep(0.3)  # the service sees the close and reports the connection
    reached = Counter([await whoami(ws_server, backends.service) for _ in range(6)])
    assert reached["heavy"] >= 5, reached


async def test_oversized_relayed_frame_closes_1009(ws_server: WsServer, backends: Backends):
    await one_instance(ws_server, backends)
    async with ws_server.connect(f"/ws/proxy/{backends.service}/echo", max_size=None) as ws:
        await ws.send("x" * (256 * 1024))
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


# --- envelope mode -------------------------------------------------------------------------


async def stream(ws, request: dict[str, object]) -> list[dict[str, object]]:
    """Send one envelope request; the frames up to the one that ends the stream."""
    await ws.send(json.dumps(request))
    frames = []
    while True:
        frame = await recv_json(ws)
        frames.append(frame)
        if frame["flag"] == 1 or frame["ret"] != 0:
            return frames


async def test_envelope_stream_relays_frames_until_flag_1(ws_server, backends):
    await one_instance(ws_server, backends)
    async with ws_server.connect("/ws/stream") as ws:
        frames = await stream(ws, {"service_name": backends.service, "frames": 3, "text": "hi"})
        assert frames == [
            {"ret": 0, "flag": 0, "result": "a:0"},
            {"ret": 0, "flag": 0, "result": "a:1"},
            {"ret": 0, "flag": 0, "result": "a:2"},
            {"ret": 0, "flag": 1, "result": "done"},
        ]
        # the connection serves the next request
        assert len(await stream(ws, {"service_name": backends.service, "frames": 1})) == 2


async def test_envelope_service_tag_picks_the_version(ws_server, backends):
    backends.start("v1", version="v1")
    backends.start("v2", version="v2")
    await wait_reachable(ws_server, backends.service, {"v1", "v2"})
    async with ws_server.connect("/ws/stream") as ws:
        for _ in range(4):
            frames = await stream(ws, {"service_name": f"{backends.service}_v2", "frames": 1})
            assert frames[0]["result"] == "v2:0"


async def test_envelope_errors(ws_server: WsServer, backends: Backends) -> None:
    await one_instance(ws_server, backends)
    async with ws_server.connect("/ws/stream") as ws:
        await ws.send("{not json")
        assert await recv_json(ws) == {"ret": 1, "flag": 1, "result": "Invalid JSON format"}
        await ws.send(json.dumps(["a", "list"]))
        assert await recv_json(ws) == {"ret": 1, "flag": 1, "result": "Invalid JSON format"}
        await ws.send(json.dumps({"service_name": "no_such_model"}))
        assert await recv_json(ws) == {"ret": 1, "flag": 1, "result": "model not support"}
        # ret != 0 from the upstream ends that stream with its error
        assert await stream(ws, {"service_name": backends.service, "fail": True}) == [
            {"ret": 2, "flag": 0, "result": "boom"}
        ]
        # and the connection still serves requests
        assert (await stream(ws, {"service_name": backends.service, "frames": 0}))[-1]["flag"] == 1


async def test_envelope_upstream_death_mid_stream(ws_server: WsServer, backends: Backends):
    await one_instance(ws_server, backends)
    async with ws_server.connect("/ws/stream") as ws:
        frames = await stream(ws, {"service_name": backends.service, "frames": 5, "die_after": 2})
    assert frames[:2] == [{"ret": 0, "flag": 0, "result": f"a:{i}"} for i in range(2)]
    assert frames[2:] == [{"ret": 1, "flag": 1, "result": "upstream connection lost"}]


async def test_drain_on_sigterm_closes_relayed_clients_1001(make_ws_server, backends):
    server = make_ws_server()
    await one_instance(server, backends)
    async with server.connect(f"/ws/proxy/{backends.service}/echo") as relayed, \
            server.connect() as client:  # fmt: skip
        await relayed.send("x")
        assert await relayed.recv() == "x"
        server.proc.send_signal(signal.SIGTERM)
        for ws in (relayed, client):
            with pytest.raises(websockets.ConnectionClosed) as info:
                await recv_json(ws, timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001


async def test_relay_and_stream_need_a_credential_with_the_service_scope(
    ws_server: WsServer, backends: Backends
) -> None:
    await one_instance(ws_server, backends)
    relay = f"/ws/proxy/{backends.service}/echo"
    for path in (relay, "/ws/stream"):
        with pytest.raises(websockets.InvalidStatus) as anonymous:
            async with ws_server.connect(path, additional_headers={}):
                pass
        assert anonymous.value.response.status_code == 401
    other = {"Authorization": f"Bearer {ws_server.token(scopes=('someone_else',))}"}
    with pytest.raises(websockets.InvalidStatus) as lacking:
        async with ws_server.connect(relay, additional_headers=other):
            pass
    assert lacking.value.response.status_code == 403
    async with ws_server.connect("/ws/stream", additional_headers=other) as ws:
        await ws.send(json.dumps({"service_name": backends.service}))
        assert await recv_json(ws) == {"ret": 1, "flag": 1, "result": "model not allowed"}
    # A browser presents its token as a subprotocol, and gets `bearer` selected.
    scoped = ws_server.token(scopes=(backends.service,))
    async with ws_server.connect(relay, additional_headers={},
                                 subprotocols=["bearer", scoped]) as ws:  # fmt: skip
        assert ws.subprotocol == "bearer"
        await ws.send("ping")
        assert await ws.recv() == "ping"


async def test_a_policy_change_keeps_open_relays(ws_server: WsServer, backends: Backends) -> None:
    await one_instance(ws_server, backends)
    async with ws_server.connect(f"/ws/proxy/{backends.service}/echo") as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        policy = await update_service(ws_server.redis_url, backends.service,
                                      strategy="random", version_weights={"0": 100})  # fmt: skip

        async def applied() -> bool:
            return bool(ws_server.health()["policy_version"] == policy.version)

        await wait_for_async(applied, timeout=5)
        await ws.send("after")
        assert await ws.recv() == "after"
