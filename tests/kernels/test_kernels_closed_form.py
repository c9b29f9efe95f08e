"""The closed-form CPU path (kernels.closed_form) against the reference, on fresh inputs each run.

Value and gradient of every cost with random layer weights, in float64 to 1e-10 (relative), on
ResNet-18's 62 shapes (channels / 8) plus zero-norm layers on both sides; float32 and bfloat16
against the float64 reference with tolerances of their precision; the dispatch uses it for plain
tensors and the reference ops under torch.func; a second derivative through it raises instead of
returning a wrong number.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import closed_form, pack_targets, reference


def _case(shapes: list[torch.Size], dtype: torch.dtype, zero: bool) -> tuple[list, list, torch.Tensor]:
    targets = [torch.randn(s, dtype=torch.float64) for s in shapes]
    cands = [torch.randn(s, dtype=torch.float64) for s in shapes]
    if zero:
        targets[1].zero_()
        cands[2].zero_()
    weights = torch.rand(len(shapes), dtype=torch.float64) + 0.1
    return targets, [c.to(dtype).requires_grad_() for c in cands], weights


def _loss_and_grads(fn, cands, targets, cost, weights):  # type: ignore[no-untyped-def]
    tt = reference.target_sq_norms(targets)
    loss = fn(cands, targets, cost=cost, weights=weights, eps=1e-8, sq_norms=tt)
    return loss, torch.autograd.grad(loss, cands)


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("cost", reference.COSTS)
def test_float64_equals_the_reference(seed: int, resnet18_shapes, cost, zero) -> None:  # type: ignore[no-untyped-def]
    targets, cands, w = _case(resnet18_shapes, torch.float64, zero)
    want, want_g = _loss_and_grads(reference.gradient_matching_loss, cands, targets, cost, w)
    got, got_g = _loss_and_grads(closed_form.matching_loss, cands, targets, cost, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, h in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("cost", reference.COSTS)
def test_low_precision_against_float64(seed: int, resnet18_shapes, cost, dtype, tol) -> None:  # type: ignore[no-untyped-def]
    targets, cands, w = _case(resnet18_shapes, dtype, zero=False)
    exact = [c.detach().double().requires_grad_() for c in cands]
    want, want_g = _loss_and_grads(reference.gradient_matching_loss, exact, targets, cost, w)
    got, got_g = _loss_and_grads(closed_form.matching_loss, cands, [t.to(dtype) for t in targets], cost, w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    for g, h, c in zip(got_g, want_g, cands, strict=True):
        assert g.dtype == c.dtype
        scale = h.abs().max().item() + 1e-12
        assert (g.double() - h).abs().max().item() <= tol * scale * 10


def test_auto_dispatch_uses_it_for_plain_cpu_tensors_and_the_reference_under_vmap(seed: int) -> None:
    shapes = [torch.Size([5, 3]), torch.Size([7])]
    targets = [torch.randn(s) for s in shapes]
    packed = pack_targets(targets)
    cands = [torch.randn(s, requires_grad=True) for s in shapes]
    loss = kernels.gradient_matching_loss(cands, packed, cost="cosine_global")
    assert type(loss.grad_fn).__name__ == "ClosedFormMatchingBackward"
    # asked for by name, the reference is the plain-torch specification itself
    loss = kernels.gradient_matching_loss(cands, packed, cost="cosine_global", backend="reference")
    assert type(loss.grad_fn).__name__ != "ClosedFormMatchingBackward"

    def per_restart(c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
        return kernels.gradient_matching_loss([c0, c1], packed, cost="cosine_global")

    rows = [torch.randn(3, *s) for s in shapes]
    batched = torch.func.vmap(torch.func.grad(per_restart, argnums=(0, 1)))(*rows)
    for r in range(3):
        single = [x[r].clone().requires_grad_() for x in rows]
        want = torch.autograd.grad(per_restart(*single), single)
        for b, w in zip(batched, want, strict=True):
            torch.testing.assert_close(b[r], w, rtol=1e-5, atol=1e-6)


def test_second_derivative_through_it_is_refused(seed: int) -> None:
    shapes = [torch.Size([4]), torch.Size([2, 2])]
    targets = [torch.randn(s, dtype=torch.float64) for s in shapes]
    cands = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    loss = closed_form.matching_loss(
        cands, targets, cost="cosine", weights=torch.ones(2, dtype=torch.float64), eps=1e-8,
        sq_norms=reference.target_sq_norms(targets),
    )  # fmt: skip
    grads = torch.autograd.grad(loss, cands, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(sum(g.sum() for g in grads), cands)


def test_second_order_graph_of_an_attack_flows_through_it(seed: int) -> None:
    """What attacks do: candidates are parameter gradients built with create_graph; the loss's
    gradient with respect to the input equals the reference's."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    params = list(model.parameters())
    y = torch.tensor([2])
    target = torch.autograd.grad(
        torch.nn.functional.cross_entropy(model(torch.randn(1, 6, dtype=torch.float64)), y), params
    )
    tt = reference.target_sq_norms(target)
    w = torch.ones(len(params), dtype=torch.float64)
    x = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    for cost in reference.COSTS:
        out = []
        for fn in (reference.gradient_matching_loss, closed_form.matching_loss):
            g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params, create_graph=True)
            loss = fn(list(g), list(target), cost=cost, weights=w, eps=1e-8, sq_norms=tt)
            out.append(torch.autograd.grad(loss, x)[0])
        torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-14)
