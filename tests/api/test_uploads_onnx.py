"""A model uploaded as ONNX: accepted when the attacks can differentiate it twice, its update
checked against its initializer names, jobs built from it; refusals name what is wrong."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from apitools import StubRunner, is_problem, make_app, post_file
from fastapi.testclient import TestClient
from torch import nn

from gradleak_client import prepare
from service.settings import Settings

SHAPE = (3, 16, 16)
ONNX_META = {"format": "onnx", "image_shape": list(SHAPE), "num_classes": 10}


class TwoWidthCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.sigmoid(self.conv2(torch.sigmoid(self.conv1(x)))).flatten(1))


@pytest.fixture
def files(tmp_path: Path) -> Any:
    torch.manual_seed(0)
    return prepare.write_inputs(TwoWidthCNN(), torch.rand(1, *SHAPE), [2], tmp_path, normalization="none")


def post(client: TestClient, path: str, data: bytes, meta: dict[str, Any]) -> Any:
    return client.post(path, files={"file": ("f", data)}, data={"metadata": json.dumps(meta)})


def test_an_onnx_model_its_update_and_a_job(client: TestClient, files: Any, settings: Settings) -> None:
    model = post(client, "/v1/models", files.model.read_bytes(), ONNX_META)
    assert model.status_code == 201, model.text
    body = model.json()
    assert body["metadata"]["format"] == "onnx" and body["metadata"]["arch"] is None and body["tensors"] == 6
    assert [p.name for p in (settings.data_dir / "artifacts").rglob("data.*")] == ["data.onnx"]
    update = post(
        client,
        "/v1/updates",
        files.update.read_bytes(),
        {"model_id": body["id"], "kind": "gradient", "normalization": "none"},
    )
    assert update.status_code == 201, update.text
    job = client.post("/v1/jobs", json={"update_id": update.json()["id"], "budget": {"iterations": 5}})
    assert job.status_code == 202, job.text
    assert job.json()["spec"]["model"] == {
        "arch": "onnx",
        "knobs": {},
        "weights": None,
        "init_seed": 0,
        "source": body["id"],
    }


def test_an_update_named_otherwise_lists_the_mismatches(client: TestClient, files: Any) -> None:
    from safetensors.torch import load_file, save

    model_id = post(client, "/v1/models", files.model.read_bytes(), ONNX_META).json()["id"]
    renamed = {f"model.{k}": v for k, v in load_file(files.update).items()}
    body = is_problem(
        post(client, "/v1/updates", save(renamed), {"model_id": model_id, "kind": "gradient"}), 422
    )
    assert "missing: conv1.weight" in body["mismatches"]
    assert "unexpected: model.conv1.weight" in body["mismatches"]


def test_an_unsupported_operator_is_a_422_naming_it(
    client: TestClient, tmp_path: Path, settings: Settings
) -> None:
    class WithArgMax(TwoWidthCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = super().forward(x)
            return logits + logits.argmax(1, keepdim=True).float()

    onnx = prepare.export_onnx(WithArgMax(), tmp_path / "m.onnx", SHAPE).read_bytes()
    body = is_problem(post(client, "/v1/models", onnx, ONNX_META), 422)
    assert body["unsupported_ops"] == ["ArgMax", "Cast"] or "ArgMax" in body["unsupported_ops"]
    assert "ArgMax" in body["detail"]
    assert not (settings.data_dir / "artifacts").exists() or not list(
        (settings.data_dir / "artifacts").rglob("data.*")
    )


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({**ONNX_META, "arch": "lenet"}, "leave out arch"),
        ({**ONNX_META, "format": "pickle"}, "format"),
    ],
)
def test_onnx_metadata_is_checked(client: TestClient, files: Any, meta: dict[str, Any], message: str) -> None:
    body = is_problem(post(client, "/v1/models", files.model.read_bytes(), meta), 422)
    assert message in json.dumps(body)


def test_safetensors_sent_as_onnx_and_onnx_sent_as_safetensors(client: TestClient, files: Any) -> None:
    body = is_problem(post(client, "/v1/models", files.update.read_bytes(), ONNX_META), 422)
    assert "not an ONNX model" in body["detail"]
    weights_meta = {"arch": "lenet", "image_shape": list(SHAPE), "num_classes": 10}
    body = is_problem(post(client, "/v1/models", files.model.read_bytes(), weights_meta), 415)
    assert "ONNX" in body["detail"]


def test_a_module_named_over_http_is_refused(client: TestClient) -> None:
    spec = {
        "model": {"arch": "module", "source": "os:system"},
        "update": {"simulate": {"images": ["astronaut"]}},
        "data": {"shape": list(SHAPE)},
    }
    body = is_problem(client.post("/v1/jobs", json={"spec": spec}), 422)
    assert "takes your model as ONNX" in body["detail"]
    upload = {"arch": "module", "source": "os:system", "image_shape": list(SHAPE)}
    body = is_problem(post_file(client, "/v1/models", b"{}", upload), 422)
    assert "takes your model as ONNX" in body["detail"]


@pytest.mark.parametrize(
    ("limits", "status", "message"),
    [
        ({"max_onnx_bytes": 1000}, 422, "limit of 1000 bytes"),
        ({"max_onnx_nodes": 3}, 422, "limit is 3"),
    ],
)
def test_the_conversion_is_bounded(
    settings: Settings, files: Any, limits: dict[str, Any], status: int, message: str
) -> None:
    with TestClient(make_app(settings.model_copy(update=limits), StubRunner())) as client:
        body = is_problem(post(client, "/v1/models", files.model.read_bytes(), ONNX_META), status)
    assert message in body["detail"]


def test_a_conversion_that_outlives_its_deadline_is_refused(
    settings: Settings, files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.models.onnx as onnx_models

    convert = onnx_models.onnx_module

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)  # a conversion slower than the deadline, whatever the machine's speed
        return convert(*args, **kwargs)

    monkeypatch.setattr(onnx_models, "onnx_module", slow)
    with TestClient(
        make_app(settings.model_copy(update={"onnx_check_timeout_s": 0.05}), StubRunner())
    ) as client:
        body = is_problem(post(client, "/v1/models", files.model.read_bytes(), ONNX_META), 422)
    assert "took longer than 0.05 s" in body["detail"]
