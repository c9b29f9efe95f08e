"""gradleak's kernels: gradient matching losses and total variation for gradient inversion.

Every attack iteration compares the reconstruction's parameter gradients with the client's, layer
by layer. The ops here do that for a whole gradient list at once: fused Triton kernels on CUDA
(a handful of launches for any number of layers), the plain-torch specification in
`kernels.reference` elsewhere. Semantics, epsilon handling and precision are defined in
`kernels.reference`; both backends implement them and are tested against each other.

Backend choice. ``backend="triton"`` or ``"reference"`` is obeyed as given. ``"auto"`` (the
default) first looks for an override, `set_backend(...)` or else the environment variable
``GRADLEAK_KERNELS`` (auto | triton | reference), both read at call time; it then picks Triton
when triton imports and the tensors are CUDA tensors of one supported dtype, and otherwise the
reference's statistics with the closed-form backward of `kernels.closed_form` (plain tensors) or
the reference ops themselves (under torch.func transforms, e.g. vmapped restarts). Triton on CPU
tensors needs ``TRITON_INTERPRET=1`` set before triton is first imported (this is how the tests
run the kernels); without it ``backend="triton"`` on CPU tensors raises `BackendUnavailableError`.

This package imports torch only; triton is imported on first use.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Literal, cast, get_args

import torch

from kernels import closed_form, reference
from kernels.errors import BackendUnavailableError, KernelInputError
from kernels.reference import COSTS, Cost, accumulation_dtype
from kernels.targets import FLOAT_DTYPES, PackedTargets, pack_targets, select_layers

Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
BACKEND_ENV = "GRADLEAK_KERNELS"

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "COSTS",
    "Backend",
    "BackendUnavailableError",
    "Cost",
    "KernelInputError",
    "PackedTargets",
    "batched_gradient_matching_loss",
    "get_backend",
    "gradient_matching_loss",
    "pack_targets",
    "set_backend",
    "total_variation",
    "triton_available",
]

_override: Backend | None = None


@functools.cache
def triton_available() -> bool:
    """True when triton and gradleak's Triton kernels import in this process."""
    try:
        import kernels.gradmatch  # noqa: F401
    except ImportError:
        return False
    return True


def set_backend(backend: Backend | None) -> None:
    """Make every ``backend="auto"`` call in this process use `backend`; None restores the
    default (the ``GRADLEAK_KERNELS`` variable, then automatic choice)."""
    global _override
    if backend is not None and backend not in BACKENDS:
        raise KernelInputError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    _override = backend


def get_backend() -> Backend:
    """The backend ``"auto"`` stands for right now: the `set_backend` override, else the
    ``GRADLEAK_KERNELS`` variable, else ``"auto"`` (choose per call from the tensors)."""
    if _override is not None:
        return _override
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise KernelInputError(
            f"{BACKEND_ENV}={value!r} is not a kernel backend; valid: {', '.join(BACKENDS)}"
        )
    return cast(Backend, value)


def _uniform_supported_dtype(tensors: Sequence[torch.Tensor]) -> bool:
    from kernels.gradmatch import SUPPORTED_DTYPES

    first = tensors[0].dtype
    return first in SUPPORTED_DTYPES and all(t.dtype == first for t in tensors)


Resolved = Literal["triton", "closed_form", "reference"]


def _resolve_backend(
    backend: str, tensors: Sequence[torch.Tensor], *, closed_form_ok: bool = False
) -> Resolved:
    """What computes the op: an explicit backend as given, else the override, else Triton for
    CUDA tensors it supports, the closed form for plain tensors where the op has one
    (`closed_form_ok`), and the reference ops otherwise."""
    if backend not in BACKENDS:
        raise KernelInputError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = get_backend()
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise BackendUnavailableError(
                "backend='triton' needs the triton package, which does not import here"
            )
        from kernels.gradmatch import check_runnable

        check_runnable(tensors)
        if not _uniform_supported_dtype(tensors):
            names = sorted({str(t.dtype) for t in tensors})
            raise KernelInputError(
                "backend='triton' needs tensors of one dtype among float32, bfloat16, float16, float64; "
                f"got {names}"
            )
        return "triton"
    if tensors[0].device.type == "cuda" and triton_available():
        from kernels.gradmatch import INTERPRETED

        if not INTERPRETED and _uniform_supported_dtype(tensors):
            return "triton"
    if closed_form_ok and closed_form.usable(tensors):
        return "closed_form"
    return "reference"


