"""Fixtures for the client tests: the gradleak API in this process (EmbeddedService: the real app
and runner through httpx's ASGI transport), a live uvicorn server, and one torch thread (the
attacks here are tiny; more threads only contend on a busy machine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clientkit import live_server

from gradleak_client import Client
from gradleak_client.embedded import EmbeddedService


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    with EmbeddedService(tmp_path_factory.mktemp("embedded")) as svc:
        yield svc


@pytest.fixture
def client(service: EmbeddedService) -> Iterator[Client]:
    with service.client() as c:
        yield c


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with live_server(Path(tmp_path_factory.mktemp("live"))) as url:
        yield url
