"""The policy CLI (`python -m common.policy`), run as a subprocess against a real Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.policy import PolicyStore, validate_document
from tests.common.policy_fixtures import nlp, store_fixture  # noqa: F401 (a fixture)
from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(60)


# -- the CLI ----------------------------------------------------------------------------


def _cli(redis_url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "common.policy", *args],
        env={"REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


async def test_cli(store: PolicyStore, redis_url: str, tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(nlp(strategy="least_conn", version_weights={"v2": 1})))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"services": {"nlp": {"strategy": "fastest", "retries": 9}}}))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _cli(redis_url, *args)

    checked = await asyncio.to_thread(run, "validate", str(good))
    assert checked.returncode == 0, checked.stderr
    assert "valid" in checked.stdout
    refused = await asyncio.to_thread(run, "validate", str(bad))
    assert refused.returncode != 0
    assert "services.nlp.strategy" in refused.stderr and "services.nlp.retries" in refused.stderr

    stored = await asyncio.to_thread(run, "put", str(good), "--expected-version", "0")
    assert stored.returncode == 0, stored.stderr
    assert "version 1" in stored.stdout
    assert (await store.get()).services["nlp"].strategy == "least_conn"

    not_stored = await asyncio.to_thread(run, "put", str(bad))
    assert not_stored.returncode != 0 and "services.nlp.retries" in not_stored.stderr
    conflict = await asyncio.to_thread(run, "put", str(good), "--expected-version", "0")
    assert conflict.returncode != 0 and "version 1" in conflict.stderr
    assert (await store.stamp())[0] == 1

    got = await asyncio.to_thread(run, "get")
    assert got.returncode == 0, got.stderr
    assert validate_document(json.loads(got.stdout)) == await store.get()

    history = await asyncio.to_thread(run, "history", "--json")
    assert history.returncode == 0, history.stderr
    entries = [json.loads(line) for line in history.stdout.splitlines()]
    assert len(entries) == 1 and entries[0]["actor"].startswith("cli:")
    assert entries[0]["changes"] == ["limits.login", "limits.register", "services.nlp"]
    table = await asyncio.to_thread(run, "history", "--limit", "5")
    assert "cli:" in table.stdout and "services.nlp" in table.stdout

    missing = await asyncio.to_thread(run, "validate", str(tmp_path / "nope.json"))
    assert missing.returncode != 0 and "cannot read" in missing.stderr
    assert (await asyncio.to_thread(run, "frobnicate")).returncode == 2
