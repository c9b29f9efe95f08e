"""torchvision's VGG, DenseNet, GoogLeNet and Inception v3, adapted to 1 or 3 channels and any
number of classes. Module names follow torchvision, so torchvision state dicts of the same
configuration load here.

DenseNet's dense connections can be thinned (the SoK's Fig. 14): with `connections` k, each dense
layer, and the transition after its block, takes only the k most recent feature maps of its block
(the block's input counts as the first) instead of all of them. The layers keep their names and
order; their input convolutions and batch norms shrink to the channels they now see.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torchvision.models import densenet as tv_densenet
from torchvision.models import vgg as tv_vgg
from torchvision.models.googlenet import googlenet
from torchvision.models.inception import inception_v3

from service.errors import SpecError
from service.models.base import MODELS, Builder, Knob, ModelEntry, kaiming_fan_out, replace_conv

# torchvision's initialisation of GoogLeNet and Inception v3 (truncated normal, per-model std).
_trunc_normal_googlenet = partial(nn.init.trunc_normal_, mean=0.0, std=0.01, a=-2, b=2)
_trunc_normal_inception = partial(nn.init.trunc_normal_, mean=0.0, std=0.1, a=-2, b=2)


class SmallVGG(nn.Module):
    """VGG features with the CIFAR-style head: global average pooling and one linear layer.

    torchvision's head (7x7 pooling, two 4096-wide layers, 120M parameters) is made for 224x224
    images; at 32x32 the features end at 1x1 and a 512-wide linear head is the usual choice.
    """

    def __init__(self, features: nn.Sequential, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(512, num_classes))
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                kaiming_fan_out(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def _vgg(config: str) -> Builder:
    def build(
        num_classes: int, image_shape: tuple[int, int, int], *, batchnorm: bool, head: str
    ) -> nn.Module:
        features = tv_vgg.make_layers(tv_vgg.cfgs[config], batch_norm=batchnorm)
        if image_shape[0] != 3:
            first = features[0]
            assert isinstance(first, nn.Conv2d)
            features[0] = replace_conv(first, image_shape[0], kaiming_fan_out)
        if head == "small":
            return SmallVGG(features, num_classes)
        return tv_vgg.VGG(features, num_classes=num_classes, init_weights=True)

    return build


class SparseDenseBlock(nn.ModuleDict):
    """A dense block whose layers see only the `connections` most recent feature maps.

    torchvision's `_DenseBlock` feeds layer i the concatenation of the block's input and every
    earlier layer's output; here layer i gets the last `connections` of those i + 1 maps, and the
    block returns the last `connections` of all its maps (what the transition after it sees).
    Layer names are torchvision's (denselayer1, denselayer2, ...).
    """

    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int, connections: int
    ) -> None:
        super().__init__()
        self.connections = connections
        widths = [num_input_features]
        for i in range(num_layers):
            seen = sum(widths[-connections:])
            layer = tv_densenet._DenseLayer(seen, growth_rate=growth_rate, bn_size=bn_size, drop_rate=0)
            self.add_module(f"denselayer{i + 1}", layer)
            widths.append(growth_rate)
        self.out_features = sum(widths[-connections:])

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features[-self.connections :]))
        return torch.cat(features[-self.connections :], 1)


DENSENET121_BLOCKS = (6, 12, 24, 16)


def build_densenet121(
    num_classes: int, image_shape: tuple[int, int, int], *, connections: int | str, growth_rate: int
) -> nn.Module:
    if connections == "all":
        model = tv_densenet.DenseNet(growth_rate, DENSENET121_BLOCKS, 64, num_classes=num_classes)
    elif isinstance(connections, int):
        model = _sparse_densenet(num_classes, connections, growth_rate)
    else:
        raise SpecError(f"knob 'connections' of densenet121 must be an integer or 'all', got {connections!r}")
    if image_shape[0] != 3:
        model.features.conv0 = replace_conv(model.features.conv0, image_shape[0], nn.init.kaiming_normal_)
    return model


def _sparse_densenet(num_classes: int, connections: int, growth_rate: int) -> tv_densenet.DenseNet:
    """torchvision's densenet121 layout (same module names) with each dense block thinned."""
    model = tv_densenet.DenseNet(growth_rate, DENSENET121_BLOCKS, 64, num_classes=num_classes)
    num_features = 64  # the stem's output (torchvision's num_init_features)
    for i, num_layers in enumerate(DENSENET121_BLOCKS):
        block = SparseDenseBlock(num_layers, num_features, 4, growth_rate, connections)
        setattr(model.features, f"denseblock{i + 1}", block)
        num_features = block.out_features
        if i != len(DENSENET121_BLOCKS) - 1:
            trans = tv_densenet._Transition(num_features, num_features // 2)
            setattr(model.features, f"transition{i + 1}", trans)
            num_features //= 2
    model.features.norm5 = nn.BatchNorm2d(num_features)
    model.classifier = nn.Linear(num_features, num_classes)
    for m in model.modules():  # torchvision's DenseNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0)
    return model


def build_googlenet(num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    model = googlenet(num_classes=num_classes, aux_logits=False, init_weights=True)
    if image_shape[0] != 3:
        model.conv1.conv = replace_conv(model.conv1.conv, image_shape[0], _trunc_normal_googlenet)
    return model


def build_inception_v3(num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    model = inception_v3(num_classes=num_classes, aux_logits=False, init_weights=True)
    if image_shape[0] != 3:
        stem = model.Conv2d_1a_3x3
        stem.conv = replace_conv(stem.conv, image_shape[0], _trunc_normal_inception)
    return model


_VGG_CONFIGS = {"vgg11": "A", "vgg16": "D", "vgg19": "E"}
for _name, _config in _VGG_CONFIGS.items():
    MODELS.add(
        _name,
        ModelEntry(
            builder=_vgg(_config),
            description=f"torchvision {_name} features (five 2x2 max poolings) with a small or ImageNet head",
            knobs=(
                Knob("batchnorm", "bool", False, f"batch normalisation after each convolution ({_name}_bn)"),
                Knob(
                    "head",
                    "str",
                    "small",
                    "small: global average pooling and one 512-wide linear layer; imagenet: torchvision's "
                    "7x7 pooling and two 4096-wide layers with dropout (120M parameters)",
                    choices=("small", "imagenet"),
                ),
            ),
            min_size=32,
        ),
    )

MODELS.add(
    "densenet121",
    ModelEntry(
        builder=build_densenet121,
        description="torchvision densenet121 (ImageNet stem); its dense connections can be thinned",
        knobs=(
            Knob(
                "connections",
                "int|str",
                "all",
                "feature maps each dense layer (and the transition after its block) takes: all "
                "(torchvision's DenseNet) or only the k most recent of its block, the block's input "
                "counting as the first (1: a plain chain without dense connections)",
                choices=("all",),
                minimum=1,
                maximum=25,
            ),
            Knob(
                "growth_rate",
                "int",
                32,
                "channels each dense layer adds (32: torchvision's network; smaller: narrower, for CPU runs)",
                minimum=4,
                maximum=128,
            ),
        ),
        min_size=29,
    ),
)

_FIXED: dict[str, tuple[Callable[..., nn.Module], str, int]] = {
    "googlenet": (build_googlenet, "torchvision GoogLeNet without auxiliary classifiers", 15),
    "inception_v3": (build_inception_v3, "torchvision Inception v3 without the auxiliary classifier", 75),
}
for _name, (_builder, _description, _min_size) in _FIXED.items():
    MODELS.add(_name, ModelEntry(builder=_builder, description=_description, min_size=_min_size))
