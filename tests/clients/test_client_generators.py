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
