"""LeNet's `init` knob: DLG's wide uniform initialisation (the default) or PyTorch's default one."""

from __future__ import annotations

import math

import pytest
from torch import nn

from service.errors import SpecError
from service.models import build_model, catalog
from service.specs import DataSpec, ModelSpec


def lenet(**knobs: object) -> nn.Module:
    spec = ModelSpec(arch="lenet", knobs=knobs, init_seed=0)  # type: ignore[arg-type]
    return build_model(spec, DataSpec(shape=(3, 32, 32), num_classes=10))


def widest(model: nn.Module) -> float:
    return max(float(p.abs().max()) for p in model.parameters())


def test_default_is_dlgs_uniform() -> None:
    default, uniform = lenet(), lenet(init="uniform")
    for a, b in zip(default.parameters(), uniform.parameters(), strict=True):
        assert a.equal(b)
    # every weight and bias lies in [-0.5, 0.5], and the weight tensors (hundreds of draws) fill it
    for p in default.parameters():
        assert p.abs().max() <= 0.5
        if p.dim() > 1:
            assert p.abs().max() > 0.45


def test_pytorch_init_is_narrower_and_follows_fan_in() -> None:
    model = lenet(init="pytorch")
    assert widest(model) < 0.2 < 0.45 < widest(lenet())
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            fan_in = m.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)  # PyTorch's default bound for weights and biases
            assert m.weight.abs().max() <= bound + 1e-6
            assert m.weight.abs().max() > 0.8 * bound


def test_pytorch_init_is_seeded() -> None:
    a, b = lenet(init="pytorch"), lenet(init="pytorch")
    assert all(x.equal(y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("bad", ["kaiming", "", 1, True])
def test_invalid_init_is_refused(bad: object) -> None:
    with pytest.raises(SpecError, match="init"):
        lenet(init=bad)


def test_catalog_lists_the_knob() -> None:
    entry = next(a for a in catalog() if a["name"] == "lenet")
    knob = next(k for k in entry["knobs"] if k["name"] == "init")
    assert knob["default"] == "uniform"
    assert knob["choices"] == ["uniform", "pytorch"]
