"""torchvision ResNets with a CIFAR or ImageNet stem, and skip connections that can be cut.

Cutting the skip of a residual block (the SoK's ablation) turns it into a plain block: its
identity or projection shortcut (`downsample`) is dropped, so the projection's parameters are
gone from the model as well. Cut blocks keep their module names, so the remaining weights of a
cut model have the same names as in the intact model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet as tv

from service.errors import SpecError
from service.models.base import MODELS, Builder, Knob, ModelEntry, kaiming_fan_out, replace_conv


class BasicBlockNoSkip(tv.BasicBlock):
    """torchvision's BasicBlock without its skip connection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)))


class BottleneckNoSkip(tv.Bottleneck):
    """torchvision's Bottleneck without its skip connection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)))


_NO_SKIP: dict[type[nn.Module], type[nn.Module]] = {
    tv.BasicBlock: BasicBlockNoSkip,
    tv.Bottleneck: BottleneckNoSkip,
}


def residual_blocks(model: tv.ResNet) -> list[tv.BasicBlock | tv.Bottleneck]:
    """The residual blocks in forward order: the numbering `cut_skips` refers to."""
    layers = (model.layer1, model.layer2, model.layer3, model.layer4)
    return [b for layer in layers for b in layer if isinstance(b, tv.BasicBlock | tv.Bottleneck)]


def cut_skip_connections(model: tv.ResNet, indices: list[int], arch: str = "resnet") -> None:
    """Remove the skip connections of the residual blocks at `indices`, in place."""
    blocks = residual_blocks(model)
    bad = [i for i in indices if not 0 <= i < len(blocks)]
    if bad:
        raise SpecError(
            f"knob 'cut_skips' of {arch}: block indices {bad} out of range; "
            f"{arch} has {len(blocks)} residual blocks (0..{len(blocks) - 1})"
        )
    if len(set(indices)) != len(indices):
        raise SpecError(f"knob 'cut_skips' of {arch}: repeated block indices in {indices}")
    for i in indices:
        block = blocks[i]
        # Swapping the class keeps the block's parameters and their names.
        block.__class__ = _NO_SKIP[type(block)]
        block.downsample = None


def narrow(model: tv.ResNet, width: int, num_classes: int) -> None:
    """Rebuild the stages with `width` channels in the first (2x, 4x, 8x in the next), the depth
    and module names unchanged; initialised as torchvision initialises them."""
    block = type(model.layer1[0])
    depths = [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.layer1 = model._make_layer(block, width, depths[0])
    model.layer2 = model._make_layer(block, 2 * width, depths[1], stride=2)
    model.layer3 = model._make_layer(block, 4 * width, depths[2], stride=2)
    model.layer4 = model._make_layer(block, 8 * width, depths[3], stride=2)
    model.fc = nn.Linear(8 * width * block.expansion, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            kaiming_fan_out(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _resnet(arch: str, constructor: Callable[..., tv.ResNet]) -> Builder:
    def build(
        num_classes: int, image_shape: tuple[int, int, int], *, stem: str, cut_skips: list[int], width: int
    ) -> nn.Module:
        model: tv.ResNet = constructor(num_classes=num_classes)
        if width != 64:
            narrow(model, width, num_classes)
        channels = image_shape[0]
        if stem == "cifar":
            model.conv1 = nn.Conv2d(channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            kaiming_fan_out(model.conv1.weight)
            model.maxpool = nn.Identity()  # type: ignore[assignment]
        elif channels != 3:
            model.conv1 = replace_conv(model.conv1, channels, kaiming_fan_out)
        cut_skip_connections(model, cut_skips, arch)
        return model

    return build


_RESNETS = {
    "resnet18": (tv.resnet18, "BasicBlock", 8),
    "resnet34": (tv.resnet34, "BasicBlock", 16),
    "resnet50": (tv.resnet50, "Bottleneck", 16),
    "resnet152": (tv.resnet152, "Bottleneck", 50),
}

for _name, (_constructor, _block, _count) in _RESNETS.items():
    MODELS.add(
        _name,
        ModelEntry(
            builder=_resnet(_name, _constructor),
            description=f"torchvision {_name} ({_count} {_block}s); CIFAR stem (3x3 conv, stride 1, no "
            "max pooling) or ImageNet stem; skip connections can be cut",
            knobs=(
                Knob(
                    "stem",
                    "str",
                    "cifar",
                    "cifar: 3x3 conv, stride 1, no max pooling (for small images); imagenet: torchvision's "
                    "7x7 conv, stride 2, max pooling",
                    choices=("cifar", "imagenet"),
                ),
                Knob(
                    "cut_skips",
                    "list[int]",
                    (),
                    f"residual blocks (0..{_count - 1}, in forward order) whose skip connection is removed",
                ),
                Knob(
                    "width",
                    "int",
                    64,
                    "channels of the first stage, doubled at each of the next three (64: torchvision's "
                    "network; smaller: the same depth, narrower, for CPU runs)",
                    minimum=4,
                    maximum=512,
                ),
            ),
        ),
    )
