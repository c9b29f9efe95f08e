"""The fused total variation kernels (Triton interpreter on CPU) against the reference.

Tolerances: float64 rtol 1e-12; float32 rtol 1e-5 on the value and 1e-6 of the largest gradient
element on the gradient (fp32 sums over at most a few thousand terms); bfloat16 inputs are exact
in fp32, so the value gets rtol 1e-5, and gradients, rounded to bfloat16 on output, rtol 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import kernels

TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-2)}
# one pixel; one row; one column; primes; wider than one 2048-wide tile (two column blocks)
SHAPES = [(1, 1, 1, 1), (2, 3, 1, 7), (1, 2, 5, 1), (2, 3, 13, 17), (1, 1, 3, 2100)]


def _value_and_grad(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    value = kernels.total_variation(leaf, backend=backend)  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(seed: int, shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    # some integer pixels, so that neighbours tie and sign(0) = 0 is exercised
    x = torch.where(torch.rand(shape) < 0.4, torch.randn(shape).round(), torch.randn(shape)).to(dtype)
    got = _value_and_grad(x, "triton")
    want = _value_and_grad(x.double(), "reference")
    value_rtol, grad_tol = TOLERANCES[dtype]
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype
    torch.testing.assert_close(got[0].double(), want[0], rtol=value_rtol, atol=1e-12)
    scale = float(want[1].abs().max())
    torch.testing.assert_close(got[1].double(), want[1], rtol=grad_tol, atol=grad_tol * scale + 1e-300)


def test_non_contiguous_input(seed: int) -> None:
    x = torch.randn(2, 5, 6, 3).permute(0, 3, 1, 2)  # (2, 3, 5, 6), channels last in memory
    got, want = _value_and_grad(x, "triton"), _value_and_grad(x.double(), "reference")
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-5, atol=1e-7)


def test_vmap_over_restarts_gives_one_value_per_restart(seed: int) -> None:
    x = torch.randn(4, 2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    values = vmap(lambda xi: kernels.total_variation(xi, backend="triton"))(x)
    assert values.shape == (4,)
    (grad,) = torch.autograd.grad((values * torch.arange(1.0, 5.0, dtype=torch.float64)).sum(), x)
    for r in range(4):
        want = _value_and_grad(x[r], "reference")
        torch.testing.assert_close(values[r].detach(), want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad[r], (r + 1) * want[1], rtol=1e-12, atol=1e-12)


def test_gradcheck_through_the_kernels(seed: int) -> None:
    # distinct values: TV is not differentiable where neighbours tie
    x = torch.randperm(12).reshape(1, 1, 3, 4).double().div(7).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: kernels.total_variation(t, backend="triton"), (x,), eps=1e-6)
