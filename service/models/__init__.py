"""The architecture registry. Importing this package registers every architecture."""

from service.models import resnet, simple, vision
from service.models.base import (
    MODELS,
    WEIGHT_CONTRACT,
    Builder,
    Knob,
    ModelEntry,
    build_model,
    catalog,
    weight_names,
)
from service.models.resnet import cut_skip_connections, residual_blocks

__all__ = [
    "MODELS",
    "WEIGHT_CONTRACT",
    "Builder",
    "Knob",
    "ModelEntry",
    "build_model",
    "catalog",
    "cut_skip_connections",
    "residual_blocks",
    "resnet",
    "simple",
    "vision",
    "weight_names",
]
