"""The policy CLI (`python -m common.policy`), run as a subprocess against a real Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common import constants
from common.policy import DEFAULT_POLICY, PolicyStore, validate_document
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


async def test_cli_patch_and_the_put_that_would_remove_limits(
    store: PolicyStore, redis_url: str, tmp_path: Path
) -> None:
    """`put` of a document without `limits` is refused naming the default limits (it
    would remove them); `validate` warns; `patch` changes only what the file names."""
    change = tmp_path / "change.json"
    change.write_text(json.dumps({"services": {"nlp": {"strategy": "hash"}}}))

    checked = await asyncio.to_thread(_cli, redis_url, "validate", str(change))
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.count("warning: ") == 2 and '"limits" is missing' in checked.stderr
    refused = await asyncio.to_thread(_cli, redis_url, "put", str(change))
    assert refused.returncode == 1
    assert "limits: missing" in refused.stderr and "('login', 'register')" in refused.stderr
    assert (await store.stamp())[0] == 0

    patched = await asyncio.to_thread(_cli, redis_url, "patch", str(change),
                                      "--expected-version", "0")  # fmt: skip
    assert patched.returncode == 0, patched.stderr
    assert "version 1" in patched.stdout
    stored = await store.get()
    assert stored.services["nlp"].strategy == "hash" and stored.limits == DEFAULT_POLICY.limits
    stale = await asyncio.to_thread(_cli, redis_url, "patch", str(change),
                                    "--expected-version", "0")  # fmt: skip
    assert stale.returncode == 1 and "version 1" in stale.stderr


def _one_line_refusal(done: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr and text in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2  # argparse adds its usage line


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "99999999999999999999", "x"])
async def test_history_limit_out_of_range_is_bad_usage(
    store: PolicyStore, redis_url: str, limit: str
) -> None:
    done = await asyncio.to_thread(_cli, redis_url, "history", "--limit", limit)
    _one_line_refusal(done, 2, "--limit: must be an integer from 1 to 1000")


async def test_data_set_by_hand_is_a_one_line_refusal(
    store: PolicyStore, redis_client: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(nlp(strategy="hash")))
    await store.put(nlp(strategy="hash"), actor="t")
    await redis_client.set(constants.POLICY_DOC, "garbage{")
    got = await asyncio.to_thread(_cli, redis_url, "get")
    _one_line_refusal(got, 1, "stored policy is invalid:")
    assert "not valid JSON" in got.stderr

    await redis_client.set(constants.POLICY_VERSION, "abc")
    put = await asyncio.to_thread(_cli, redis_url, "put", str(good))
    _one_line_refusal(put, 1, "error: the stored policy version is not an integer ('abc')")
    assert len(put.stderr.strip().splitlines()) == 1

    await redis_client.xadd(constants.POLICY_AUDIT, {"version": "x", "at": "y"})
    history = await asyncio.to_thread(_cli, redis_url, "history")
    assert history.returncode == 0 and not history.stderr, history.stderr
    newest, oldest = history.stdout.splitlines()
    assert newest.split() == ["?", "?", "(no", "change)"]
    assert oldest.split()[0] == "1" and "services.nlp" in oldest
