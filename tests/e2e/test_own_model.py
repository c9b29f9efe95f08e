"""The user's own model end to end: a CNN of two convolutions of different widths, defined here,
audited through the HTTP API as ONNX and through the embedded SDK as the module object itself.

Both must reconstruct the client's image well above the no-leak level: the PSNR of the best
image one could guess without the update, the flat image of the truth's own mean colour (an
oracle guess, above the attack's uniform-noise starting point and above mid-grey). A registry
model of similar size (LeNet, 10k parameters against this CNN's 18k) clears the same level under
the same budget, so the level is one the engine reaches for models it knows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import gradleak_client as gl
from gradleak_client import prepare
from gradleak_client.embedded import EmbeddedClient, EmbeddedService
from service.data.photos import load_photo
from service.models import build_model
from service.specs import DataSpec, ModelSpec

SIZE = 16
BUDGET = {"iterations": 300}
MARGIN_DB = 8.0  # measured: ONNX and module 25.0 dB, LeNet 28.3 dB, no-leak level 12.6 dB


class TwoWidthCNN(nn.Module):
    """A user's CNN that no registered architecture expresses: 12 then 24 channels."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1),
            nn.Sigmoid(),
            nn.Conv2d(12, 24, 3, padding=1, stride=2),
            nn.Sigmoid(),
        )
        self.head = nn.Linear(24 * (SIZE // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_photo("astronaut", SIZE).unsqueeze(0)


@pytest.fixture(scope="module")
def no_leak_db(images: torch.Tensor) -> float:
    flat = images.mean((2, 3), keepdim=True).expand_as(images)
    return max(psnr(flat, images), psnr(torch.full_like(images, 0.5), images))


@pytest.fixture(scope="module")
def service() -> Iterator[EmbeddedService]:
    with EmbeddedService(torch_threads=2) as svc:
        yield svc


@pytest.fixture(scope="module")
def user_model() -> TwoWidthCNN:
    torch.manual_seed(0)
    return TwoWidthCNN()


@pytest.fixture(scope="module")
def inputs(
    user_model: TwoWidthCNN, images: torch.Tensor, tmp_path_factory: pytest.TempPathFactory
) -> prepare.Inputs:
    return prepare.write_inputs(user_model, images, [3], tmp_path_factory.mktemp("own"))


def test_onnx_model_through_the_http_api(
    service: EmbeddedService, inputs: prepare.Inputs, no_leak_db: float
) -> None:
    # A plain Client: multipart uploads and JSON over the API, as against a remote server.
    with gl.Client(base_url="http://gradleak.embedded", api_key="", transport=service.transport()) as client:
        model = client.models.upload(inputs.model, image_shape=inputs.image_shape, num_classes=10)
        assert model.metadata.format == "onnx" and model.tensors == 6
        job = client.audit(**inputs.audit_kwargs(), budget=BUDGET)
    assert job.status == "succeeded", job.error
    assert job.spec is not None and job.spec["model"]["arch"] == "onnx"
    assert job.scores is not None and job.scores.mean["psnr"] > no_leak_db + MARGIN_DB


def test_the_module_object_through_the_embedded_sdk(
    service: EmbeddedService, inputs: prepare.Inputs, user_model: TwoWidthCNN, no_leak_db: float
) -> None:
    with service.client() as client:
        assert isinstance(client, EmbeddedClient)
        job = client.audit(**{**inputs.audit_kwargs(), "model": user_model}, budget=BUDGET)
    assert job.status == "succeeded", job.error
    assert job.spec is not None and job.spec["model"]["arch"] == "module"
    assert job.scores is not None and job.scores.mean["psnr"] > no_leak_db + MARGIN_DB


def test_a_registry_model_of_similar_size_clears_the_same_level(
    service: EmbeddedService, images: torch.Tensor, no_leak_db: float, tmp_path: Path
) -> None:
    lenet = build_model(ModelSpec(arch="lenet"), DataSpec(shape=(3, SIZE, SIZE)))
    assert sum(p.numel() for p in lenet.parameters()) < sum(p.numel() for p in TwoWidthCNN().parameters())
    files = prepare.write_inputs(lenet, images, [3], tmp_path, format="safetensors", arch="lenet")
    with service.client() as client:
        job = client.audit(**files.audit_kwargs(), budget=BUDGET)
    assert job.status == "succeeded", job.error
    assert job.scores is not None and job.scores.mean["psnr"] > no_leak_db + MARGIN_DB


def test_an_onnx_model_with_an_unsupported_operator_gets_a_422_naming_it(
    service: EmbeddedService, tmp_path: Path
) -> None:
    class Quantised(TwoWidthCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(torch.round(x * 8) / 8)

    path = prepare.export_onnx(Quantised(), tmp_path / "q.onnx", (3, SIZE, SIZE))
    with service.client() as client, pytest.raises(gl.UnprocessableEntityError) as e:
        client.models.upload(path, image_shape=(3, SIZE, SIZE))
    assert e.value.status == 422 and e.value.unsupported_ops == ["Round"]
    assert "Round" in str(e.value)


def test_a_module_is_never_resolved_by_a_server(service: EmbeddedService) -> None:
    # A spec that names a module key that was not handed to this process is refused, not imported.
    with (
        service.client() as client,
        pytest.raises(gl.UnprocessableEntityError, match="takes your model as ONNX"),
    ):
        client.jobs.create(
            spec={
                "model": {"arch": "module", "source": "os:system"},
                "update": {"simulate": {"images": ["astronaut"]}},
                "data": {"shape": [3, SIZE, SIZE]},
            }
        )
