"""Small architectures of the gradient-leakage literature: an MLP, DLG's LeNet and a ConvNet whose
micro-design (width, depth, activation, pooling, normalisation ...) the SoK varies."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from service.errors import SpecError
from service.models.base import MODELS, Knob, ModelEntry, conv_out

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def build_mlp(
    num_classes: int, image_shape: tuple[int, int, int], *, width: int, depth: int, activation: str
) -> nn.Module:
    c, h, w = image_shape
    layers: list[nn.Module] = [nn.Flatten()]
    features = c * h * w
    for _ in range(depth):
        layers += [nn.Linear(features, width), ACTIVATIONS[activation]()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """The LeNet of "Deep Leakage from Gradients" (Zhu et al.); its module names match the DLG
    code, so that its state dicts load here."""

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int],
        width: int,
        activation: str,
        init: str = "uniform",
    ):
        super().__init__()
        c, h, w = image_shape
        act = ACTIVATIONS[activation]
        self.body = nn.Sequential(
            nn.Conv2d(c, width, kernel_size=5, padding=2, stride=2),
            act(),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=2),
            act(),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=1),
            act(),
        )
        h, w = conv_out(conv_out(h, 5, 2, 2), 5, 2, 2), conv_out(conv_out(w, 5, 2, 2), 5, 2, 2)
        self.fc = nn.Sequential(nn.Linear(width * h * w, num_classes))
        # "uniform" is DLG's initialisation (its code's weights_init: every weight and bias
        # U(-0.5, 0.5)); "pytorch" keeps PyTorch's default layer initialisation, bound 1/sqrt(fan_in)
        # (0.04 to 0.12 here, four to fourteen times narrower).
        if init == "uniform":
            for p in self.parameters():
                nn.init.uniform_(p, -0.5, 0.5)
        elif init != "pytorch":
            raise SpecError(f"knob 'init' of lenet must be 'uniform' or 'pytorch', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def build_lenet(
    num_classes: int, image_shape: tuple[int, int, int], *, width: int, activation: str, init: str
) -> nn.Module:
    return LeNet(num_classes, image_shape, width, activation, init)


def build_convnet(
    num_classes: int,
    image_shape: tuple[int, int, int],
    *,
    width: int,
    depth: int,
    bias: bool,
    relu: bool,
    dropout: float,
    maxpool: bool,
    kernel_size: int,
    padding: int | str,
    batchnorm: bool,
) -> nn.Module:
    if kernel_size % 2 == 0:
        raise SpecError(f"knob 'kernel_size' of convnet must be odd, got {kernel_size}")
    pad = kernel_size // 2 if padding == "same" else int(padding)
    c, h, w = image_shape
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Conv2d(c if i == 0 else width, width, kernel_size, padding=pad, bias=bias))
        h, w = conv_out(h, kernel_size, pad), conv_out(w, kernel_size, pad)
        if batchnorm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU() if relu else nn.Identity())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        if maxpool:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        if min(h, w) < 1:
            raise SpecError(
                f"convnet with these knobs shrinks a {image_shape[1]}x{image_shape[2]} image to nothing "
                f"in block {i}; use fewer blocks, maxpool=false or more padding"
            )
    layers += [nn.Flatten(), nn.Linear(width * h * w, num_classes, bias=bias)]
    return nn.Sequential(*layers)


_ACTIVATION_CHOICES = tuple(ACTIVATIONS)

MODELS.add(
    "mlp",
    ModelEntry(
        builder=build_mlp,
        description="fully connected network: flatten, `depth` hidden layers of `width` units, linear head",
        knobs=(
            Knob("width", "int", 256, "units per hidden layer", minimum=1, maximum=65536),
            Knob(
                "depth", "int", 2, "number of hidden layers (0: a linear classifier)", minimum=0, maximum=64
            ),
            Knob(
                "activation", "str", "relu", "activation after each hidden layer", choices=_ACTIVATION_CHOICES
            ),
        ),
    ),
)

MODELS.add(
    "lenet",
    ModelEntry(
        builder=build_lenet,
        description="the LeNet of Deep Leakage from Gradients: three 5x5 convolutions (stride 2, 2, 1), "
        "sigmoid, a linear head; DLG's uniform(-0.5, 0.5) initialisation by default (knob init)",
        knobs=(
            Knob("width", "int", 12, "channels of every convolution", minimum=1, maximum=4096),
            Knob(
                "activation",
                "str",
                "sigmoid",
                "activation after each convolution",
                choices=("sigmoid", "relu"),
            ),
            Knob(
                "init",
                "str",
                "uniform",
                "initialisation: uniform = DLG's, every weight and bias uniform in [-0.5, 0.5] (wide, "
                "leaks more); pytorch = PyTorch's default layer initialisation (Kaiming-uniform, "
                "narrower)",
                choices=("uniform", "pytorch"),
            ),
        ),
    ),
)

MODELS.add(
    "convnet",
    ModelEntry(
        builder=build_convnet,
        description="plain ConvNet: `depth` blocks conv -> [batchnorm] -> [relu] -> [dropout] -> "
        "[maxpool], then a linear head; the micro-design knobs of the SoK",
        knobs=(
            Knob("width", "int", 64, "channels of every convolution", minimum=1, maximum=4096),
            Knob("depth", "int", 3, "number of conv blocks", minimum=1, maximum=64),
            Knob("bias", "bool", True, "bias terms in the convolutions and the head"),
            Knob(
                "relu", "bool", True, "ReLU after each convolution (false: no activation, a linear network)"
            ),
            Knob(
                "dropout",
                "float",
                0.0,
                "dropout probability after each block (0: none)",
                minimum=0,
                maximum=0.99,
            ),
            Knob("maxpool", "bool", True, "2x2 max pooling at the end of each block"),
            Knob("kernel_size", "int", 3, "convolution kernel size (odd)", minimum=1, maximum=31),
            Knob(
                "padding",
                "int|str",
                "same",
                "convolution padding: 'same' keeps the size, or a number of pixels",
                choices=("same",),
                minimum=0,
                maximum=32,
            ),
            Knob("batchnorm", "bool", False, "batch normalisation after each convolution"),
        ),
    ),
)


def build_igconvnet(num_classes: int, image_shape: tuple[int, int, int], *, width: int) -> nn.Module:
    """The ConvNet of Inverting Gradients (Geiping et al.), also breaching's "ConvNet": eight 3x3
    conv -> batch norm -> ReLU blocks of width w, 2w, 2w, 4w, 4w, 4w, 4w, 4w with a 3x3 max pool
    after the sixth and the eighth, and a linear head; PyTorch's default initialisation."""
    c, h, w = image_shape
    channels = [c, width, 2 * width, 2 * width, 4 * width, 4 * width, 4 * width, 4 * width, 4 * width]
    layers: list[nn.Module] = []
    for i in range(8):
        layers += [
            nn.Conv2d(channels[i], channels[i + 1], kernel_size=3, padding=1),
            nn.BatchNorm2d(channels[i + 1]),
            nn.ReLU(),
        ]
        if i in (5, 7):
            layers.append(nn.MaxPool2d(3))
    h, w = h // 3 // 3, w // 3 // 3
    layers += [nn.Flatten(), nn.Linear(4 * width * h * w, num_classes)]
    return nn.Sequential(*layers)


MODELS.add(
    "igconvnet",
    ModelEntry(
        builder=build_igconvnet,
        description="the 8-layer batch-norm ConvNet of Inverting Gradients and breaching: widths w, 2w, "
        "2w, 4w x5, two 3x3 max pools, a linear head",
        knobs=(Knob("width", "int", 64, "channels of the first convolution (w)", minimum=1, maximum=1024),),
        min_size=9,  # two 3x3 max pools
    ),
)
