"""The original dispatcher's `POST /nlp` and `POST /ai_server/` beyond the happy path:
`service_tag` names, and the envelope when the gateway gets no answer."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import wait_for
from tests.support.registry import dead_instances
from tests.webapi.conftest import Backend, as_admin, gateway_process, running_backend

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tagged(gateway: str, redis_url: str) -> Iterator[Backend]:
    """A backend registered at version `v2`."""
    with running_backend(gateway, redis_url, version="v2") as b:
        yield b


def test_a_service_tag_name_reaches_that_version(tagged: Backend) -> None:
    nlp = as_admin.post(f"{tagged.gateway}/nlp", json={"service_name": f"{tagged.service}_v2"})
    assert nlp.status_code == 200, nlp.text
    assert nlp.json()["instance"] == f"{tagged.service}-a"
    envelope = {"server_name": f"{tagged.service}_v2", "params": {}, "data": [1]}
    ai = as_admin.post(f"{tagged.gateway}/ai_server/", json=envelope)
    assert ai.status_code == 200, ai.text
    body = ai.json()
    assert (body["status"], body["server_name"]) == (0, f"{tagged.service}_v2")
    assert body["data"]["got"] == envelope
    # The plain name still reaches every version; a tag nobody registered is unknown.
    plain = as_admin.post(f"{tagged.gateway}/nlp", json={"service_name": tagged.service})
    assert plain.status_code == 200
    other = as_admin.post(f"{tagged.gateway}/nlp", json={"service_name": f"{tagged.service}_v9"})
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "unknown_service"


def test_ai_server_answers_the_gateways_failures_in_its_envelope(
    gateway: str, redis_url: str
) -> None:
    unknown = as_admin.post(f"{gateway}/ai_server/", json={"server_name": "nobody_here"})
    assert unknown.status_code == 404
    body = unknown.json()
    assert body["server_name"] == "nobody_here" and body["status"] == 404 and body["data"] is None
    assert "nobody_here" in body["msg"] and body["duration"] >= 0
    assert body["error"]["code"] == "unknown_service"

    service = f"dead{uuid.uuid4().hex[:6]}"

    async def through_dead_instances() -> tuple[int, dict[str, object]]:
        async with dead_instances(redis_url, service, 1):
            reply = await asyncio.to_thread(
                as_admin.post, f"{gateway}/ai_server/", json={"server_name": service}
            )
            return reply.status_code, reply.json()

    status, failed = asyncio.run(through_dead_instances())
    assert status == 502
    assert failed["status"] == 502 and failed["server_name"] == service
    assert failed["error"]["code"] == "upstream_failed"  # type: ignore[index]
    # A request the gateway refuses is not an answer: the usual error only.
    bad = as_admin.post(f"{gateway}/ai_server/", json={"params": {}})
    assert bad.status_code == 400 and set(bad.json()) == {"error"}


def test_a_huge_name_is_refused_without_being_echoed_or_logged_whole(gateway: str) -> None:
    huge = "x" * 900_000
    process = gateway_process(gateway)
    before = len(process.log_records("request refused"))
    size_before = process.log_path.stat().st_size

    nlp = as_admin.post(f"{gateway}/nlp", json={"service_name": huge}, timeout=30)
    assert nlp.status_code == 404 and nlp.json()["error"]["code"] == "unknown_service"
    assert len(nlp.content) < 2000
    ai = as_admin.post(f"{gateway}/ai_server/", json={"server_name": huge}, timeout=30)
    assert ai.status_code == 404 and ai.json()["error"]["code"] == "unknown_service"
    # The envelope's `server_name` is the request's (the original dispatcher's answer
    # echoes it); the reasons beside it are short.
    body = ai.json()
    assert body["server_name"] == huge
    assert len(body["msg"]) < 200 and len(body["error"]["message"]) < 200
    assert len(ai.content) < len(huge) + 2000

    def logged() -> list[dict[str, object]]:
        return process.log_records("request refused")[before:]

    wait_for(lambda: len(logged()) >= 2, timeout=5)
    assert [r["path"] for r in logged()] == ["/nlp", "/ai_server/"]
    assert all(len(json.dumps(r)) < 2000 for r in logged())
    assert process.log_path.stat().st_size - size_before < 10_000  # nor any other line has it


def test_ai_server_relays_an_answers_lone_surrogate_escaped(backend: Backend) -> None:
    # The instance answers a string holding "\ud800": UTF-8 cannot carry it, so the
    # envelope is ASCII JSON with the escape, as the instance sent it.
    answer = r'{"a": "\ud800", "b": "caf\u00e9"}'
    envelope = {"server_name": backend.service, "params": {"answer": answer}}
    ai = as_admin.post(f"{backend.gateway}/ai_server/", json=envelope)
    assert ai.status_code == 200, ai.text
    assert rb'"data":{"a":"\ud800","b":"caf\u00e9"}' in ai.content
    assert ai.json()["data"] == {"a": "\ud800", "b": "café"}
    # A request's own lone surrogate is malformed JSON: the usual 400, no envelope.
    bad = as_admin.post(f"{backend.gateway}/ai_server/", content=r'{"server_name": "\ud800"}',
                        headers={"content-type": "application/json"})  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed_json"
