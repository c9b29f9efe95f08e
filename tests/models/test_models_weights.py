"""build_model(weights=...): the server's weights arrive as safetensors and load strictly."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from service.errors import ArtifactError, ShapeMismatchError, UnsupportedFormatError
from service.models import build_model
from service.specs import DataSpec, ModelSpec
from service.tensorio import save_safetensors

DATA = DataSpec(shape=(3, 32, 32), num_classes=10)


def trained_like(arch: str, **knobs: object) -> nn.Module:
    """A model whose weights and BN statistics differ from any fresh initialisation."""
    model = build_model(ModelSpec(arch=arch, knobs=knobs, init_seed=11), DATA)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model(torch.randn(4, 3, 32, 32))  # updates running statistics and num_batches_tracked
    return model.eval()


def load(arch: str, blob: bytes, **knobs: object) -> nn.Module:
    store = {"w": blob}
    spec = ModelSpec(arch=arch, knobs=knobs, weights="w", init_seed=0)  # type: ignore[arg-type]
    return build_model(spec, DATA, resolve=store.__getitem__).eval()


@pytest.mark.parametrize(
    ("arch", "knobs"), [("resnet18", {"stem": "imagenet"}), ("convnet", {"batchnorm": True}), ("lenet", {})]
)
def test_weights_round_trip_through_safetensors(arch: str, knobs: dict) -> None:
    source = trained_like(arch, **knobs)
    loaded = load(arch, save_safetensors(source.state_dict()), **knobs)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_num_batches_tracked_may_be_left_out() -> None:
    source = trained_like("convnet", batchnorm=True)
    floats = {k: v for k, v in source.state_dict().items() if v.is_floating_point()}
    assert len(floats) < len(source.state_dict())
    loaded = load("convnet", save_safetensors(floats), batchnorm=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_half_precision_weights_are_cast_to_the_model() -> None:
    source = trained_like("lenet")
    loaded = load("lenet", save_safetensors({k: v.half() for k, v in source.state_dict().items()}))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.half().float())


def test_weights_of_another_configuration_are_refused() -> None:
    blob = save_safetensors(trained_like("convnet", width=16).state_dict())
    with pytest.raises(
        ShapeMismatchError, match=r"shape of 0.weight: expected \[64, 3, 3, 3\], got \[16, 3, 3, 3\]"
    ):
        load("convnet", blob)


def test_weights_missing_bn_statistics_are_refused() -> None:
    state = trained_like("convnet", batchnorm=True).state_dict()
    blob = save_safetensors({k: v for k, v in state.items() if "running_var" not in k})
    with pytest.raises(ShapeMismatchError, match=r"missing: 1\.running_var"):
        load("convnet", blob, batchnorm=True)


def test_non_finite_weights_are_refused() -> None:
    state = dict(trained_like("lenet").state_dict())
    state["fc.0.bias"] = state["fc.0.bias"].clone()
    state["fc.0.bias"][3] = float("nan")
    with pytest.raises(ArtifactError, match=r"^model.weights: tensor 'fc.0.bias' contains NaN"):
        load("lenet", save_safetensors(state))


def test_torch_save_weights_are_refused_unread(tmp_path: Path) -> None:
    class FileCreator:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (tmp_path / "pwned",))

    buffer = io.BytesIO()
    torch.save({**trained_like("lenet").state_dict(), "x": FileCreator()}, buffer)
    with pytest.raises(UnsupportedFormatError, match=r"^model.weights: this is a torch.save/zip archive"):
        load("lenet", buffer.getvalue())
    with pytest.raises(UnsupportedFormatError, match=r"^model.weights: this is a pickle file"):
        load("lenet", pickle.dumps(FileCreator()))
    assert not (tmp_path / "pwned").exists()


def test_weights_without_a_resolver_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="no resolve callback"):
        build_model(ModelSpec(arch="mlp", weights="w"), DATA)
