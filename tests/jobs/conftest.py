"""Fixtures for the job machinery: both state stores (SQLite always; Redis when a server answers at
127.0.0.1:6379, under a key prefix of its own that is deleted afterwards) and settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from jobtools import REDIS_URL, arq_settings, redis_prefix  # noqa: F401 (shared fixtures)

from service.jobs.state import StateStore
from service.jobs.state_redis import RedisStateStore
from service.jobs.state_sqlite import SQLiteStateStore
from service.settings import Settings


@pytest.fixture(params=["sqlite", "redis"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    store: StateStore
    if request.param == "sqlite":
        store = SQLiteStateStore(tmp_path / "state.db")
    else:
        prefix = request.getfixturevalue("redis_prefix")
        store = RedisStateStore.from_url(REDIS_URL, prefix=prefix)
    yield store
    store.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", redis_url=None, s3_endpoint=None)
