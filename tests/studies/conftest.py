"""Fixtures for the study tests: a SQLite store and settings; Redis fixtures come from jobtools."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "jobs"))

from jobtools import arq_settings, redis_prefix  # noqa: F401 (shared fixtures)

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
