"""The Flower auditor on the user's own model: an ONNX file against a live server (each round's
weights written into its initializers), or the module object through the embedded service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gradleak_client import Client, prepare
from gradleak_client.embedded import EmbeddedService
from gradleak_client.flower import FlowerAuditor
from service.models.onnx import onnx_module
from service.specs import DataSpec

SIZE = 16


def user_cnn(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm2d(6)] if batchnorm else []
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), *norm, nn.Sigmoid(), nn.Conv2d(6, 10, 3, stride=2, padding=1),
        nn.Sigmoid(), nn.Flatten(), nn.Linear(10 * 8 * 8, 10),
    )  # fmt: skip


def one_round(
    net: nn.Module,
) -> tuple[list[str], list[np.ndarray], list[np.ndarray], torch.Tensor, torch.Tensor]:
    x, y = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 4])
    before = [v.detach().numpy().copy() for v in net.state_dict().values()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
    after = [v.detach().numpy().copy() for v in net.state_dict().values()]
    return list(net.state_dict()), before, after, x, y


def audit(client: Client, names: list[str], before: Any, after: Any, x: Any, y: Any, **model: Any) -> Any:
    auditor = FlowerAuditor(
        client,
        **model,
        image_shape=(3, SIZE, SIZE),
        names=names,
        rounds=[1],
        lr=0.1,
        local_epochs=1,
        batch_size=2,
        normalization="none",
        budget={"iterations": 10},
        ground_truth=lambda _round, _config: (x, y),
        wait=True,
    )
    auditor.observe(before, after, 2, {"server_round": 1})
    return auditor.records[-1]


def test_onnx_with_weights_swaps_in_a_rounds_weights(tmp_path: Path) -> None:
    net = user_cnn(batchnorm=True)
    graph = prepare.export_onnx(net, tmp_path / "m.onnx", (3, SIZE, SIZE)).read_bytes()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)
        net[1].running_mean.add_(0.25)
    swapped = onnx_module(prepare.onnx_with_weights(graph, net.state_dict()), DataSpec(shape=(3, SIZE, SIZE)))
    for name, value in swapped.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, net.state_dict()[name])
    with pytest.raises(ValueError, match="no initializers named extra"):
        prepare.onnx_with_weights(graph, {"extra": torch.zeros(1)})


def test_an_onnx_model_is_audited_round_by_round(live_url: str, tmp_path: Path) -> None:
    net = user_cnn()
    path = prepare.export_onnx(net, tmp_path / "model.onnx", (3, SIZE, SIZE))
    names, before, after, x, y = one_round(net)
    with Client(base_url=live_url) as client:
        record = audit(client, names, before, after, x, y, model=str(path))
    assert record.status == "succeeded", record.error
    assert record.metrics is not None and record.metrics["worst_case"]["psnr"] > 0


def test_a_module_object_is_audited_by_the_embedded_service() -> None:
    net = user_cnn()
    names, before, after, x, y = one_round(net)
    with EmbeddedService(torch_threads=2) as service, service.client() as client:
        record = audit(client, names, before, after, x, y, model=net)
        assert record.status == "succeeded", record.error
        assert record.metrics is not None
        assert len(service._modules) == 1


def test_a_module_needs_the_embedded_service() -> None:
    names, before, after, x, y = one_round(user_cnn())
    record = audit(Client(base_url="http://127.0.0.1:9"), names, before, after, x, y, model=user_cnn())
    assert record.verdict == "error" and "embedded service" in (record.error or "")
    with pytest.raises(ValueError, match="not both"):
        FlowerAuditor(
            Client(base_url="http://127.0.0.1:9"), arch="lenet", model=user_cnn(), image_shape=(3, 8, 8)
        )
