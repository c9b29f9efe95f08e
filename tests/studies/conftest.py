"""Fixtures for the study tests: a SQLite store and settings, a Redis key prefix, a tiny study."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "jobs"))

from jobtools import REDIS_URL, redis_client

from service.jobs.state_sqlite import SQLiteStateStore
from service.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", redis_url=None, s3_endpoint=None)


@pytest.fixture
def sqlite_state(tmp_path: Path) -> Iterator[SQLiteStateStore]:
    store = SQLiteStateStore(tmp_path / "state.db")
    yield store
    store.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    client = redis_client()
    if client is None:
        pytest.skip(f"no Redis server answers at {REDIS_URL} (CI starts one)")
    prefix = f"gltest-{secrets.token_hex(6)}"
    yield prefix
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()
