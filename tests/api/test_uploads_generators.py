"""Generator uploads: a generator file (safetensors with its manifest) is checked like model
weights, stored per tenant, listed, and resolves for a job like any other upload."""

from __future__ import annotations

import io
import pickle
from typing import Any

import pytest
import torch
from apitools import is_problem, post_file
from fastapi.testclient import TestClient

from service.generators import GeneratorManifest, build_generator, generator_bytes
from service.jobs.execute import upload_resolver
from service.jobs.state_sqlite import SQLiteStateStore
from service.settings import Settings
from service.storage_s3 import make_store
from service.tensorio import save_safetensors

MANIFEST = GeneratorManifest(arch="mlp", latent_dim=4, image_shape=(1, 8, 8), width=8, trained_on="faces")


def _generator(manifest: GeneratorManifest = MANIFEST) -> bytes:
    torch.manual_seed(0)
    return generator_bytes(build_generator(manifest), manifest)


def test_a_generator_is_stored_listed_and_resolves_for_a_job(client: TestClient, settings: Settings) -> None:
    data = _generator()
    created = post_file(client, "/v1/generators", data, None)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"].startswith("gen_") and created.headers["location"] == f"/v1/generators/{body['id']}"
    assert body["kind"] == "generator" and body["tensors"] == 6
    assert body["metadata"]["arch"] == "mlp" and body["metadata"]["trained_on"] == "faces"
    assert body["metadata"]["image_shape"] == [1, 8, 8]
    assert client.get(f"/v1/generators/{body['id']}").json() == body
    second = post_file(client, "/v1/generators", data, {}).json()
    listed = client.get("/v1/generators").json()["generators"]
    assert [g["id"] for g in listed] == [second["id"], body["id"]]  # newest first
    is_problem(client.get(f"/v1/models/{body['id']}"), 404)  # a generator id is not a model id

    # a job's ctx.resolve(ref) gives the stored bytes back
    state = SQLiteStateStore(settings.data_dir / "gradleak.db")
    try:
        resolve = upload_resolver(state, make_store(settings), "local")
        assert resolve(body["id"]) == data
    finally:
        state.close()

    assert client.delete(f"/v1/generators/{body['id']}").status_code == 204
    is_problem(client.get(f"/v1/generators/{body['id']}"), 404)
    assert [g["id"] for g in client.get("/v1/generators").json()["generators"]] == [second["id"]]


def _torch_save() -> bytes:
    buffer = io.BytesIO()
    torch.save(build_generator(MANIFEST).state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "what"),
    [(lambda: pickle.dumps({"w": [1.0]}), "pickle"), (_torch_save, "torch.save")],
)
def test_pickles_and_torch_save_files_are_refused(client: TestClient, make: Any, what: str) -> None:
    body = is_problem(post_file(client, "/v1/generators", make(), None), 415)
    assert what in body["detail"] and "safetensors" in body["detail"]
    assert client.get("/v1/generators").json()["generators"] == []


def test_an_unknown_architecture_is_refused_naming_the_valid_ones(client: TestClient) -> None:
    manifest = MANIFEST.model_copy(update={"arch": "biggan"})
    data = save_safetensors({"w": torch.zeros(2)}, manifest.to_metadata())
    body = is_problem(post_file(client, "/v1/generators", data, None), 422)
    assert "biggan" in body["detail"] and "dcgan" in body["detail"] and "mlp" in body["detail"]


def test_weights_that_do_not_fit_or_no_manifest_are_refused(client: TestClient) -> None:
    tensors = {k: v for k, v in build_generator(MANIFEST).state_dict().items()}
    tensors["main.0.weight"] = torch.zeros(3, 3)
    body = is_problem(
        post_file(client, "/v1/generators", save_safetensors(tensors, MANIFEST.to_metadata()), None), 422
    )
    assert "main.0.weight" in body["detail"]
    body = is_problem(post_file(client, "/v1/generators", save_safetensors({"w": torch.zeros(2)}), None), 422)
    assert "gradleak.generator" in body["detail"]
    body = is_problem(post_file(client, "/v1/generators", _generator(), {"arch": "mlp"}), 422)


def test_another_tenant_cannot_see_a_generator(auth_client: TestClient, keys: dict[str, str]) -> None:
    acme, other = {"Authorization": keys["acme"]}, {"Authorization": keys["other"]}
    created = post_file(auth_client, "/v1/generators", _generator(), None, headers=acme)
    assert created.status_code == 201, created.text
    gen_id = created.json()["id"]
    assert auth_client.get(f"/v1/generators/{gen_id}", headers=acme).status_code == 200
    is_problem(auth_client.get(f"/v1/generators/{gen_id}", headers=other), 404)
    assert auth_client.get("/v1/generators", headers=other).json()["generators"] == []
    is_problem(auth_client.delete(f"/v1/generators/{gen_id}", headers=other), 404)
    assert len(auth_client.get("/v1/generators", headers=acme).json()["generators"]) == 1


def test_the_catalog_lists_generator_architectures(client: TestClient) -> None:
    names = [g["name"] for g in client.get("/v1/catalog").json()["generators"]]
    assert {"dcgan", "dcgan_cond", "mlp"} <= set(names)
