"""The SDK's generators resource against the real API (EmbeddedService): upload from a path,
list, get and delete, sync and async; a pickle is a typed refusal."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import pytest
import torch

import gradleak_client as gl
from gradleak_client.embedded import EmbeddedService
from service.generators import GeneratorManifest, build_generator, save_generator

MANIFEST = GeneratorManifest(arch="mlp", latent_dim=4, image_shape=(1, 8, 8), width=8, trained_on="patches")


@pytest.fixture
def generator_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "generator.safetensors"
    save_generator(build_generator(MANIFEST), MANIFEST, path)
    return path


def test_upload_list_get_and_delete(client: gl.Client, generator_file: Path) -> None:
    gen = client.generators.upload(generator_file)
    assert isinstance(gen, gl.GeneratorUpload) and gen.id.startswith("gen_")
    assert gen.metadata.arch == "mlp" and gen.metadata.trained_on == "patches"
    assert gen.metadata.image_shape == (1, 8, 8) and gen.metadata.num_classes is None
    assert client.generators.get(gen.id) == gen
    assert gen.id in [g.id for g in client.generators.list()]
    client.generators.delete(gen.id)
    assert gen.id not in [g.id for g in client.generators.list()]
    with pytest.raises(gl.NotFoundError):
        client.generators.get(gen.id)


def test_a_pickle_is_refused(client: gl.Client) -> None:
    with pytest.raises(gl.APIStatusError, match="pickle") as info:
        client.generators.upload(pickle.dumps({"w": 1.0}))
    assert info.value.status == 415


def test_the_async_client(service: EmbeddedService, generator_file: Path) -> None:
    async def run() -> tuple[gl.GeneratorUpload, list[str]]:
        async with service.async_client() as client:
            gen = await client.generators.upload(generator_file.read_bytes())
            listed = [g.id for g in await client.generators.list()]
            assert (await client.generators.get(gen.id)).metadata == gen.metadata
            await client.generators.delete(gen.id)
            return gen, listed

    gen, listed = asyncio.run(run())
    assert gen.id in listed and gen.metadata.latent_dim == 4


TRAINING = {"data": {"source": "faces"}, "steps": 3, "batch_size": 4, "width": 4, "latent_dim": 8}


def test_a_generator_trained_on_the_service_is_the_callers_upload(client: gl.Client, tmp_path: Path) -> None:
    run = client.generator_trainings.create(TRAINING)
    assert isinstance(run, gl.GeneratorTraining) and run.id.startswith("gtr_")
    run = client.generator_trainings.wait(run.id, timeout=120).raise_for_status()
    assert run.generator_id is not None and run.progress is not None and run.progress.iteration == 3
    gen = client.generators.get(run.generator_id)
    assert gen.metadata.arch == "dcgan" and gen.metadata.trained_on == "faces" and gen.metadata.steps == 3
    grid = client.generator_trainings.artifacts.download(run.id, "samples.png", tmp_path)
    assert grid.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(gl.APIStatusError) as info:
        client.generator_trainings.create({**TRAINING, "conditional": True})
    assert info.value.status == 422 and "labels" in str(info.value)


def test_an_image_set_upload_goes_past_a_jobs_batch(client: gl.Client, tmp_path: Path) -> None:
    from service.tensorio import save_safetensors

    data = save_safetensors({"images": torch.rand(80, 3, 16, 16)})
    with pytest.raises(gl.APIStatusError):
        client.ground_truth.upload(data)
    images = client.ground_truth.upload(data, image_set=True)
    assert images.metadata.purpose == "image_set" and images.metadata.num_images == 80


def test_the_cli_trains_a_generator_and_downloads_it(
    live_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradleak_client.cli import main
    from service.generators import load_generator_file

    url = ("--url", live_url)
    out = tmp_path / "gen"
    args = ("train-generator", "--steps", "2", "--batch-size", "4", "--width", "4", "--wait", "--no-progress")
    assert main([*args, "-o", str(out), *url]) == 0
    generator_id = capsys.readouterr().out.strip()
    assert generator_id.startswith("gen_")
    assert load_generator_file(out / "generator.safetensors").manifest.steps == 2
    assert (out / "samples.png").read_bytes().startswith(b"\x89PNG")
    run_id = main(["train-generator", "--steps", "2", "--batch-size", "4", "--width", "4", *url])
    run_id = capsys.readouterr().out.strip()
    assert run_id.startswith("gtr_")
    assert main(["wait", run_id, "--no-progress", *url]) == 0  # status, wait, fetch, cancel take any run id
    assert "succeeded" in capsys.readouterr().out
    assert main(["fetch", run_id, "samples.png", "-o", str(tmp_path / "f"), *url]) == 0
    assert (tmp_path / "f" / "samples.png").read_bytes().startswith(b"\x89PNG")
    assert main(["cancel", run_id, *url]) == 2  # finished: a 409
    capsys.readouterr()
    assert main(["train-generator", "--conditional", *url]) == 2  # the faces have no labels: a 422
    assert "labels" in capsys.readouterr().err
