"""What a generator file says about itself: the manifest, stored as JSON in the safetensors
metadata under METADATA_KEY. Torch-free, so that the API can read and check it cheaply.

Conventions every registered generator follows: latents are drawn from N(0, I) of shape
(N, latent_dim); `forward(z, labels=None)` returns images in pixel space, values in [0, 1],
shape (N, *image_shape); a class-conditional generator (`num_classes` set) needs `labels`
(N,) int64 in 0..num_classes-1.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.errors import ArtifactError

# The safetensors metadata key that holds the manifest JSON.
METADATA_KEY = "gradleak.generator"
MAX_LATENT_DIM = 4096
MAX_GENERATOR_SIDE = 512


class GeneratorManifest(BaseModel):
    """A generator's architecture, latent size, image shape, classes and training data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str = Field(description="registered generator architecture, e.g. dcgan, dcgan_cond, mlp")
    latent_dim: Annotated[int, Field(ge=1, le=MAX_LATENT_DIM)] = Field(
        description="size of one latent vector; latents are drawn from N(0, I)"
    )
    image_shape: tuple[int, int, int] = Field(description="C, H, W of one generated image (pixels in [0, 1])")
    num_classes: Annotated[int, Field(ge=2, le=100_000)] | None = Field(
        default=None, description="set: the generator is class-conditional and takes labels"
    )
    width: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None, description="channel width (DCGAN's ngf); None: the architecture's default"
    )
    trained_on: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="the data it was trained on: faces, patches, folder:NAME, cifar10, ... or your own words"
    )
    steps: Annotated[int, Field(ge=0)] | None = Field(default=None, description="training steps, if known")
    notes: Annotated[str, Field(max_length=2000)] | None = None

    @field_validator("image_shape")
    @classmethod
    def _shape(cls, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = shape
        if c not in (1, 3):
            raise ValueError(f"image_shape: images have 1 or 3 channels, got {c}")
        if not (8 <= h <= MAX_GENERATOR_SIDE and 8 <= w <= MAX_GENERATOR_SIDE):
            raise ValueError(f"image_shape: sides must lie in 8..{MAX_GENERATOR_SIDE}, got {h}x{w}")
        return shape

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata that carries this manifest."""
        return {METADATA_KEY: self.model_dump_json(exclude_none=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], name: str = "generator") -> GeneratorManifest:
        """The manifest in a file's safetensors metadata; ArtifactError when absent or invalid."""
        text = metadata.get(METADATA_KEY)
        if text is None:
            raise ArtifactError(
                f"{name}: the safetensors metadata has no {METADATA_KEY!r} entry; a generator file "
                "carries its manifest (arch, latent_dim, image_shape, trained_on, ...) as JSON there"
            )
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, ValidationError) as e:
            raise ArtifactError(f"{name}: invalid manifest in {METADATA_KEY!r}: {_errors(e)}") from None


def _errors(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'manifest'}: {err['msg']}" for err in e.errors()[:5]
        )
    return str(e)
