"""DenseNet's `connections` knob (the SoK's Fig. 14) and its `growth_rate`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.errors import SpecError
from service.models import build_model, catalog
from service.specs import DataSpec, ModelSpec


def dense(num_classes: int = 10, **knobs: object) -> nn.Module:
    spec = ModelSpec(arch="densenet121", knobs=knobs)  # type: ignore[arg-type]
    return build_model(spec, DataSpec(shape=(3, 32, 32), num_classes=num_classes))


def test_all_connections_is_torchvisions_densenet121() -> None:
    from torchvision.models.densenet import densenet121

    ours, theirs = dense().state_dict(), densenet121(num_classes=10).state_dict()
    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in theirs.items()]
    # as many connections as the longest block has feature maps: the same network
    wide = dense(connections=25).state_dict()
    assert [(k, v.shape) for k, v in wide.items()] == [(k, v.shape) for k, v in ours.items()]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_each_dense_layer_sees_the_k_most_recent_maps(k: int) -> None:
    model = dense(connections=k, growth_rate=8)
    seen: dict[str, list[int]] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(_m: nn.Module, inputs: tuple[list[torch.Tensor]], _out: torch.Tensor) -> None:
            seen[name] = [t.shape[1] for t in inputs[0]]

        return record

    block = model.features.denseblock2
    for name, layer in block.items():
        layer.register_forward_hook(hook(name))
    trans: list[int] = []
    model.features.transition2.register_forward_hook(lambda _m, i, _o: trans.append(i[0].shape[1]))
    model(torch.rand(2, 3, 32, 32))
    block_input = model.features.transition1.conv.out_channels
    widths = [block_input] + [8] * 12  # the block's input, then one map per layer
    for i in range(12):
        expected = widths[: i + 1][-k:]
        assert seen[f"denselayer{i + 1}"] == expected, i
        assert block[f"denselayer{i + 1}"].conv1.in_channels == sum(expected)
    assert trans == [sum(widths[-k:])]  # the transition sees the block's last k maps


def test_fewer_connections_fewer_parameters_same_names() -> None:
    counts = [sum(p.numel() for p in dense(connections=k, growth_rate=8).parameters()) for k in ("all", 4, 1)]
    assert counts[0] > counts[1] > counts[2]
    names = [n for n, _ in dense(connections=1, growth_rate=8).named_parameters()]
    assert names == [n for n, _ in dense(growth_rate=8).named_parameters()]


def test_a_thinned_densenet_trains() -> None:
    model = dense(num_classes=3, connections=2, growth_rate=4)
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3)
    nn.functional.cross_entropy(out, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"connections": 0}, "knob 'connections' of densenet121 must be >= 1, got 0"),
        ({"connections": "some"}, "knob 'connections' of densenet121 must be one of 'all', got 'some'"),
        ({"connections": 2.0}, "knob 'connections' of densenet121 must be an integer or a string"),
        ({"growth_rate": 2}, "knob 'growth_rate' of densenet121 must be >= 4, got 2"),
        ({"stem": "cifar"}, r"valid knobs: connections \(int\|str\), growth_rate \(int\)"),
    ],
)
def test_bad_knobs_are_refused(knobs: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        dense(**knobs)


def test_the_catalog_lists_the_knobs() -> None:
    entry = next(e for e in catalog() if e["name"] == "densenet121")
    knobs = {k["name"]: k for k in entry["knobs"]}
    assert knobs["connections"]["default"] == "all" and knobs["connections"]["choices"] == ["all"]
    assert knobs["growth_rate"]["default"] == 32
