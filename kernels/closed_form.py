"""The reference matching loss with its backward in closed form: the CPU path of plain autograd.

`kernels.reference` writes the loss with ordinary torch ops, so autograd records about six nodes
per layer (reshape, cast, multiply, sum, stack, ...) and replays them backwards on every attack
iteration: for ResNet-18's 62 tensors, several hundred small ops forward and backward. The loss
only needs two numbers per layer, though, and its derivative with respect to a candidate layer
is a linear combination of that layer and its target:

    l2:      dL/dc_l = 2 dL/ddd_l (c_l - t_l)
    cosines: dL/dc_l = dL/ddot_l t_l + 2 dL/dcc_l c_l

`ClosedFormMatching` computes the statistics with one dot product per statistic and layer, gets
dL/d(statistics) by differentiating `reference.matching_loss_from_statistics` on the (L,)-sized
statistics (so the epsilon and clamp conventions are the reference's, not a second copy), and
forms every layer's gradient in two passes over its memory. The Triton kernels do the same on CUDA.

Its backward is not itself differentiable (`once_differentiable`): attacks differentiate the loss
once with respect to candidates that carry the second-order graph, which is all they need.
It is used for plain (non-functorch) tensors only; under torch.func transforms (batched restarts)
the reference ops run, which vmap and grad handle natively.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from kernels.reference import Cost, Statistics, accumulation_dtype, matching_loss_from_statistics


def usable(candidate: Sequence[torch.Tensor]) -> bool:
    """True when the candidates are plain tensors (not wrapped by a torch.func transform)."""
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(is_wrapped(c) for c in candidate)


def _statistics(
    cost: Cost, cands: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], acc: torch.dtype
) -> Statistics:
    flat_c = [c.reshape(-1).to(acc) for c in cands]
    flat_t = [t.reshape(-1).to(acc) for t in targets]
    if cost == "l2":
        diffs = torch._foreach_sub(flat_c, flat_t)
        dd = torch.stack([torch.dot(d, d) for d in diffs])
        return Statistics(None, None, dd.unsqueeze(0))
    dot = torch.stack([torch.dot(c, t) for c, t in zip(flat_c, flat_t, strict=True)])
    cc = torch.stack([torch.dot(c, c) for c in flat_c])
    return Statistics(dot.unsqueeze(0), cc.unsqueeze(0), None)


class ClosedFormMatching(torch.autograd.Function):
    """loss = matching_loss(cands, targets); inputs after `targets` are the candidate tensors."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        cost: Cost,
        targets: Sequence[torch.Tensor],
        tt: torch.Tensor,
        weights: torch.Tensor,
        eps: float,
        *cands: torch.Tensor,
    ) -> torch.Tensor:
        acc = accumulation_dtype(cands[0].dtype)
        stats = _statistics(cost, cands, targets, acc)
        tt, weights = tt.to(acc), weights.to(acc)
        with torch.enable_grad():
            leaves = Statistics(*(s.detach().requires_grad_() if s is not None else None for s in stats))
            loss = matching_loss_from_statistics(cost, leaves, tt, weights, eps)[0]
            present = [s for s in leaves if s is not None]
            coeffs = torch.autograd.grad(loss, present)
        ctx.cost = cost
        ctx.targets = targets
        ctx.save_for_backward(*(c[0] for c in coeffs), *cands)
        return loss.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        g = float(grad_loss)
        targets: Sequence[torch.Tensor] = ctx.targets
        out: list[torch.Tensor] = []
        if ctx.cost == "l2":
            (d_dd,), cands = saved[:1], saved[1:]
            acc = d_dd.dtype
            for c, t, s in zip(cands, targets, (2.0 * g * d_dd).tolist(), strict=True):
                out.append(torch.sub(c.to(acc), t.to(acc)).mul_(s).to(c.dtype))
        else:
            (d_dot, d_cc), cands = saved[:2], saved[2:]
            acc = d_dot.dtype
            coeffs = zip(cands, targets, (g * d_dot).tolist(), (2.0 * g * d_cc).tolist(), strict=True)
            for c, t, a, b in coeffs:
                out.append(torch.mul(c.to(acc), b).add_(t.to(acc), alpha=a).to(c.dtype))
        return (None, None, None, None, None, *out)


def matching_loss(
    candidate: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    *,
    cost: Cost,
    weights: torch.Tensor,
    eps: float,
    sq_norms: torch.Tensor,
) -> torch.Tensor:
    """`reference.gradient_matching_loss` with the closed-form backward (plain tensors only)."""
    loss: torch.Tensor = ClosedFormMatching.apply(cost, list(target), sq_norms, weights, eps, *candidate)
    return loss
