"""Latent-space attacks through the API: the generator upload is checked before queueing."""

from __future__ import annotations

import torch
from apitools import friendly_job, is_problem, post_file, upload_all, wait_job
from fastapi.testclient import TestClient

from service.generators import GeneratorManifest, build_generator, generator_bytes


def _generator(shape: tuple[int, int, int]) -> bytes:
    torch.manual_seed(0)
    manifest = GeneratorManifest(arch="mlp", latent_dim=4, image_shape=shape, width=8, trained_on="faces")
    return generator_bytes(build_generator(manifest), manifest)


def test_a_gias_job_names_a_generator_that_fits_the_data(client: TestClient) -> None:
    ids = upload_all(client)
    wrong = post_file(client, "/v1/generators", _generator((3, 8, 8)), None).json()["id"]
    body = is_problem(
        client.post(
            "/v1/jobs", json=friendly_job(ids, attack={"name": "gias", "generator": wrong}, knowledge=2)
        ),
        422,
    )
    assert "makes images of shape 3x8x8 but data.shape is 3x16x16" in body["detail"]
    body = is_problem(
        client.post(
            "/v1/jobs",
            json=friendly_job(ids, attack={"name": "ggl", "generator": ids["update"]}, knowledge=2),
        ),
        422,
    )
    assert "needs a generator upload" in body["detail"]
    assert client.get("/v1/jobs").json()["items"] == []

    good = post_file(client, "/v1/generators", _generator((3, 16, 16)), None).json()["id"]
    created = client.post(
        "/v1/jobs", json=friendly_job(ids, attack={"name": "gias", "generator": good}, knowledge=2)
    )
    assert created.status_code == 202, created.text
    done = wait_job(client, created.json()["id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert done["spec"]["attack"]["generator"] == good and done["spec"]["knowledge"] == 2
