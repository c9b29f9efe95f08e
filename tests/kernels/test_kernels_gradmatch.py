"""The fused gradient matching kernels (run by Triton's interpreter on CPU) against the float64
reference, forward and every gradient.

Tolerances, per element |got - expected| <= atol + rtol |expected|, with atol a fraction of the
largest expected value (loss: the loss; gradients: the largest gradient element of any layer, so
that a gradient that is exactly zero, e.g. the cosine of a 1-element layer, is held to the
rounding of the terms that cancel in it):
- float64 candidates: rtol 1e-9, atol 1e-12 * scale (only summation order differs);
- float32: rtol 1e-4, atol 1e-5 * scale (fp32 accumulation over up to ~3e4 elements per layer);
- bfloat16: losses rtol 1e-4 (inputs are exact in fp32, sums are fp32); gradients are rounded to
  bfloat16 on output, so rtol 1e-2, atol 1e-2 * scale (bf16 has 8 mantissa bits, 2^-8 = 0.4%).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import kernels
from kernels import Cost, gradmatch

COSTS = ("l2", "cosine", "cosine_global")
TOLERANCES = {  # dtype -> (loss rtol, grad rtol, grad atol as a fraction of the tensor's scale)
    torch.float64: (1e-9, 1e-9, 1e-12),
    torch.float32: (1e-5, 1e-4, 1e-5),
    torch.bfloat16: (1e-4, 1e-2, 1e-2),
}
# 1 element, primes, one chunk plus one element, several chunks, a conv kernel
ODD_SHAPES = [(1,), (2,), (3, 5), (7, 11, 13), (gradmatch.CHUNK + 1,), (16411,), (64, 3, 3, 3)]


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol_frac: float, scale: float | None = None
) -> None:
    expected = expected.double()
    scale = float(expected.abs().max()) if scale is None else scale
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=max(atol_frac * scale, 1e-300))


def _problem(
    shapes: list[tuple[int, ...]] | list[torch.Size], dtype: torch.dtype, rows: int | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Targets and candidates; candidates are correlated with the targets, as during an attack.

    Every layer of a candidate keeps a norm of at least 0.5: a per-layer cosine gradient is a
    difference of two terms of size 1/|c| (exactly 0 for a one-element layer), so as |c| -> 0 its
    float32 rounding outgrows any tolerance relative to the largest gradient.
    """
    targets = [torch.randn(s, dtype=torch.float64) for s in shapes]
    lead = () if rows is None else (rows,)
    cands = [0.7 * t + 0.5 * torch.randn(*lead, *t.shape, dtype=torch.float64) for t in targets]
    for c in cands:
        norms = c.reshape(*lead, -1).norm(dim=-1).view(*lead, *([1] * (c.dim() - len(lead))))
        c.mul_(torch.clamp(0.5 / norms, min=1.0))
    return [t.to(dtype) for t in targets], [c.to(dtype).requires_grad_() for c in cands]


