"""Uploads: what is accepted, and every kind of bad input refused with a clear 4xx, nothing stored."""

from __future__ import annotations

import asyncio
import io
import json
import math
import pickle
import struct
import zipfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from apitools import MODEL_META, is_problem, lenet_files, post_file, upload_all
from fastapi.testclient import TestClient

from api.middleware import BodyLimit, BodyLimitMiddleware
from service.settings import Settings


def stored_files(settings: Settings) -> list[Path]:
    root = settings.data_dir / "artifacts"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def safetensors_bytes(entries: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A safetensors file written by hand, so that tests can make any header they like."""
    header: dict[str, Any] = {}
    offset, data = 0, b""
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_model_upload_get_and_delete(client: TestClient, settings: Settings) -> None:
    created = post_file(client, "/v1/models", lenet_files()["weights"], MODEL_META)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"].startswith("mdl_") and created.headers["location"] == f"/v1/models/{body['id']}"
    assert body["metadata"]["arch"] == "lenet" and body["tensors"] == 8 and body["size"] > 0
    assert client.get(f"/v1/models/{body['id']}").json() == body
    assert len(stored_files(settings)) == 1

    assert client.delete(f"/v1/models/{body['id']}").status_code == 204
    is_problem(client.get(f"/v1/models/{body['id']}"), 404)
    assert stored_files(settings) == []


def test_update_and_ground_truth_uploads(client: TestClient) -> None:
    ids = upload_all(client)
    update = client.get(f"/v1/updates/{ids['update']}").json()
    assert update["metadata"]["model_id"] == ids["model"] and update["metadata"]["kind"] == "gradient"
    truth = client.get(f"/v1/ground-truth/{ids['truth']}").json()
    assert truth["metadata"] == {
        "num_images": 1,
        "image_shape": [3, 16, 16],
        "has_labels": True,
        "purpose": "scoring",
    }
    is_problem(client.get(f"/v1/updates/{ids['model']}"), 404)  # a model id is not an update id


def _torch_save_bytes() -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def _npz_bytes() -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, w=np.zeros(2))
    return buffer.getvalue()


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"weights")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda: pickle.dumps({"w": [1.0, 2.0]}), "pickle"),
        (_torch_save_bytes, "torch.save"),
        (_npz_bytes, "numpy"),
        (_zip_bytes, "zip"),
    ],
)
def test_other_formats_are_refused_with_415(
    client: TestClient, settings: Settings, make: Any, what: str
) -> None:
    body = is_problem(post_file(client, "/v1/models", make(), MODEL_META), 415)
    assert what in body["detail"] and "safetensors" in body["detail"]
    assert stored_files(settings) == []


_F32_ONE = struct.pack("<f", 1.0)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b'\x05\x00\x00\x00\x00\x00\x00\x00{"a"', "truncated"),
        (struct.pack("<Q", 1 << 40) + b"{}", "exceeds"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (safetensors_bytes({"x": ("I32", [1], b"\x00" * 4)}), "dtype I32"),
        (safetensors_bytes({"x": ("F32", [2], _F32_ONE)}), "span"),
        (safetensors_bytes({"x": ("F32", [1], struct.pack("<f", math.nan))}), "NaN or Inf"),
        (safetensors_bytes({"x": ("F32", [1], struct.pack("<f", math.inf))}), "NaN or Inf"),
    ],
)
def test_corrupt_or_unacceptable_safetensors_are_refused_with_422(
    client: TestClient, settings: Settings, data: bytes, fragment: str
) -> None:
    body = is_problem(post_file(client, "/v1/models", data, MODEL_META), 422)
    assert fragment in body["detail"]
    assert stored_files(settings) == []


def test_weights_that_do_not_fit_the_architecture_list_the_mismatches(
    client: TestClient, settings: Settings
) -> None:
    body = is_problem(
        post_file(client, "/v1/models", lenet_files()["weights"], {**MODEL_META, "num_classes": 7}), 422
    )
    assert body["code"] == "shape_mismatch"
    assert any("expected [7" in m for m in body["mismatches"])
    extra = safetensors_bytes({"x": ("F32", [1], _F32_ONE)})
    body = is_problem(post_file(client, "/v1/models", extra, MODEL_META), 422)
    assert "missing: " in body["detail"] and len(body["mismatches"]) <= 10
    assert stored_files(settings) == []


def test_unknown_architecture_lists_the_valid_ones(client: TestClient) -> None:
    body = is_problem(
        post_file(client, "/v1/models", lenet_files()["weights"], {**MODEL_META, "arch": "gpt"}), 422
    )
    assert body["code"] == "unknown_name" and "lenet" in body["valid"] and "resnet18" in body["valid"]


@pytest.mark.parametrize(
    ("metadata", "loc"),
    [
        ("{not json", ["body", "metadata"]),
        ({**MODEL_META, "image_shape": [3, 1024, 1024]}, ["body", "metadata"]),
        ({**MODEL_META, "colour": "blue"}, ["body", "metadata", "colour"]),
        # no arch: safetensors weights need one (an ONNX model says format onnx)
        ({"image_shape": [3, 16, 16]}, ["body", "metadata"]),
    ],
)
def test_bad_metadata_is_a_validation_problem(client: TestClient, metadata: Any, loc: list[str]) -> None:
    body = is_problem(post_file(client, "/v1/models", lenet_files()["weights"], metadata), 422)
    assert body["code"] == "validation" and body["errors"][0]["loc"][: len(loc)] == loc


def test_unknown_knob_is_refused(client: TestClient) -> None:
    body = is_problem(
        post_file(client, "/v1/models", lenet_files()["weights"], {**MODEL_META, "knobs": {"depth": 3}}), 422
    )
    assert "unknown knob" in body["detail"]


def test_missing_file_part_is_a_validation_problem(client: TestClient) -> None:
    body = is_problem(client.post("/v1/models", data={"metadata": json.dumps(MODEL_META)}), 422)
    assert any(e["loc"][-1] == "file" for e in body["errors"])


def test_update_checks(client: TestClient, settings: Settings) -> None:
    model = post_file(client, "/v1/models", lenet_files()["weights"], MODEL_META).json()["id"]
    gradient = lenet_files()["gradient"]
    base = {"model_id": model, "kind": "gradient"}
    is_problem(post_file(client, "/v1/updates", gradient, {**base, "model_id": "mdl_" + "0" * 32}), 404)
    body = is_problem(post_file(client, "/v1/updates", gradient, {**base, "num_images": 9}), 422)
    assert "limit is 8" in body["detail"]
    body = is_problem(post_file(client, "/v1/updates", gradient, {**base, "labels": [12]}), 422)
    assert "labels" in body["detail"]
    lonely = safetensors_bytes({"conv.0.weight": ("F32", [1], _F32_ONE)})
    body = is_problem(post_file(client, "/v1/updates", lonely, base), 422)
    assert body["code"] == "shape_mismatch" and body["mismatches"]
    assert len(stored_files(settings)) == 1  # only the model


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ([1, 1, 520, 8], "8..512"),
        ([9, 3, 16, 16], "limit is 8"),
        ([1, 16, 16], "(N, C, H, W)"),
    ],
)
def test_ground_truth_checks(client: TestClient, shape: list[int], fragment: str) -> None:
    count = math.prod(shape)
    data = safetensors_bytes({"images": ("F32", shape, struct.pack(f"<{count}f", *([0.5] * count)))})
    body = is_problem(post_file(client, "/v1/ground-truth", data, None), 422)
    assert fragment in body["detail"]


def test_ground_truth_values_must_be_images(client: TestClient) -> None:
    data = safetensors_bytes({"images": ("F32", [1, 1, 8, 8], struct.pack("<64f", *([2.0] * 64)))})
    assert "[0, 1]" in is_problem(post_file(client, "/v1/ground-truth", data, None), 422)["detail"]
    data = safetensors_bytes({"pixels": ("F32", [1], _F32_ONE)})
    assert "'images'" in is_problem(post_file(client, "/v1/ground-truth", data, None), 422)["detail"]


def test_an_upload_over_the_limit_is_refused_with_413(client: TestClient, settings: Settings) -> None:
    big = b"\x00" * (settings.max_upload_bytes + 128 * 1024)
    body = is_problem(post_file(client, "/v1/models", big, MODEL_META), 413)
    assert str(settings.max_upload_bytes) in body["detail"]

    # Without a Content-Length (chunked), the body is counted as it arrives.
    def chunks() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="w"\r\n\r\n'
        yield from (b"\x00" * 65536 for _ in range(8))

    multipart = {"content-type": "multipart/form-data; boundary=b"}
    is_problem(client.post("/v1/models", content=chunks(), headers=multipart), 413)
    # A file just over the limit, inside the allowance for the multipart envelope.
    is_problem(post_file(client, "/v1/models", b"\x00" * (settings.max_upload_bytes + 1), MODEL_META), 413)
    assert stored_files(settings) == []


def test_a_declared_size_over_the_limit_is_refused_before_reading_the_body() -> None:
    sent: list[MutableMapping[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the application must not run")

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/models",
        "headers": [(b"content-length", b"999999999")],
        "state": {"request_id": "req_x"},
    }
    asyncio.run(BodyLimitMiddleware(app, lambda _: BodyLimit(1000, 1000))(scope, receive, send))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["request_id"] == "req_x"


def test_update_data_description_must_agree_with_the_model(client: TestClient) -> None:
    model = post_file(client, "/v1/models", lenet_files()["weights"], MODEL_META).json()["id"]
    base = {"model_id": model, "kind": "gradient", "image_shape": [3, 16, 16], "num_classes": 10}
    assert post_file(client, "/v1/updates", lenet_files()["gradient"], base).status_code == 201
    body = is_problem(
        post_file(client, "/v1/updates", lenet_files()["gradient"], {**base, "num_classes": 100}), 422
    )
    assert "disagrees with the model's 10" in body["detail"]
