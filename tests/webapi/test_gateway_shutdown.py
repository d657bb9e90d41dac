"""SIGTERM to the gateway: requests under way are answered, and their connections
closed after them, so a keep-alive client (a load balancer) moves on at once."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from tests.helpers import issue_api_key, wait_for
from tests.support.calc_service import start_worker
from tests.support.raw_http import closed_by_peer, connect, raw_request, read_answers
from tests.webapi.conftest import gateway_process, running_gateway

pytestmark = pytest.mark.timeout(90)


def test_a_request_under_way_at_sigterm_is_its_connections_last(redis_url: str) -> None:
    key = issue_api_key(redis_url, ["*"])
    worker = start_worker(redis_url)
    try:
        with running_gateway(redis_url) as gateway:
            health = f"{gateway}/health"
            wait_for(lambda: httpx.get(health).json()["services"].get("calc", {}).get("live"),
                     timeout=30)  # fmt: skip
            headers = {"X-Api-Key": key, "Content-Type": "application/json"}
            with connect(gateway) as sock:
                body = json.dumps({"seconds": 1.5}).encode()
                sock.sendall(raw_request("POST", "/rpc/calc/sleep", headers, body))
                time.sleep(0.3)
                gateway_process(gateway).send_signal(signal.SIGTERM)
                (answer,) = read_answers(sock, 1)
                assert answer.status == 200, answer.body
                assert answer.headers["connection"] == "close"
                assert closed_by_peer(sock)  # no further request is read from it
    finally:
        worker.stop()