def _layer_weights(
    layer_weights: Sequence[float] | torch.Tensor | None,
    num_layers: int,
    device: torch.device,
    dtype: torch.dtype,
    packed: PackedTargets | None,
) -> torch.Tensor:
    """The weights as a (num_layers,) tensor on `device`; fixed weights are cached on `packed`."""
    if isinstance(layer_weights, torch.Tensor):
        if layer_weights.requires_grad:
            raise KernelInputError("layer weights are constants; pass a tensor that does not require grad")
        if layer_weights.shape != (num_layers,):
            raise KernelInputError(
                f"layer_weights has shape {tuple(layer_weights.shape)}, "
                f"expected ({num_layers},): one weight per layer used"
            )
        # Values of a device tensor are not inspected: that would synchronise every call.
        if layer_weights.device.type == "cpu":
            _check_weight_values(layer_weights.tolist())
        return layer_weights.to(device=device, dtype=dtype)
    values = (1.0,) * num_layers if layer_weights is None else tuple(float(w) for w in layer_weights)
    cache: dict[tuple[tuple[float, ...], torch.dtype], torch.Tensor] = (
        {} if packed is None else packed.cache.setdefault("weights", {})
    )
    key = (values, dtype)
    if key not in cache:  # checked once per distinct weights and job: this runs every iteration
        if len(values) != num_layers:
            raise KernelInputError(f"got {len(values)} layer weights for {num_layers} layers used")
        _check_weight_values(values)
        cache[key] = torch.tensor(values, dtype=dtype, device=device)
    return cache[key]


def _check_weight_values(values: Sequence[float]) -> None:
    if not all(math.isfinite(w) and w >= 0.0 for w in values):
        raise KernelInputError("layer weights must be finite and non-negative")


def _matching(
    candidate: Sequence[torch.Tensor],
    target: PackedTargets | Sequence[torch.Tensor],
    *,
    cost: Cost,
    layer_weights: Sequence[float] | torch.Tensor | None,
    layers: Sequence[int] | None,
    eps: float,
    backend: Backend,
    batched: bool,
) -> torch.Tensor:
    if cost not in COSTS:
        raise KernelInputError(f"unknown matching cost {cost!r}; valid: {', '.join(COSTS)}")
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise KernelInputError(f"eps must be a positive finite number, got {eps!r}")
    candidate = list(candidate)

    packed: PackedTargets | None = None
    target_list: list[torch.Tensor] = []
    if isinstance(target, PackedTargets):
        packed = target
        if layers is not None and tuple(int(i) for i in layers) != packed.layers:
            raise KernelInputError(
                f"the targets were packed for layers {list(packed.layers)}, "
                f"but layers={list(layers)} was asked for"
            )
        chosen, num_tensors, shapes = packed.layers, packed.num_tensors, packed.shapes
        device = packed.device
    else:
        target_list = list(target)
        if len(target_list) != len(candidate):
            raise KernelInputError(
                f"{len(candidate)} candidate gradients but {len(target_list)} target gradients"
            )
        chosen = select_layers(len(target_list), layers)
        selected = [target_list[i] for i in chosen]
        if not all(isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES for t in selected):
            raise KernelInputError("every target gradient must be a floating torch.Tensor")
        num_tensors, shapes = len(target_list), tuple(t.shape for t in selected)
        device = selected[0].device
        if any(t.device != device for t in selected):
            raise KernelInputError("the target gradients are on several devices")
    if len(candidate) != num_tensors:
        raise KernelInputError(f"{len(candidate)} candidate gradients for {num_tensors} target gradients")

    cands = [candidate[i] for i in chosen]
    _check_candidates(cands, chosen, shapes, device, batched)
    backend_used = _resolve_backend(backend, cands, closed_form_ok=not batched)
    acc = accumulation_dtype(cands[0].dtype)
    weights = _layer_weights(layer_weights, len(chosen), device, acc, packed)

    if backend_used != "triton":
        if packed is not None:
            targets, sq_norms = packed.views(), packed.sq_norms
        else:
            targets, sq_norms = [target_list[i].detach() for i in chosen], None
        if backend_used == "closed_form":
            if sq_norms is None:
                sq_norms = reference.target_sq_norms(targets)
            return closed_form.matching_loss(
                cands, targets, cost=cost, weights=weights, eps=float(eps), sq_norms=sq_norms
            )
        ref = reference.batched_gradient_matching_loss if batched else reference.gradient_matching_loss
        return ref(cands, targets, cost=cost, weights=weights, eps=float(eps), sq_norms=sq_norms)

    from kernels.gradmatch import gradient_matching

    if packed is None:
        packed = pack_targets(target_list, layers=chosen)
    return gradient_matching(packed, cands, cost=cost, weights=weights, eps=float(eps), batched=batched)


