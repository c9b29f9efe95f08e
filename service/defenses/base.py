"""The defense registry and the one way to apply a list of defenses to an update.

A defense is a pure function of a parameter update (name -> tensor): it returns a new dict and
never touches its input. Randomness comes only from the torch.Generator passed in, seeded from
the job seed, so a job's defended update is reproducible on any device. Non-floating tensors
(step counters) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.registry import Registry
from service.specs import DefenseSpec

Update = dict[str, Tensor]


@dataclass(frozen=True)
class Defense:
    """A registered defense: what it does, its parameters' spec class, and the function."""

    description: str
    spec_type: type[Any]
    apply: Callable[[Mapping[str, Tensor], Any, torch.Generator], Update]


DEFENSES: Registry[Defense] = Registry("defense")


def apply_defenses(
    update: Mapping[str, Tensor], specs: Sequence[DefenseSpec], generator: torch.Generator
) -> Update:
    """Apply the defenses in the order given; an empty list returns a new dict of the same tensors."""
    out = dict(update)
    for spec in specs:
        out = DEFENSES.get(spec.name).apply(out, spec, generator)
    return out


def catalog() -> list[dict[str, Any]]:
    """Defenses with their description and their parameters' JSON schema."""
    return [
        {"name": name, "description": d.description, "parameters": d.spec_type.model_json_schema()}
        for name, d in DEFENSES.items()
    ]


def map_floating(update: Mapping[str, Tensor], fn: Callable[[Tensor], Tensor]) -> Update:
    """Apply `fn` to every floating tensor (detached); other tensors are copied through unchanged."""
    return {k: fn(v.detach()) if v.is_floating_point() else v.detach().clone() for k, v in update.items()}


def random_uniform(like: Tensor, generator: torch.Generator) -> Tensor:
    """U[0, 1) draws shaped like `like`, made on the generator's device then moved: same draws anywhere."""
    return torch.rand(like.shape, generator=generator, device=generator.device).to(like.device, like.dtype)
