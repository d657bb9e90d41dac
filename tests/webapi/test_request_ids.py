"""Request ids (`common.request_ids.request_id_of`): the caller's when well formed, else
new ones that never repeat, in this process or in a process forked from it."""

from __future__ import annotations

import os
import re

import pytest

from common.request_ids import request_id_of

pytestmark = pytest.mark.timeout(10)


def test_a_well_formed_caller_id_is_kept_and_anything_else_replaced() -> None:
    assert request_id_of("trace-1:abc.DEF_2") == "trace-1:abc.DEF_2"
    for bad in (None, "", "has space", "x" * 129, "semi;colon", "new\nline"):
        assert re.fullmatch(r"[0-9a-f]{32}", request_id_of(bad))


def test_new_ids_are_unique_here_and_in_a_forked_child() -> None:
    ours = {request_id_of(None) for _ in range(10_000)}
    assert len(ours) == 10_000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, as one line
        os.write(write, " ".join(request_id_of(None) for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        theirs = set(pipe.read().split())
    os.waitpid(pid, 0)
    assert len(theirs) == 100 and not theirs & ours
    # Nor the ids the parent makes next (the child started from the same counter).
    assert not theirs & {request_id_of(None) for _ in range(100)}
