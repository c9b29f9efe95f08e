"""The architecture registry. Importing this package registers every architecture."""

from service.models import resnet, simple, vision
from service.models.base import MODELS, Builder, Knob, ModelEntry, build_model, catalog
from service.models.resnet import cut_skip_connections, residual_blocks

__all__ = [
    "MODELS",
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
]
