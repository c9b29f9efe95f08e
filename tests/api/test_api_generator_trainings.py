"""Generator training runs over HTTP: submit (202 + Location), follow to the generator upload it
makes, its artifacts (sample grids), 422s for specs the run would refuse, image sets larger than a
job's batch, tenant scoping."""

from __future__ import annotations

import time
from typing import Any

import torch
from apitools import is_problem, post_file
from fastapi.testclient import TestClient

from service.settings import Settings
from service.tensorio import save_safetensors

TINY: dict[str, Any] = {
    "data": {"source": "faces"},
    "steps": 4,
    "batch_size": 4,
    "width": 4,
    "latent_dim": 8,
    "checkpoint_every": 10,
}


def wait(client: TestClient, run_id: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/generator-trainings/{run_id}", **kw).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"training run {run_id} did not finish in {timeout}s")


def image_set(n: int, labels: bool) -> bytes:
    tensors = {"images": torch.rand(n, 3, 32, 32)}
    if labels:
        tensors["labels"] = torch.arange(n) % 2
    return save_safetensors(tensors)


def test_a_training_run_makes_a_generator_upload_with_sample_grids(client: TestClient) -> None:
    r = client.post("/v1/generator-trainings", json={"spec": TINY})
    assert r.status_code == 202, r.text
    run = r.json()
    assert run["id"].startswith("gtr_") and r.headers["Location"] == f"/v1/generator-trainings/{run['id']}"
    assert run["spec"]["time_limit_s"] is not None  # the server's default was filled in
    done = wait(client, run["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"]["iteration"] == 4 and done["progress"]["total"] == 4
    assert done["result"]["ended"] == "all steps" and done["result"]["trained_on"] == "faces"
    gen = client.get(f"/v1/generators/{done['generator_id']}")
    assert gen.status_code == 200, gen.text
    assert gen.json()["metadata"]["arch"] == "dcgan" and gen.json()["metadata"]["steps"] == 4
    names = {a["name"] for a in client.get(f"/v1/generator-trainings/{run['id']}/artifacts").json()["items"]}
    assert {"samples.png", "generator.safetensors", "history.json", "training.json"} <= names
    png = client.get(f"/v1/generator-trainings/{run['id']}/artifacts/samples.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    listed = client.get("/v1/generator-trainings").json()["items"]
    assert [t["id"] for t in listed] == [run["id"]]
    assert client.get("/v1/jobs").json()["items"] == []  # not an attack job


def test_specs_the_run_would_refuse_are_422(client: TestClient) -> None:
    is_problem(client.post("/v1/generator-trainings", json={"spec": {**TINY, "steps": 0}}), 422)
    body = is_problem(
        client.post("/v1/generator-trainings", json={"spec": {**TINY, "conditional": True}}), 422
    )
    assert "labels" in body["detail"]
    body = is_problem(
        client.post("/v1/generator-trainings", json={"spec": {**TINY, "time_limit_s": 10 * 24 * 3600}}), 422
    )
    missing = {**TINY, "data": {"source": "images", "images": "gt_" + "0" * 32}}
    assert client.post("/v1/generator-trainings", json={"spec": missing}).status_code in (404, 422)
    assert client.get("/v1/generator-trainings/gtr_" + "0" * 32).status_code == 404
    assert client.get("/v1/generator-trainings/job_" + "0" * 32).status_code == 404


def test_an_image_set_may_hold_more_than_a_jobs_batch_and_trains_a_conditional_generator(
    client: TestClient, settings: Settings
) -> None:
    n = settings.max_batch_size + 4
    is_problem(post_file(client, "/v1/ground-truth", image_set(n, labels=True), None), 422)
    r = post_file(client, "/v1/ground-truth", image_set(n, labels=True), {"purpose": "image_set"})
    assert r.status_code == 201, r.text
    assert r.json()["metadata"]["purpose"] == "image_set" and r.json()["metadata"]["num_images"] == n
    spec = {**TINY, "data": {"source": "images", "images": r.json()["id"]}, "conditional": True}
    run = client.post("/v1/generator-trainings", json={"spec": spec})
    assert run.status_code == 202, run.text
    done = wait(client, run.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    manifest = client.get(f"/v1/generators/{done['generator_id']}").json()["metadata"]
    assert manifest["arch"] == "dcgan_cond" and manifest["num_classes"] == 2


def test_another_tenant_cannot_see_or_cancel_a_run(auth_client: TestClient, keys: dict[str, str]) -> None:
    acme, other = {"Authorization": keys["acme"]}, {"Authorization": keys["other"]}
    r = auth_client.post("/v1/generator-trainings", json={"spec": TINY}, headers=acme)
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    assert auth_client.get(f"/v1/generator-trainings/{run_id}", headers=other).status_code == 404
    assert auth_client.delete(f"/v1/generator-trainings/{run_id}", headers=other).status_code == 404
    assert auth_client.get("/v1/generator-trainings", headers=other).json()["items"] == []
    done = wait(auth_client, run_id, headers=acme)
    assert auth_client.get(f"/v1/generators/{done['generator_id']}", headers=other).status_code == 404
