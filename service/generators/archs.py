"""The generator architectures: name -> builder(manifest) -> nn.Module.

Every module takes latents (N, latent_dim) and, when class-conditional, labels (N,) and returns
images in [0, 1] of shape (N, *image_shape). `dcgan` keeps the layer layout (and state-dict
names, `main.0.weight` ...) of the PyTorch examples' DCGAN generator, so weights trained with
that recipe load as they are; its tanh output is mapped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from service.errors import SpecError
from service.generators.manifest import GeneratorManifest
from service.registry import Registry

Conditioning = Literal["never", "required", "optional"]


@dataclass(frozen=True)
class GeneratorArch:
    """A registered generator architecture: its builder, what it supports, its default width."""

    builder: Callable[[GeneratorManifest], nn.Module]
    description: str
    conditioning: Conditioning
    default_width: int
    sizes: str  # the image sides it supports, in words

    def describe(self, name: str) -> dict[str, object]:
        return {
            "name": name,
            "description": self.description,
            "conditional": self.conditioning,
            "default_width": self.default_width,
            "sizes": self.sizes,
        }


GENERATOR_ARCHS: Registry[GeneratorArch] = Registry("generator architecture")
DCGAN_SIDES = (32, 64)


def build_generator(manifest: GeneratorManifest) -> nn.Module:
    """The module `manifest` describes, freshly initialised (global RNG), in training mode.

    SpecError for an unknown architecture, a shape it does not support, or a conditioning it
    does not have."""
    if manifest.arch not in GENERATOR_ARCHS:
        raise SpecError(
            f"unknown generator architecture {manifest.arch!r}; valid: {', '.join(GENERATOR_ARCHS.names())}"
        )
    entry = GENERATOR_ARCHS.get(manifest.arch)
    if entry.conditioning == "never" and manifest.conditional:
        raise SpecError(
            f"generator {manifest.arch} is not class-conditional: leave out num_classes, or use "
            + ", ".join(n for n, e in GENERATOR_ARCHS.items() if e.conditioning != "never")
        )
    if entry.conditioning == "required" and not manifest.conditional:
        raise SpecError(f"generator {manifest.arch} is class-conditional: give num_classes")
    return entry.builder(manifest)


def generator_catalog() -> list[dict[str, object]]:
    """Every generator architecture, for the catalog."""
    return [entry.describe(name) for name, entry in GENERATOR_ARCHS.items()]


class _Conditioned(nn.Module):
    """Shared forward checks: latent and label shapes, labels only for conditional generators."""

    latent_dim: int
    num_classes: int | None

    def _inputs(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"latents must have shape (N, {self.latent_dim}), got {list(z.shape)}")
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("this generator is not class-conditional: pass no labels")
            return z
        if labels is None:
            raise ValueError(
                f"this generator is class-conditional: pass labels (N,) in 0..{self.num_classes - 1}"
            )
        if labels.shape != (z.shape[0],):
            raise ValueError(f"labels must have shape ({z.shape[0]},), got {list(labels.shape)}")
        return torch.cat([z, self.embed(labels.long())], dim=1)

    embed: nn.Embedding


def _embedding(num_classes: int, dim: int) -> nn.Embedding:
    """A label embedding left uninitialised (its owner initialises it): nn.Embedding's own
    initialisation on the meta device costs seconds the first time."""
    return nn.Embedding(num_classes, dim, _weight=torch.empty(num_classes, dim))


class DCGANGenerator(_Conditioned):
    """DCGAN (Radford et al.): a 4x4 transposed convolution from the latent, then stride-2
    transposed convolutions with batch norm and ReLU up to the image side, tanh output.
    Conditional: a label embedding of size latent_dim is concatenated to the latent."""

    def __init__(
        self, latent_dim: int, image_shape: tuple[int, int, int], width: int, num_classes: int | None
    ) -> None:
        super().__init__()
        channels, side, _ = image_shape
        self.latent_dim, self.num_classes, self.image_shape = latent_dim, num_classes, image_shape
        if num_classes is not None:
            self.embed = _embedding(num_classes, latent_dim)
        inputs = latent_dim * (2 if num_classes is not None else 1)
        ups = {32: 2, 64: 3}[side]  # stride-2 stages between 4x4 and side/2
        c = width * 2**ups
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(inputs, c, 4, 1, 0, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(True),
        ]
        for _ in range(ups):
            layers += [
                nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c // 2),
                nn.ReLU(True),
            ]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        if self.main[0].weight.is_meta:  # shapes only (upload checks): nothing to initialise
            return
        for m in self.modules():  # the DCGAN paper's initialisation
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
        if num_classes is not None:
            nn.init.normal_(self.embed.weight, 0.0, 1.0)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self._inputs(z, labels)
        out: torch.Tensor = self.main(x[:, :, None, None])
        return (out + 1) / 2


class MLPGenerator(_Conditioned):
    """A small fully connected generator (two hidden layers, sigmoid output), for tests and
    quick experiments; any image shape."""

    def __init__(
        self, latent_dim: int, image_shape: tuple[int, int, int], width: int, num_classes: int | None
    ) -> None:
        super().__init__()
        self.latent_dim, self.num_classes, self.image_shape = latent_dim, num_classes, image_shape
        if num_classes is not None:
            self.embed = _embedding(num_classes, latent_dim)
            if not self.embed.weight.is_meta:
                nn.init.normal_(self.embed.weight)
        inputs = latent_dim * (2 if num_classes is not None else 1)
        pixels = image_shape[0] * image_shape[1] * image_shape[2]
        self.main = nn.Sequential(
            nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, pixels)
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self._inputs(z, labels)
        return torch.sigmoid(self.main(x)).view(-1, *self.image_shape)


def _dcgan(manifest: GeneratorManifest) -> nn.Module:
    _, h, w = manifest.image_shape
    if h != w or h not in DCGAN_SIDES:
        raise SpecError(
            f"generator {manifest.arch} makes square images of side {' or '.join(map(str, DCGAN_SIDES))}; "
            f"image_shape is {'x'.join(map(str, manifest.image_shape))}"
        )
    width = manifest.width or GENERATOR_ARCHS.get(manifest.arch).default_width
    return DCGANGenerator(manifest.latent_dim, manifest.image_shape, width, manifest.num_classes)


def _mlp(manifest: GeneratorManifest) -> nn.Module:
    width = manifest.width or GENERATOR_ARCHS.get("mlp").default_width
    return MLPGenerator(manifest.latent_dim, manifest.image_shape, width, manifest.num_classes)


GENERATOR_ARCHS.add(
    "dcgan",
    GeneratorArch(
        _dcgan,
        "DCGAN generator (PyTorch examples layout), tanh mapped to [0, 1]",
        "never",
        64,
        "32 or 64, square",
    ),
)
GENERATOR_ARCHS.add(
    "dcgan_cond",
    GeneratorArch(
        _dcgan,
        "class-conditional DCGAN generator: a label embedding concatenated to the latent",
        "required",
        64,
        "32 or 64, square",
    ),
)
GENERATOR_ARCHS.add(
    "mlp",
    GeneratorArch(_mlp, "small fully connected generator (tests, quick experiments)", "optional", 64, "any"),
)
