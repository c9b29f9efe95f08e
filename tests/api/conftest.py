"""An API on a temporary data directory, with the embedded queue running jobs in a thread with a
stand-in runner (`runner` fixture); `keys` turns API keys on and gives two tenants a key each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from apitools import StubRunner, make_app
from fastapi.testclient import TestClient

from service.jobs.keys import create_key
from service.jobs.state_sqlite import SQLiteStateStore
from service.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        redis_url=None,
        s3_endpoint=None,
        host="127.0.0.1",
        auth_required=None,
        max_upload_bytes=256 * 1024,
        max_batch_size=8,
        max_iterations=1000,
        max_restarts=4,
        max_time_limit_s=600.0,
        default_time_limit_s=300.0,
        # the quota tests set their own; the rest of the API tests send many requests quickly
        rate_read_burst=100_000,
        rate_write_burst=100_000,
        max_queued_jobs=1000,
    )


@pytest.fixture
def runner() -> StubRunner:
    return StubRunner()


@pytest.fixture
def client(settings: Settings, runner: StubRunner) -> Iterator[TestClient]:
    with TestClient(make_app(settings, runner)) as c:
        yield c


@pytest.fixture
def keys(settings: Settings) -> dict[str, str]:
    """Authorization headers of tenants 'acme' and 'other' (keys are stored before the app starts)."""
    state = SQLiteStateStore(settings.data_dir / "gradleak.db")
    try:
        return {tenant: f"Bearer {create_key(state, tenant)[0]}" for tenant in ("acme", "other")}
    finally:
        state.close()


@pytest.fixture
def auth_client(settings: Settings, runner: StubRunner, keys: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(make_app(settings.model_copy(update={"auth_required": True}), runner)) as c:
        yield c
