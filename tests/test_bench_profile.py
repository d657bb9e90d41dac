"""`bench.profile` sorts `perf script` samples into the parts it reports.

The samples in perf_script_sample.txt were recorded from the gateway under wrk
(`perf record -e cpu-clock --call-graph dwarf`, 2026-11-23), one per part, with their
library paths shortened. Running perf itself is not tested: the suite's machine may not
allow it, and the tool is a benchmark, not part of the product.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.profile import (
    INTERPRETED,
    KERNEL_OTHER,
    KERNEL_READS,
    KERNEL_WRITES,
    NATIVE,
    PARTS,
    WAKING,
    Sample,
    classify,
    parse_perf_script,
    run,
    shares,
    waking,
)
from bench.proxy_gateway import c_unavailable

SAMPLES = Path(__file__).with_name("perf_script_sample.txt")


@pytest.fixture
def samples() -> list[Sample]:
    with open(SAMPLES) as text:
        return list(parse_perf_script(text))


def test_frames_are_read_with_their_symbol_and_whether_kernel(samples: list[Sample]) -> None:
    assert [len(s) for s in samples] == [59, 10, 11, 16, 6]
    write = samples[0]
    assert write[0].symbol == "sock_def_readable" and write[0].kernel
    assert write[27].symbol == "__GI___libc_write" and not write[27].kernel
    assert write[-1].symbol == "[unknown]"  # where the DWARF unwinding stopped


def test_samples_fall_into_the_part_of_their_system_call_or_their_innermost_own_frame(
    samples: list[Sample],
) -> None:
    assert [classify(s) for s in samples] == [
        KERNEL_WRITES,  # a write to a socket, in the delivery to its reader
        KERNEL_READS,
        KERNEL_OTHER,  # uvloop flushing its epoll changes through io_uring
        INTERPRETED,  # the eval loop, called from compiled code
        NATIVE,  # CPython's runtime, called from libuv: no frame of ours at all
    ]
    assert [waking(s) for s in samples] == [True, False, False, False, False]


def test_shares_add_up_to_the_whole_and_count_the_wake_ups_apart(samples: list[Sample]) -> None:
    got = shares(samples + samples[3:4])  # the interpreted sample twice
    assert sum(got[p] for p in PARTS) == pytest.approx(1.0)
    assert got[INTERPRETED] == pytest.approx(2 / 6)
    assert got[WAKING] == pytest.approx(1 / 6)
    assert shares([]) == {}


def test_a_target_that_cannot_run_is_reported_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `switchboard-py` needs the default gateway to run C; with SWITCHBOARD_C=0 it would
    # profile the same path twice. It used to stop the whole run with a RuntimeError.
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed (the profile's backend)")
    monkeypatch.setenv("SWITCHBOARD_C", "0")
    assert run(["switchboard-py"], {"nginx": nginx}, 1, tmp_path) == {}
    assert f"NOT MEASURED: switchboard-py: {c_unavailable()}" in capsys.readouterr().out