def _check_candidates(
    cands: Sequence[torch.Tensor],
    chosen: Sequence[int],
    shapes: Sequence[torch.Size],
    device: torch.device,
    batched: bool,
) -> None:
    # Runs every attack iteration: the common case is one comparison per property and tensor.
    first = cands[0]
    rows = first.shape[0] if batched and isinstance(first, torch.Tensor) and first.dim() else None
    for index, c, shape in zip(chosen, cands, shapes, strict=True):
        if not isinstance(c, torch.Tensor):
            raise KernelInputError(f"candidate gradient {index} is a {type(c).__name__}, not a torch.Tensor")
        if c.device != device:
            raise KernelInputError(f"candidate gradient {index} is on {c.device}, the targets on {device}")
        if c.dtype not in FLOAT_DTYPES:
            raise KernelInputError(
                f"candidate gradient {index} has dtype {c.dtype}; a floating dtype is needed"
            )
        if (c.dim() == 0 or c.shape[1:] != shape or c.shape[0] != rows) if batched else c.shape != shape:
            what = f"(R={rows}, *{tuple(shape)})" if batched else str(tuple(shape))
            raise KernelInputError(f"candidate gradient {index} has shape {tuple(c.shape)}, expected {what}")
    if batched and not rows:
        raise KernelInputError("batched candidates need a leading restart dimension of size at least 1")


def gradient_matching_loss(
    candidate: Sequence[torch.Tensor],
    target: PackedTargets | Sequence[torch.Tensor],
    *,
    cost: Cost = "cosine",
    layer_weights: Sequence[float] | torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    eps: float = 1e-8,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Scalar distance between the reconstruction's gradients and the client's.

    `candidate` is the full gradient list (same length and shapes as the targets). `layers`
    restricts the loss to those tensor indices (targets packed with `layers` carry them already);
    `layer_weights` has one non-negative weight per layer used, default 1. `target` is best
    packed once per job with `pack_targets`; a plain list is packed (Triton) or used as is
    (reference) on every call. The loss is float32 (float64 for float64 candidates) and
    differentiable w.r.t. the candidate, also when the candidate came from
    ``torch.autograd.grad(..., create_graph=True)``.
    """
    return _matching(
        candidate, target, cost=cost, layer_weights=layer_weights, layers=layers, eps=eps, backend=backend,
        batched=False,
    )  # fmt: skip


def batched_gradient_matching_loss(
    candidate: Sequence[torch.Tensor],
    target: PackedTargets | Sequence[torch.Tensor],
    *,
    cost: Cost = "cosine",
    layer_weights: Sequence[float] | torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    eps: float = 1e-8,
    backend: Backend = "auto",
) -> torch.Tensor:
    """`gradient_matching_loss` for R restarts at once: candidate[i] has shape (R, *target[i].shape)
    and the result has shape (R,), entry r equal to the loss of restart r's slices. The targets
    (and weights) are shared by all restarts. Calling `gradient_matching_loss` under
    ``torch.func.vmap`` gives the same result through the same batched kernels."""
    return _matching(
        candidate, target, cost=cost, layer_weights=layer_weights, layers=layers, eps=eps, backend=backend,
        batched=True,
    )  # fmt: skip


def total_variation(x: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """Total variation of images x (N, C, H, W): mean |horizontal difference| + mean |vertical
    difference| over all images and channels, a scalar in float32 (float64 for float64 x)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.numel() == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelInputError(f"total_variation needs a non-empty (N, C, H, W) tensor, got {shape}")
    if x.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"total_variation needs a floating tensor, got {x.dtype}")
    if _resolve_backend(backend, [x]) == "reference":
        return reference.total_variation(x)
    from kernels.tv import total_variation as fused_total_variation

    return fused_total_variation(x)
