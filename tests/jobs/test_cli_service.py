"""`gradleak keys create|list|revoke`, and `serve`/`worker` refusing configurations they cannot run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.jobs.keys import TOKEN_PREFIX, authenticate
from service.jobs.state_sqlite import SQLiteStateStore
from service.settings import get_settings


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in ("GRADLEAK_REDIS_URL", "GRADLEAK_S3_ENDPOINT", "GRADLEAK_AUTH_REQUIRED", "GRADLEAK_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GRADLEAK_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_keys_create_list_revoke(data_dir: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--name", "ci"])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert token.startswith(TOKEN_PREFIX) and "\n" not in token  # only the key on stdout, for scripts
    assert "shown only now" in created.stderr

    state = SQLiteStateStore(data_dir / "gradleak.db")
    try:
        record = authenticate(state, token)
        assert record is not None and record.tenant == "acme" and record.name == "ci"
    finally:
        state.close()

    listed = runner.invoke(app, ["keys", "list"])
    assert record.id in listed.stdout and "tenant=acme" in listed.stdout and "active" in listed.stdout
    assert token not in listed.stdout

    revoked = runner.invoke(app, ["keys", "revoke", record.id])
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    assert "revoked" in runner.invoke(app, ["keys", "list"]).stdout
    state = SQLiteStateStore(data_dir / "gradleak.db")
    try:
        assert authenticate(state, token) is None
    finally:
        state.close()


def test_keys_errors_are_one_line_and_exit_2(data_dir: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["keys", "revoke", "key_" + "0" * 32])
    assert missing.exit_code == 2 and "no API key" in missing.stderr
    bad = runner.invoke(app, ["keys", "create", "--tenant", "Not/A/Tenant"])
    assert bad.exit_code == 2 and "invalid tenant" in bad.stderr


def test_serve_refuses_to_run_without_keys_off_loopback(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADLEAK_AUTH_REQUIRED", "false")
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 2 and "refusing to serve without API keys" in result.stderr


def test_worker_needs_redis(data_dir: Path) -> None:
    result = CliRunner().invoke(app, ["worker"])
    assert result.exit_code == 2 and "GRADLEAK_REDIS_URL" in result.stderr


def test_keys_create_with_quota_overrides(data_dir: Path) -> None:
    runner = CliRunner()
    args = [
        "keys",
        "create",
        "--tenant",
        "acme",
        "--quota",
        "max_running_jobs=1",
        "--quota",
        "rate-write-per-s=0.5",
    ]
    created = runner.invoke(app, args)
    assert created.exit_code == 0, created.output
    state = SQLiteStateStore(data_dir / "gradleak.db")
    try:
        record = authenticate(state, created.stdout.strip())
        assert record is not None and record.quotas == {"max_running_jobs": 1, "rate_write_per_s": 0.5}
    finally:
        state.close()
    assert "quotas=max_running_jobs=1,rate_write_per_s=0.5" in runner.invoke(app, ["keys", "list"]).stdout
    for bad in ("max_running_jobs", "no_such_quota=1", "max_running_jobs=many", "rate_write_per_s=0"):
        refused = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--quota", bad])
        assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
