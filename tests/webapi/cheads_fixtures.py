"""The fixtures of the C heads' tests (`test_c_heads.py`, `test_c_heads_gateway.py`):
the C module and a spy on it through the glue, and a fixed clock for the Python."""

from __future__ import annotations

import importlib
import importlib.util
import types
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from common.compiled import build_state
from webapi.fastpath import Parsed, head, response
from webapi.fastpath.response import WHOLE


class Spy:
    """A stand-in for the C module in the glue's `_C`: calls the C and records each of
    its answers (None: declined)."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = types.ModuleType("cheads_spy")
        self.answers: list[tuple[str, bytes | None]] = []
        for name in ("upstream_head", "client_head"):
            setattr(self.module, name, self._recording(name, getattr(module, name)))

    def _recording(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: object) -> Any:
            answer = function(*args)
            self.answers.append((name, answer))
            return answer

        return call

    def counts(self) -> Counter[tuple[str, bool]]:
        """How many heads each function built (True) and declined (False)."""
        return Counter((name, answer is not None) for name, answer in self.answers)


class Clock:
    """The `perf_counter()` that `client_head` reads (for the C and `latencies_ms`), fixed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Heads:
    """Both answers for one set of arguments: the C's (through the glue) and the Python's."""

    def __init__(self, spy: Spy, clock: Clock) -> None:
        self.spy = spy
        self.clock = clock

    def _both(self, module: types.ModuleType, call: Callable[[], bytes]) -> tuple[Any, Any]:
        module._C = None
        oracle = _outcome(call)
        module._C = self.spy.module
        self.spy.answers.clear()
        try:
            through_glue = _outcome(call)
        finally:
            module._C = None
        [(_, answer)] = self.spy.answers
        # Declined or not, the glue answers as the Python does.
        assert through_glue == oracle
        return answer, oracle

    def upstream(self, req: Parsed, ip: str = "127.0.0.9", scheme: str = "http",
                 rid: str = "rid-1") -> tuple[bytes | None, Any]:  # fmt: skip
        def call() -> bytes:
            return head.upstream_head(req, client_ip=ip, scheme=scheme, request_id=rid)

        return self._both(head, call)

    def client(self, status: int, fields: list[tuple[bytes, bytes]], **kw: Any) -> tuple[
        bytes | None, Any
    ]:  # fmt: skip
        kw = {"framing": WHOLE, "length": 7, "upstream_seconds": 0.002, "received": 999.9,
              "instance_id": "web-1", "request_id": "rid", "keep_alive": True, **kw}  # fmt: skip
        now = kw.pop("now", 1000.0)

        def call() -> bytes:
            self.clock.now = now
            return response.client_head(status, fields, **kw)

        return self._both(response, call)


def _outcome(call: Callable[[], bytes]) -> Any:
    """What `call` returns, or the type of what it raises."""
    try:
        return call()
    except Exception as exc:
        return type(exc)


@pytest.fixture(name="cheads")
def c_heads(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The C module given the Python modules' constants; the glue off (`_C` None) until
    a test sets it."""
    state = build_state()
    if not state.used:
        pytest.skip(f"the compiled build is not used: {state.reason}")
    module = importlib.import_module("webapi.fastpath._cheads")
    head.init_c(module)
    response.init_c(module)
    monkeypatch.setattr(head, "_C", None)
    monkeypatch.setattr(response, "_C", None)
    return module


@pytest.fixture(name="heads")
def both_heads(cheads: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> Heads:
    clock = Clock()
    monkeypatch.setattr(response, "perf_counter", clock)
    return Heads(Spy(cheads), clock)


def _same(answer: bytes | None, oracle: Any, *, must_answer: bool = False) -> bool:
    """Whether the C answered (its answer checked equal to the Python's)."""
    if answer is None:
        assert not must_answer, f"the C declined an ordinary head (the Python's: {oracle!r})"
        return False
    assert answer == oracle
    return True