def _reference(
    cands: list[torch.Tensor], targets: list[torch.Tensor], *, batched: bool = False, **kwargs: object
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of the float64 reference on the same values."""
    ref_cands = [c.detach().double().requires_grad_() for c in cands]
    op = kernels.batched_gradient_matching_loss if batched else kernels.gradient_matching_loss
    loss = op(ref_cands, [t.double() for t in targets], backend="reference", **kwargs)  # type: ignore[arg-type]
    grads = torch.autograd.grad(loss.sum(), ref_cands, allow_unused=True)
    return loss.detach(), [
        torch.zeros_like(c) if g is None else g for c, g in zip(ref_cands, grads, strict=True)
    ]


def _triton(
    cands: list[torch.Tensor], target: object, *, batched: bool = False, **kwargs: object
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    op = kernels.batched_gradient_matching_loss if batched else kernels.gradient_matching_loss
    loss = op(cands, target, backend="triton", **kwargs)  # type: ignore[arg-type]
    grads = torch.autograd.grad(loss.sum(), cands, allow_unused=True)
    return loss.detach(), [torch.zeros_like(c) if g is None else g for c, g in zip(cands, grads, strict=True)]


def _compare(
    got: tuple[torch.Tensor, list[torch.Tensor]],
    want: tuple[torch.Tensor, list[torch.Tensor]],
    dtype: torch.dtype,
) -> None:
    loss_rtol, grad_rtol, grad_atol = TOLERANCES[dtype]
    _assert_close(got[0], want[0], loss_rtol, loss_rtol)
    scale = max(float(w.abs().max()) for w in want[1])
    for index, (g, w) in enumerate(zip(got[1], want[1], strict=True)):
        assert g.dtype == dtype, f"gradient {index} has dtype {g.dtype}"
        assert torch.isfinite(g).all(), f"gradient {index} is not finite"
        _assert_close(g, w, grad_rtol, grad_atol, scale)


def test_kernels_run_in_the_interpreter() -> None:
    assert gradmatch.INTERPRETED, (
        "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; set "
        "TRITON_INTERPRET=1 in the environment or run tests/kernels on its own"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cost", COSTS)
def test_odd_shapes_match_reference(seed: int, cost: str, dtype: torch.dtype) -> None:
    targets, cands = _problem(ODD_SHAPES, dtype)
    weights = (torch.rand(len(ODD_SHAPES), dtype=torch.float64) + 0.1).tolist()
    packed = kernels.pack_targets(targets)
    got = _triton(cands, packed, cost=cost, layer_weights=weights)
    _compare(got, _reference(cands, targets, cost=cost, layer_weights=weights), dtype)


@pytest.mark.parametrize(
    ("cost", "dtype"),
    [(cost, torch.float32) for cost in COSTS] + [("cosine", torch.bfloat16)],
)
def test_resnet18_subset_and_weights_match_reference(
    seed: int, cost: str, dtype: torch.dtype, resnet18_shapes: list[torch.Size]
) -> None:
    assert len(resnet18_shapes) == 62
    targets, cands = _problem(resnet18_shapes, dtype)
    layers = [i for i in range(62) if i % 3 != 1]  # the SoK attacks with some blocks' gradients only
    weights = torch.rand(len(layers), dtype=torch.float64) + 0.1
    packed = kernels.pack_targets(targets, layers=layers)
    got = _triton(cands, packed, cost=cost, layer_weights=weights)
    want = _reference(cands, targets, cost=cost, layer_weights=weights, layers=layers)
    _compare(got, want, dtype)
    unused = [i for i in range(62) if i not in layers]
    assert all(not got[1][i].any() for i in unused), "layers outside the subset must get no gradient"


@pytest.mark.parametrize("cost", COSTS)
def test_plain_target_list_equals_packed_targets(seed: int, cost: str) -> None:
    targets, cands = _problem([(5, 3), (4,), (2, 2, 2)], torch.float32)
    from_list = _triton(cands, targets, cost=cost, layers=[0, 2])
    from_packed = _triton(cands, kernels.pack_targets(targets, layers=[0, 2]), cost=cost)
    torch.testing.assert_close(from_list[0], from_packed[0], rtol=0, atol=0)
    for a, b in zip(from_list[1], from_packed[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cost", COSTS)
def test_zero_norm_layers_stay_finite(seed: int, cost: str, dtype: torch.dtype) -> None:
    shapes = [(6, 4), (5,), (3, 3), (17,)]
    targets, cands = _problem(shapes, dtype)
    targets[1] = torch.zeros_like(targets[1])  # e.g. a layer a sparsifying defense dropped
    with torch.no_grad():
        cands[2].zero_()  # a candidate layer with exactly zero gradient
        cands[3].zero_()
    targets[3] = torch.zeros_like(targets[3])
    got = _triton(cands, kernels.pack_targets(targets), cost=cost)
    assert torch.isfinite(got[0])
    _compare(got, _reference(cands, targets, cost=cost), dtype)


@pytest.mark.parametrize("cost", COSTS)
def test_batched_equals_separate_calls(seed: int, cost: str) -> None:
    rows = 3
    targets, cands = _problem(ODD_SHAPES[:5], torch.float32, rows=rows)
    packed = kernels.pack_targets(targets)
    weights = [0.5, 1.0, 2.0, 0.25, 1.5]
    batched = _triton(cands, packed, batched=True, cost=cost, layer_weights=weights)
    assert batched[0].shape == (rows,)
    for r in range(rows):
        single = _triton(
            [c[r].detach().requires_grad_() for c in cands], packed, cost=cost, layer_weights=weights
        )
        torch.testing.assert_close(batched[0][r], single[0], rtol=1e-6, atol=1e-6)
        for g_batched, g_single in zip(batched[1], single[1], strict=True):
            torch.testing.assert_close(g_batched[r], g_single, rtol=1e-6, atol=1e-7)
    _compare(
        batched, _reference(cands, targets, batched=True, cost=cost, layer_weights=weights), torch.float32
    )


def test_unaligned_candidates_take_the_masked_path(seed: int) -> None:
    shapes = [(3, 1000), (4100,), (6,)]
    targets, cands = _problem(shapes, torch.float32)
    # views starting one element into a buffer: not 16-byte aligned
    buffers = [torch.empty(c.numel() + 1) for c in cands]
    views = [b[1:].view(c.shape) for b, c in zip(buffers, cands, strict=True)]
    for v, c in zip(views, cands, strict=True):
        v.copy_(c.detach())
        v.requires_grad_()
    packed = kernels.pack_targets(targets)
    table = gradmatch._candidate_table(packed, views, 1)
    assert table[1].tolist() == [0, 0, 0]
    assert gradmatch._candidate_table(packed, [c.detach() for c in cands], 1)[1].tolist() == [1, 1, 1]
    for cost in COSTS:
        _compare(_triton(views, packed, cost=cost), _reference(views, targets, cost=cost), torch.float32)


@pytest.mark.parametrize("cost", COSTS)
def test_gradcheck_through_the_kernels(seed: int, cost: Cost) -> None:
    targets, cands = _problem([(3,), (2, 5), (1,)], torch.float64)
    packed = kernels.pack_targets(targets)

    def loss(*cs: torch.Tensor) -> torch.Tensor:
        return kernels.gradient_matching_loss(
            list(cs), packed, cost=cost, layer_weights=[1.0, 0.5, 2.0], backend="triton"
        )

    assert torch.autograd.gradcheck(loss, tuple(cands), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cost", COSTS)
def test_vmap_over_restarts_equals_batched_loss(seed: int, cost: str) -> None:
    rows = 4
    targets, cands = _problem([(3, 4), (9,), (2, 2, 3)], torch.float64, rows=rows)
    packed = kernels.pack_targets(targets)

    def one(*cs: torch.Tensor) -> torch.Tensor:
        return kernels.gradient_matching_loss(list(cs), packed, cost=cost, backend="triton")  # type: ignore[arg-type]

    # the second candidate is shared by every restart: exercises an unbatched input under vmap
    shared = cands[1][0].detach().requires_grad_()
    mapped = vmap(one, in_dims=(0, None, 0))(cands[0], shared, cands[2])
    grads = torch.autograd.grad(mapped.sum(), [cands[0], shared, cands[2]])
    expanded = [cands[0], shared.expand(rows, -1), cands[2]]
    want = _reference(expanded, targets, batched=True, cost=cost)
    _assert_close(mapped.detach(), want[0], 1e-9, 1e-12)
    _assert_close(grads[0], want[1][0], 1e-9, 1e-12)
    _assert_close(grads[1], want[1][1].sum(dim=0), 1e-9, 1e-12)
    _assert_close(grads[2], want[1][2], 1e-9, 1e-12)


def _small_model(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).to(
        dtype
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_second_order_through_a_model_matches_reference(seed: int, dtype: torch.dtype) -> None:
    model = _small_model(dtype)
    labels = torch.tensor([1, 3])
    truth = torch.randn(2, 3, 6, 6, dtype=dtype)
    target = torch.autograd.grad(nn.functional.cross_entropy(model(truth), labels), list(model.parameters()))
    packed = kernels.pack_targets(target)
    start = torch.randn(2, 3, 6, 6, dtype=dtype)

    def image_gradient(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = start.clone().requires_grad_()
        loss_x = nn.functional.cross_entropy(model(x), labels)
        cands = torch.autograd.grad(loss_x, list(model.parameters()), create_graph=True)
        loss = kernels.gradient_matching_loss(cands, packed, cost="cosine", backend=backend)  # type: ignore[arg-type]
        loss = loss + 0.1 * kernels.total_variation(x, backend=backend)  # type: ignore[arg-type]
        loss.backward()
        assert x.grad is not None
        return loss.detach(), x.grad

    got, want = image_gradient("triton"), image_gradient("reference")
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    _assert_close(got[0], want[0], rtol, rtol)
    _assert_close(got[1], want[1], rtol, rtol)


def test_vmapped_restarts_of_a_model_match_reference(seed: int) -> None:
    """Restarts batched the torch.func way: per-restart parameter gradients by vmap(grad(...)),
    one batched loss and a vmapped TV, then a plain backward to the images."""
    model = _small_model(torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}
    labels = torch.tensor([0, 4])

    def client_loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), labels)

    packed = kernels.pack_targets(
        list(grad(client_loss)(params, torch.randn(2, 3, 6, 6, dtype=torch.float64)).values())
    )
    start = torch.randn(3, 2, 3, 6, 6, dtype=torch.float64)

    def run(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = start.clone().requires_grad_()
        per_restart = vmap(grad(client_loss), in_dims=(None, 0))(params, x)
        loss = kernels.batched_gradient_matching_loss(
            list(per_restart.values()),
            packed,
            cost="cosine_global",
            backend=backend,  # type: ignore[arg-type]
        )
        tv = vmap(lambda xi: kernels.total_variation(xi, backend=backend))(x)  # type: ignore[arg-type]
        (loss + 0.05 * tv).sum().backward()
        assert x.grad is not None
        return (loss + 0.05 * tv).detach(), x.grad

    got, want = run("triton"), run("reference")
    _assert_close(got[0], want[0], 1e-9, 1e-12)
    _assert_close(got[1], want[1], 1e-9, 1e-12)


def test_backward_is_not_differentiable_again(seed: int) -> None:
    targets, cands = _problem([(4,), (3, 2)], torch.float64)
    loss = kernels.gradient_matching_loss(cands, kernels.pack_targets(targets), backend="triton")
    grads = torch.autograd.grad(loss, cands, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(grads[0].sum(), cands)


@pytest.mark.slow
@pytest.mark.parametrize("cost", COSTS)
def test_full_size_resnet18_matches_reference(
    seed: int, cost: str, resnet18_full_shapes: list[torch.Size]
) -> None:
    targets, cands = _problem(resnet18_full_shapes, torch.float32)
    got = _triton(cands, kernels.pack_targets(targets), cost=cost)
    _compare(got, _reference(cands, targets, cost=cost), torch.float32)
