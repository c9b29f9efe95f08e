"""Fused total variation (Inverting Gradients' image prior) in Triton, forward and backward.

Forward: one launch, one program per (image plane, band of rows), each reading its tile once
(neighbours come from the same cache lines) and writing one partial already divided by the
element counts; a deterministic `sum` over the partials of each group is the second launch.
Backward: one launch writing, per pixel, g / count times the sum over its horizontal (vertical)
neighbours of sign(pixel - neighbour), with torch.abs's convention that sign(0) = 0.

The Function computes one TV per *group* of consecutive images. The public op uses one group;
the `vmap` staticmethod folds the vmapped dimension into the image dimension and asks for one
group per vmapped sample, so restarts batched with `torch.func.vmap` cost one launch each way.
As with gradient matching, the backward runs through a second Function (torch.func transforms
then hand the kernel plain tensors) that is itself not differentiable.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels.gradmatch import NOT_TWICE_DIFFERENTIABLE, TL_DTYPES, to_front
from kernels.reference import accumulation_dtype

_TILE = 2048  # elements per program and loop step


@triton.jit
def _tv_forward_kernel(
    x,
    partials,
    H,
    W,
    row_blocks,
    count_x,  # |dx| terms per group, N_g C H (W - 1)
    count_y,  # |dy| terms per group, N_g C (H - 1) W
    ACC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    plane = pid // row_blocks
    base = x + plane.to(tl.int64) * H * W
    hs = (pid % row_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    acc_x = tl.zeros([BLOCK_H, BLOCK_W], ACC)
    acc_y = tl.zeros([BLOCK_H, BLOCK_W], ACC)
    for w0 in range(0, W, BLOCK_W):
        ws = w0 + tl.arange(0, BLOCK_W)[None, :]
        inside = (hs < H) & (ws < W)
        v = tl.load(base + hs * W + ws, mask=inside, other=0.0).to(ACC)
        has_right = inside & (ws + 1 < W)
        right = tl.load(base + hs * W + ws + 1, mask=has_right, other=0.0).to(ACC)
        acc_x += tl.where(has_right, tl.abs(right - v), 0.0)
        has_below = inside & (hs + 1 < H)
        below = tl.load(base + (hs + 1) * W + ws, mask=has_below, other=0.0).to(ACC)
        acc_y += tl.where(has_below, tl.abs(below - v), 0.0)
    inv_x = tl.where(count_x > 0, 1.0 / tl.maximum(count_x, 1).to(ACC), 0.0)
    inv_y = tl.where(count_y > 0, 1.0 / tl.maximum(count_y, 1).to(ACC), 0.0)
    sum_x = tl.sum(tl.sum(acc_x, axis=1), axis=0)
    sum_y = tl.sum(tl.sum(acc_y, axis=1), axis=0)
    tl.store(partials + pid, sum_x * inv_x + sum_y * inv_y)


@triton.jit
def _tv_backward_kernel(
    x,
    grad_x,
    grad_out,
    grad_stride,
    planes_per_group,
    H,
    W,
    row_blocks,
    count_x,
    count_y,
    ACC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    plane = pid // row_blocks
    g = tl.load(grad_out + (plane // planes_per_group) * grad_stride).to(ACC)
    g_x = tl.where(count_x > 0, g / tl.maximum(count_x, 1).to(ACC), 0.0)
    g_y = tl.where(count_y > 0, g / tl.maximum(count_y, 1).to(ACC), 0.0)
    offset = plane.to(tl.int64) * H * W
    base = x + offset
    hs = (pid % row_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    for w0 in range(0, W, BLOCK_W):
        ws = w0 + tl.arange(0, BLOCK_W)[None, :]
        inside = (hs < H) & (ws < W)
        here = base + hs * W + ws
        v = tl.load(here, mask=inside, other=0.0).to(ACC)
        has_left = inside & (ws > 0)
        has_right = inside & (ws + 1 < W)
        has_above = inside & (hs > 0)
        has_below = inside & (hs + 1 < H)
        left = tl.load(here - 1, mask=has_left, other=0.0).to(ACC)
        right = tl.load(here + 1, mask=has_right, other=0.0).to(ACC)
        above = tl.load(here - W, mask=has_above, other=0.0).to(ACC)
        below = tl.load(here + W, mask=has_below, other=0.0).to(ACC)
        # sign(v - neighbour) with sign(0) = 0, torch.abs's subgradient
        d_x = tl.where(has_left, (v > left).to(ACC) - (v < left).to(ACC), 0.0)
        d_x += tl.where(has_right, (v > right).to(ACC) - (v < right).to(ACC), 0.0)
        d_y = tl.where(has_above, (v > above).to(ACC) - (v < above).to(ACC), 0.0)
        d_y += tl.where(has_below, (v > below).to(ACC) - (v < below).to(ACC), 0.0)
        value = g_x * d_x + g_y * d_y
        tl.store(grad_x + offset + hs * W + ws, value.to(grad_x.dtype.element_ty), mask=inside)


def _geometry(x: torch.Tensor, groups: int) -> tuple[int, int, int, int, int, int]:
    """(block_h, block_w, row_blocks, count_x, count_y, planes) for x of shape (N, C, H, W)."""
    n, c, h, w = x.shape
    block_w = min(triton.next_power_of_2(w), _TILE)
    block_h = min(triton.next_power_of_2(h), max(1, _TILE // block_w))
    per_group = (n // groups) * c
    return block_h, block_w, triton.cdiv(h, block_h), per_group * h * (w - 1), per_group * (h - 1) * w, n * c


class _TotalVariation(torch.autograd.Function):
    """TV of each group of consecutive images of x (N, C, H, W); output shape (groups,)."""

    @staticmethod
    def forward(x: torch.Tensor, groups: int) -> torch.Tensor:
        x = x.contiguous()
        block_h, block_w, row_blocks, count_x, count_y, planes = _geometry(x, groups)
        acc = accumulation_dtype(x.dtype)
        partials = torch.empty(planes * row_blocks, dtype=acc, device=x.device)
        _tv_forward_kernel[(planes * row_blocks,)](
            x, partials, x.shape[2], x.shape[3], row_blocks, count_x, count_y,
            ACC=TL_DTYPES[acc], BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4,
        )  # fmt: skip
        return partials.view(groups, -1).sum(dim=1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, groups = inputs
        ctx.save_for_backward(x)
        ctx.groups = groups

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return _TotalVariationBackward.apply(x, grad_out, ctx.groups), None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, int | None], x: torch.Tensor, groups: int
    ) -> tuple[torch.Tensor, int | None]:
        dim = in_dims[0]
        if dim is None:
            return _TotalVariation.apply(x, groups), None
        folded = x.movedim(dim, 0)
        folded = folded.reshape(-1, *folded.shape[2:])
        return _TotalVariation.apply(folded, groups * info.batch_size).view(info.batch_size, groups), 0


class _TotalVariationBackward(torch.autograd.Function):
    """dTV/dx for an upstream gradient per group; itself not differentiable."""

    @staticmethod
    def forward(x: torch.Tensor, grad_out: torch.Tensor, groups: int) -> torch.Tensor:
        x = x.contiguous()
        block_h, block_w, row_blocks, count_x, count_y, planes = _geometry(x, groups)
        grad_x = torch.empty_like(x)
        _tv_backward_kernel[(planes * row_blocks,)](
            x, grad_x, grad_out, grad_out.stride(0), planes // groups, x.shape[2], x.shape[3], row_blocks,
            count_x, count_y,
            ACC=TL_DTYPES[accumulation_dtype(x.dtype)], BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4,
        )  # fmt: skip
        return grad_x

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        raise RuntimeError(NOT_TWICE_DIFFERENTIABLE)

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, int | None, int | None],
        x: torch.Tensor,
        grad_out: torch.Tensor,
        groups: int,
    ) -> tuple[torch.Tensor, int]:
        size = info.batch_size
        folded = to_front(x, in_dims[0], size)
        folded = folded.reshape(-1, *folded.shape[2:])
        grad = to_front(grad_out, in_dims[1], size).reshape(-1)
        out = _TotalVariationBackward.apply(folded, grad, groups * size)
        return out.view(size, -1, *out.shape[1:]), 0


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """The fused TV of x (N, C, H, W) as a scalar; arguments are validated by `kernels.total_variation`."""
    return _TotalVariation.apply(x, 1).reshape(())
