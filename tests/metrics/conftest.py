"""Fixtures for gradleak's metric tests: a torchvision-format AlexNet checkpoint made from a
random initialisation (no download), and an empty torch hub cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision

from service.metrics import backbone_filename, clear_lpips_cache


@pytest.fixture(scope="session")
def alexnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None).state_dict()


@pytest.fixture(scope="session")
def fake_weights_dir(
    tmp_path_factory: pytest.TempPathFactory, alexnet_state: dict[str, torch.Tensor]
) -> Path:
    """A directory holding alexnet-owt-7be5be79.pth as torchvision writes it (a full state dict)."""
    d = tmp_path_factory.mktemp("lpips_weights")
    torch.save(alexnet_state, d / backbone_filename("alex"))
    return d


@pytest.fixture(autouse=True)
def empty_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the torch hub cache at an empty directory, so no test sees real downloaded weights."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="session", autouse=True)
def release_lpips_networks() -> Iterator[None]:
    # networks built from the session's fake checkpoint are shared by the tests, then dropped
    yield
    clear_lpips_cache()
