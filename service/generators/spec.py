"""The generator training spec: what the service's training job (`POST /v1/generator-trainings`)
trains, as one frozen, torch-free object. It says the same as `gradleak generator train`'s flags,
except that the images come from what the service may read: the shipped faces, the photo-patch
task, or an image set the tenant uploaded (`POST /v1/ground-truth`), never a path on the worker.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from service.specs import Frozen, YamlSpec

MAX_STEPS = 200_000


class TrainingImages(Frozen):
    """The images a generator is trained on."""

    source: Literal["faces", "patches", "images"] = Field(
        default="faces",
        description="faces: the 100 shipped LFW faces; patches: the offline photo-patch task "
        "(crops of shipped photos, labelled by photo); images: an uploaded image set (gt_ id in `images`)",
    )
    images: str | None = Field(
        default=None,
        description="source images: a ground-truth upload (POST /v1/ground-truth) of this tenant; "
        "its labels, if any, are the classes of a conditional generator",
    )
    per_class: Annotated[int, Field(ge=1, le=2_000)] = Field(
        default=500,
        description="patches: crops per photo (all held in memory: 2000 x 10 photos at 64x64 is 1 GB)",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainingImages:
        if (self.source == "images") != (self.images is not None):
            raise ValueError(
                "data.images names the uploaded image set (a gt_ id) when data.source is 'images', "
                "and only then"
            )
        return self


class GeneratorTrainingSpec(YamlSpec):
    """A DCGAN trained with `service.generators.train`'s recipe (hinge loss, spectral-norm
    discriminator, differentiable augmentation, EMA); the result is a generator upload (gen_ id)."""

    what: ClassVar[str] = "generator training spec"

    data: TrainingImages = Field(default_factory=TrainingImages)
    image_size: Literal[32, 64] = 32
    channels: Literal[1, 3] = 3
    conditional: bool = Field(
        default=False, description="a class-conditional generator (dcgan_cond); needs labelled images"
    )
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = Field(
        default=3000, description="generator steps (3000 at width 32 gives recognisable 32x32 faces)"
    )
    # the bounds keep a run within a worker's memory: the largest (64x64, width 128, batch 256)
    # peaked at 2.3 GiB on CPU
    batch_size: Annotated[int, Field(ge=2, le=256)] = 64
    width: Annotated[int, Field(ge=4, le=128)] = 32
    latent_dim: Annotated[int, Field(ge=2, le=1024)] = 100
    lr: Annotated[float, Field(gt=0, le=0.01)] = 2e-4
    loss: Literal["hinge", "bce"] = "hinge"
    augment: bool = Field(default=True, description="random translation and cutout of real and fake images")
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.999
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    checkpoint_every: Annotated[int, Field(ge=10, le=MAX_STEPS)] = Field(
        default=500,
        description="steps between checkpoints; a run whose worker dies resumes from the last one",
    )
    time_limit_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = Field(
        default=None,
        description="wall-clock limit of the training; when it is up the run ends with the generator "
        "it has (succeeded, fewer steps); the service sets its default",
    )
