"""Generator files: a round trip through safetensors gives the same images; pickles, unknown
architectures, shapes that do not fit and files without a manifest are refused clearly."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch

from service.errors import ArtifactError, ShapeMismatchError, SpecError, UnsupportedFormatError
from service.generators import (
    GENERATOR_ARCHS,
    METADATA_KEY,
    GeneratorManifest,
    build_generator,
    check_generator_file,
    generator_bytes,
    generator_tensors,
    load_generator,
    read_manifest,
    sample_latents,
)
from service.tensorio import save_safetensors

DCGAN = GeneratorManifest(arch="dcgan", latent_dim=8, image_shape=(3, 32, 32), width=4, trained_on="faces")
COND = GeneratorManifest(
    arch="dcgan_cond", latent_dim=8, image_shape=(1, 64, 64), width=2, num_classes=3, trained_on="patches"
)
MLP = GeneratorManifest(arch="mlp", latent_dim=4, image_shape=(3, 8, 12), width=8, trained_on="folder:x")


def _trained_a_little(manifest: GeneratorManifest) -> torch.nn.Module:
    """A generator whose batch norm statistics moved away from their initial values."""
    torch.manual_seed(1)
    g = build_generator(manifest).train()
    labels = None if manifest.num_classes is None else torch.arange(6) % manifest.num_classes
    with torch.no_grad():
        g(torch.randn(6, manifest.latent_dim), labels)
    return g.eval()


@pytest.mark.parametrize("manifest", [DCGAN, COND, MLP], ids=lambda m: m.arch)
def test_a_generator_round_trips_through_safetensors(manifest: GeneratorManifest) -> None:
    g = _trained_a_little(manifest)
    loaded = load_generator(generator_bytes(g, manifest))
    assert loaded.manifest == manifest and not loaded.module.training
    z = sample_latents(manifest, 5, seed=3)
    labels = None if manifest.num_classes is None else torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        out = loaded.module(z, labels)
    assert out.shape == (5, *manifest.image_shape)
    assert torch.equal(out, g(z, labels))
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_dcgan_sizes_and_names_follow_the_pytorch_examples_layout() -> None:
    g = build_generator(DCGAN.model_copy(update={"width": 64, "latent_dim": 100, "image_shape": (3, 64, 64)}))
    shapes = {k: list(v.shape) for k, v in generator_tensors(g).items()}
    # netG of pytorch/examples dcgan (nz=100, ngf=64, nc=3)
    assert shapes["main.0.weight"] == [100, 512, 4, 4] and shapes["main.12.weight"] == [64, 3, 4, 4]
    assert "main.1.running_mean" in shapes and not any("num_batches" in k for k in shapes)


def test_the_manifest_is_in_the_safetensors_metadata_and_read_alone() -> None:
    data = generator_bytes(build_generator(MLP), MLP)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert GeneratorManifest.model_validate_json(header["__metadata__"][METADATA_KEY]) == MLP
    assert read_manifest(data) == MLP
    manifest, count, sha = check_generator_file(io.BytesIO(data), len(data))
    assert manifest == MLP and count == 6 and len(sha) == 64


def test_unknown_architecture_is_refused_naming_the_valid_ones() -> None:
    bad = DCGAN.model_copy(update={"arch": "biggan"})
    with pytest.raises(SpecError, match=r"biggan.*valid: dcgan, dcgan_cond, mlp"):
        build_generator(bad)
    with pytest.raises(SpecError, match="unknown generator architecture 'biggan'"):
        load_generator(save_safetensors({"w": torch.zeros(1)}, bad.to_metadata()))
    assert {"dcgan", "dcgan_cond", "mlp"} <= set(GENERATOR_ARCHS.names())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_shape": (3, 48, 48)}, "32 or 64"),
        ({"image_shape": (3, 32, 64)}, "square"),
        ({"num_classes": 10}, "not class-conditional"),
        ({"arch": "dcgan_cond"}, "give num_classes"),
    ],
)
def test_unsupported_shapes_and_conditioning_are_refused(change: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build_generator(DCGAN.model_copy(update=change))


def test_a_shape_mismatch_is_refused_listing_it() -> None:
    tensors = generator_tensors(build_generator(DCGAN))
    tensors["main.0.weight"] = torch.zeros(8, 8, 4, 4)
    with pytest.raises(ShapeMismatchError, match=r"shape of main.0.weight: expected \[8, 16, 4, 4\]"):
        load_generator(save_safetensors(tensors, DCGAN.to_metadata()))
    # the same weights under a manifest of another width
    wider = DCGAN.model_copy(update={"width": 8})
    with pytest.raises(ShapeMismatchError):
        load_generator(save_safetensors(generator_tensors(build_generator(DCGAN)), wider.to_metadata()))


def test_missing_extra_and_integer_tensors_are_refused() -> None:
    tensors = generator_tensors(build_generator(MLP))
    missing = {k: v for k, v in tensors.items() if k != "main.0.bias"}
    with pytest.raises(ShapeMismatchError, match=r"missing: main\.0\.bias"):
        load_generator(save_safetensors(missing, MLP.to_metadata()))
    with pytest.raises(ShapeMismatchError, match="unexpected: extra"):
        load_generator(save_safetensors({**tensors, "extra": torch.zeros(1)}, MLP.to_metadata()))
    ints = {**tensors, "main.0.bias": tensors["main.0.bias"].long()}
    with pytest.raises(ArtifactError, match=r"dtype I64|dtype of main\.0\.bias"):
        load_generator(save_safetensors(ints, MLP.to_metadata()))
    with pytest.raises(ArtifactError, match="dtype I32"):
        load_generator(
            save_safetensors({**tensors, "main.0.bias": tensors["main.0.bias"].int()}, MLP.to_metadata())
        )


def test_pickles_and_torch_save_files_are_refused() -> None:
    with pytest.raises(UnsupportedFormatError, match="pickle"):
        load_generator(pickle.dumps(generator_tensors(build_generator(MLP))))
    buffer = io.BytesIO()
    torch.save(build_generator(MLP).state_dict(), buffer)
    with pytest.raises(UnsupportedFormatError, match=r"torch\.save"):
        load_generator(buffer.getvalue())


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({}, "no 'gradleak.generator' entry"),
        ({METADATA_KEY: "not json"}, "invalid manifest"),
        ({METADATA_KEY: json.dumps({**MLP.model_dump(), "latent_dim": 0})}, "latent_dim"),
        ({METADATA_KEY: json.dumps({**MLP.model_dump(), "image_shape": [2, 8, 8]})}, "1 or 3 channels"),
        ({METADATA_KEY: json.dumps({**MLP.model_dump(), "colour": "red"})}, "colour"),
    ],
)
def test_a_missing_or_invalid_manifest_is_refused(metadata: dict[str, str], message: str) -> None:
    tensors = generator_tensors(build_generator(MLP))
    with pytest.raises(ArtifactError, match=message):
        load_generator(save_safetensors(tensors, metadata))


def test_forward_checks_latents_and_labels() -> None:
    g = build_generator(COND).eval()
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        g(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"latents must have shape \(N, 8\)"):
        g(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not class-conditional"):
        build_generator(MLP)(torch.randn(2, 4), torch.tensor([0, 1]))


def test_the_catalog_lists_the_generator_architectures() -> None:
    from service.catalog import describe, full_catalog, overview

    cat = full_catalog()
    assert [g["name"] for g in cat["generators"]] == GENERATOR_ARCHS.names()
    cond = next(g for g in cat["generators"] if g["name"] == "dcgan_cond")
    assert cond["conditional"] == "required" and cond["sizes"].startswith("32 or 64")
    assert "dcgan_cond" in overview(cat)
    assert "gradleak.generator" in describe("dcgan_cond", cat)
