"""The reference (specification) against independent formulations, and gradcheck in float64.

Independent formulations: l2 as an explicit sum of squared differences; per-layer cosine with
torch.nn.functional.cosine_similarity; global cosine as the cosine of the concatenated gradients
scaled by sqrt(w_l); total variation with torch.diff. All in float64, tolerance rtol 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import reference

SHAPES = [(4, 3), (7,), (2, 3, 5), (1,)]


def _lists(rows: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    targets = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    lead = () if rows is None else (rows,)
    cands = [torch.randn(*lead, *s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    weights = torch.rand(len(SHAPES), dtype=torch.float64) + 0.1
    return cands, targets, weights


def test_l2_is_the_weighted_sum_of_squared_differences(seed: int) -> None:
    cands, targets, w = _lists()
    got = reference.gradient_matching_loss(cands, targets, cost="l2", weights=w, eps=1e-8)
    want = sum(w[i] * ((c - t) ** 2).sum() for i, (c, t) in enumerate(zip(cands, targets, strict=True)))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_cosine_is_one_minus_cosine_similarity_per_layer(seed: int) -> None:
    cands, targets, w = _lists()
    got = reference.gradient_matching_loss(cands, targets, cost="cosine", weights=w, eps=1e-8)
    sims = [F.cosine_similarity(c.flatten(), t.flatten(), dim=0) for c, t in zip(cands, targets, strict=True)]
    want = sum(w[i] * (1 - s) for i, s in enumerate(sims))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_cosine_global_is_the_cosine_of_weighted_concatenations(seed: int) -> None:
    cands, targets, w = _lists()
    got = reference.gradient_matching_loss(cands, targets, cost="cosine_global", weights=w, eps=1e-8)
    c_all = torch.cat([math.sqrt(w[i]) * c.flatten() for i, c in enumerate(cands)])
    t_all = torch.cat([math.sqrt(w[i]) * t.flatten() for i, t in enumerate(targets)])
    want = 1 - F.cosine_similarity(c_all, t_all, dim=0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cost", reference.COSTS)
def test_gradcheck(seed: int, cost: reference.Cost) -> None:
    _, targets, w = _lists()
    cands = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]

    def loss(*cs: torch.Tensor) -> torch.Tensor:
        return reference.gradient_matching_loss(list(cs), targets, cost=cost, weights=w, eps=1e-8)

    assert torch.autograd.gradcheck(loss, tuple(cands))
    assert torch.autograd.gradgradcheck(loss, tuple(cands))


def test_zero_norm_layers(seed: int) -> None:
    cands, targets, w = _lists()
    eps = 1e-8
    targets[0] = torch.zeros_like(targets[0])
    with torch.no_grad():
        cands[1].zero_()
    for cost in ("cosine", "cosine_global"):
        loss = reference.gradient_matching_loss(cands, targets, cost=cost, weights=w, eps=eps)
        grads = torch.autograd.grad(loss, cands)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(g).all() for g in grads)
    loss = reference.gradient_matching_loss(cands, targets, cost="cosine", weights=w, eps=eps)
    grads = torch.autograd.grad(loss, cands)
    # a zero target layer has cosine 0 and passes no gradient; a zero candidate layer gets -w t / eps
    assert not grads[0].any()
    torch.testing.assert_close(grads[1], -w[1] * targets[1] / eps, rtol=1e-12, atol=0)
    others = [
        F.cosine_similarity(c.flatten(), t.flatten(), dim=0)
        for c, t in zip(cands[2:], targets[2:], strict=True)
    ]
    want = w[0] + w[1] + sum(w[2 + i] * (1 - s) for i, s in enumerate(others))
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cost", reference.COSTS)
def test_batched_rows_equal_separate_losses(seed: int, cost: reference.Cost) -> None:
    cands, targets, w = _lists(rows=3)
    batched = reference.batched_gradient_matching_loss(cands, targets, cost=cost, weights=w, eps=1e-8)
    assert batched.shape == (3,)
    for r in range(3):
        single = reference.gradient_matching_loss(
            [c[r] for c in cands], targets, cost=cost, weights=w, eps=1e-8
        )
        torch.testing.assert_close(batched[r], single, rtol=1e-12, atol=1e-12)


def test_statistics_are_accumulated_in_float32_for_bfloat16(seed: int) -> None:
    c = [torch.randn(1000).bfloat16()]
    t = [torch.randn(1000).bfloat16()]
    dot, cc, _ = reference.layer_statistics(c, t, batched=False, cost="cosine")
    (dd,) = [s for s in reference.layer_statistics(c, t, batched=False, cost="l2") if s is not None]
    assert dot is not None and cc is not None
    assert dot.dtype == cc.dtype == dd.dtype == torch.float32
    torch.testing.assert_close(dot[0, 0], (c[0].double() * t[0].double()).sum().float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(
        dd[0, 0], (c[0].double() - t[0].double()).square().sum().float(), rtol=1e-6, atol=1e-4
    )


def test_total_variation_is_mean_absolute_neighbour_difference(seed: int) -> None:
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    want = torch.diff(x, dim=3).abs().mean() + torch.diff(x, dim=2).abs().mean()
    torch.testing.assert_close(reference.total_variation(x), want, rtol=1e-12, atol=0)


def test_total_variation_of_a_single_row_or_column_has_one_term(seed: int) -> None:
    row = torch.randn(1, 2, 1, 6, dtype=torch.float64)
    column = torch.randn(1, 2, 6, 1, dtype=torch.float64)
    torch.testing.assert_close(reference.total_variation(row), torch.diff(row, dim=3).abs().mean())
    torch.testing.assert_close(reference.total_variation(column), torch.diff(column, dim=2).abs().mean())
    assert reference.total_variation(torch.randn(1, 1, 1, 1)) == 0
