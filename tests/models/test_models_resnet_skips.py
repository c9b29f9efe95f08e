"""ResNet skip connections cut by the `cut_skips` knob."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

from service.models import build_model, residual_blocks
from service.models.resnet import BasicBlockNoSkip, BottleneckNoSkip
from service.specs import DataSpec, ModelSpec


def resnet(arch: str, cut: list[int] | None = None, seed: int = 0) -> tv.ResNet:
    # The ImageNet stem shrinks 32x32 inputs early: the same blocks at a fraction of the cost.
    spec = ModelSpec(arch=arch, knobs={"cut_skips": cut or [], "stem": "imagenet"}, init_seed=seed)
    model = build_model(spec, DataSpec(shape=(3, 32, 32)))
    assert isinstance(model, tv.ResNet)
    return model


def warmed_up(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, then eval mode, so that outputs are deterministic."""
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    return model.eval()


def test_block_numbering_covers_all_residual_blocks() -> None:
    blocks = residual_blocks(resnet("resnet18"))
    assert len(blocks) == 8
    assert all(isinstance(b, tv.BasicBlock) for b in blocks)


def test_cutting_a_skip_changes_the_function_with_the_same_weights() -> None:
    intact = warmed_up(resnet("resnet18"))
    cut = resnet("resnet18", cut=[1])
    cut.load_state_dict(intact.state_dict())  # block 1 has no projection: the names are identical
    cut.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(intact(x), cut(x), atol=1e-3)


def test_cut_block_equals_a_hand_built_plain_block() -> None:
    intact = warmed_up(resnet("resnet18"))
    cut = resnet("resnet18", cut=[1])
    cut.load_state_dict(intact.state_dict())
    cut.eval()
    x = torch.randn(2, 3, 32, 32)

    def by_hand(m: tv.ResNet, x: torch.Tensor) -> torch.Tensor:
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        h = m.layer1[0](h)
        b = m.layer1[1]
        h = torch.relu(b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(h))))))  # no "+ h"
        h = m.layer4(m.layer3(m.layer2(h)))
        return m.fc(torch.flatten(m.avgpool(h), 1))

    with torch.no_grad():
        expected = by_hand(intact, x)
        torch.testing.assert_close(cut(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(intact(x), expected, atol=1e-3)


def test_cutting_a_projection_skip_removes_its_parameters() -> None:
    intact = resnet("resnet50")
    cut = resnet("resnet50", cut=[0, 3])
    blocks = residual_blocks(cut)
    assert isinstance(blocks[0], BottleneckNoSkip) and blocks[0].downsample is None
    assert isinstance(blocks[3], BottleneckNoSkip) and blocks[3].downsample is None
    assert isinstance(blocks[4], tv.Bottleneck) and not isinstance(blocks[4], BottleneckNoSkip)
    removed = set(intact.state_dict()) - set(cut.state_dict())
    # blocks 0 and 3 (layer1[0], layer2[0]) are the ones with a projection shortcut
    assert {k.split(".downsample.")[0] for k in removed} == {"layer1.0", "layer2.0"}
    assert set(cut.state_dict()) <= set(intact.state_dict())

    out = cut(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is not None for p in cut.parameters())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_cut_models_are_seeded_like_intact_ones(arch: str) -> None:
    a, b = resnet(arch, cut=[2], seed=4), resnet(arch, cut=[2], seed=4)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert type(residual_blocks(a)[2]) in (BasicBlockNoSkip, BottleneckNoSkip)


def test_a_narrow_resnet_keeps_the_depth_and_the_weight_names() -> None:
    full = build_model(ModelSpec(arch="resnet18"), DataSpec())
    narrow = build_model(ModelSpec(arch="resnet18", knobs={"width": 16}), DataSpec())
    assert list(narrow.state_dict()) == list(full.state_dict())
    params = sum(p.numel() for p in narrow.parameters())
    assert params < sum(p.numel() for p in full.parameters()) / 10
    assert narrow.conv1.out_channels == 16 and narrow.fc.in_features == 128
    assert narrow(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    again = build_model(ModelSpec(arch="resnet18", knobs={"width": 16}), DataSpec())
    assert all(torch.equal(a, b) for a, b in zip(narrow.parameters(), again.parameters(), strict=True))
