"""The client's gradients, packed once per job.

A job compares thousands of candidate gradient lists with one target list, so everything that
depends only on the target is done here, once: the tensors are copied into one flat buffer, each
layer starting at a multiple of `ALIGN_ELEMENTS` (16 elements, at least 16 bytes, so that the
Triton kernels can use vector loads on every layer), and their squared norms are summed in
float64. The Triton launcher adds its chunk table and pointer tables to `cache` lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels.errors import KernelInputError
from kernels.reference import target_sq_norms

ALIGN_ELEMENTS = 16
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True, eq=False)
class PackedTargets:
    """Target gradients of the selected layers in one flat buffer (see module docstring).

    `layers[i]` is the index, in the full gradient list, of packed layer i; `num_tensors` is the
    length of that full list, which every candidate list must have.
    """

    flat: torch.Tensor
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    layers: tuple[int, ...]
    num_tensors: int
    sq_norms: torch.Tensor
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.shapes)

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(s.numel() for s in self.shapes)

    @property
    def device(self) -> torch.device:
        return self.flat.device

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.dtype

    def views(self) -> list[torch.Tensor]:
        """The packed target layers as tensors of their original shapes (views, made once)."""
        views: list[torch.Tensor] | None = self.cache.get("views")
        if views is None:
            views = [
                self.flat.narrow(0, off, shape.numel()).view(shape)
                for off, shape in zip(self.offsets, self.shapes, strict=True)
            ]
            self.cache["views"] = views
        return list(views)


def select_layers(num_tensors: int, layers: Sequence[int] | None) -> tuple[int, ...]:
    """Validated, ordered layer indices; all of them when `layers` is None."""
    if layers is None:
        return tuple(range(num_tensors))
    chosen = tuple(int(i) for i in layers)
    if not chosen:
        raise KernelInputError("layers must name at least one gradient tensor")
    bad = [i for i in chosen if not 0 <= i < num_tensors]
    if bad:
        raise KernelInputError(f"layer indices {bad} are out of range for {num_tensors} gradient tensors")
    if len(set(chosen)) != len(chosen):
        raise KernelInputError(f"layer indices must be distinct, got {list(chosen)}")
    return chosen


def pack_targets(
    target_grads: Sequence[torch.Tensor], *, layers: Sequence[int] | None = None
) -> PackedTargets:
    """Pack the client's gradients (all of them, or the `layers` subset) for repeated matching."""
    target_grads = list(target_grads)
    if not target_grads:
        raise KernelInputError("the target gradient list is empty")
    if not all(isinstance(t, torch.Tensor) for t in target_grads):
        raise KernelInputError("every target gradient must be a torch.Tensor")
    chosen = select_layers(len(target_grads), layers)
    selected = [target_grads[i].detach() for i in chosen]
    devices = {t.device for t in selected}
    if len(devices) != 1:
        raise KernelInputError(f"target gradients are on several devices: {sorted(map(str, devices))}")
    dtypes = {t.dtype for t in selected}
    if len(dtypes) != 1 or next(iter(dtypes)) not in FLOAT_DTYPES:
        names = sorted(str(d) for d in dtypes)
        raise KernelInputError(f"target gradients must share one floating dtype, got {names}")
    if any(t.numel() == 0 for t in selected):
        raise KernelInputError("a target gradient tensor has no elements")

    offsets, total = [], 0
    for t in selected:
        offsets.append(total)
        total += -(-t.numel() // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
    (dtype,), (device,) = dtypes, devices
    flat = torch.zeros(total, dtype=dtype, device=device)
    for off, t in zip(offsets, selected, strict=True):
        flat.narrow(0, off, t.numel()).copy_(t.reshape(-1))
    return PackedTargets(
        flat=flat,
        shapes=tuple(t.shape for t in selected),
        offsets=tuple(offsets),
        layers=chosen,
        num_tensors=len(target_grads),
        sq_norms=target_sq_norms(selected),
    )
